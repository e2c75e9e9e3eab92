"""Anti-Self-Distillation (AntiSD): ascend the divergence from the policy's own answer-conditioned teacher.

Paper: Shen et al. 2026, "Anti-Self-Distillation for Reasoning RL via Pointwise Mutual Information"
(arXiv 2605.11609). Spec: ALGORITHMS.md §2.3; the SD frame is sd.py's (AntiSD §2, Eq. 2).

Idea: the SD token credit u_t is a pMI increment: it is high where knowing the answer makes a token
likely (shortcuts to a known result) and negative where the answer does not explain the token (the
student's own deliberation). Instead of descending a KL to the teacher, AntiSD ascends the symmetric
Jensen-Shannon divergence: a bounded bonus for deliberation tokens (u < 0), a penalty for tokens the
answer explains (u > 0), switched off by an entropy gate when the teacher's entropy collapses.

    u_t      = log pi(y_t | x, c, y_<t) - log pi_old(y_t | x, y_<t)       (token log-ratio, shared weights)
    phi(u)   = 0.5 * (softplus(u) - log 2)                                  (JSD score coefficient)
    delta_t  = -phi(u_t) <= 0.5 log 2;   ~ -u/4 near 0, ~ -u/2 for large u
    A[b, t]  = A_i + g * lam_max * delta_t                                  (token advantage; PPO clip as grpo.py)
    H        = median over the batch's completion tokens of the teacher's full-vocabulary entropy at tau
    g        = 0 for the first W warm-up steps, which record H_warm; tau_down = 0.93 * H_warm; then a
               Schmitt trigger from g = 1: 1 -> 0 when H < tau_down, 0 -> 1 when H >= H_warm.
    c_i      = a correct rollout of the same group other than row i (else the reference solution or the
               answer), then `Your answer is correct.` / `Your answer is incorrect.`
               (code: `Your code passes N of M test cases.`)

Choices (marked [choice] in ALGORITHMS.md §2.3) and their flags:
- H_warm is the median of all pooled warm-up token entropies (`--h-warm-agg pooled`, default) or the
  median of the warm-up step medians (`--h-warm-agg step-median`). Pooled entropies are counted in a
  histogram of 1e-4-nat bins on [0, 20) nats so memory stays bounded on long runs; H_warm is then the
  centre of the bin holding the median, within 5e-5 nats of the exact value. Medians are lower
  medians (torch.median's convention).
- After warm-up the trigger starts at g = 1 and already applies to the first gated step's H.
- `--gate-warmup-steps` is the paper's W (`--warmup-steps` is the learning-rate warm-up of every script).
- `--no-gate`: g = 1 from step 0, no warm-up (H is still logged).
- Peer: the first other correct row of the group (deterministic, no RNG). Without one, `--privileged`
  picks the reference solution (default) or the answer only; `--no-feedback` drops the sentence.
- `--divergence revkl`: delta = -u (reverse-KL ascent) instead of JSD.
- Teacher weights: the current policy (`--teacher current`, the only value accepted); token mode only.
  `--lam-max` replaces sd.py's `--lam`.

Paper hyperparameters: Qwen3-4B/8B, DAPO-Math-17k, lr 1e-6, 32 prompts x 8 rollouts, 200 steps,
temperature 1.0, PPO clip 0.2, no KL, one update per batch, lam_max 0.5, W 5, tau_down 0.93 H_warm.
Headline: Qwen3-4B-Instruct-2507, 5-benchmark math average 62.8 vs GRPO 51.3; Qwen3-8B 65.7 vs 57.4.

Run:
    python antisd.py                                  # the toy task, CPU, a few minutes
    python antisd.py --no-gate --divergence revkl     # an ablation
    torchrun --nproc_per_node 8 antisd.py --model Qwen/Qwen3-4B-Instruct-2507 --dataset dapo-math \\
        --num-prompts 32 --group-size 8 --total-steps 200 --learning-rate 1e-6 --temperature 1.0 --eps-high 0.2 \\
        --max-new-tokens 4096 --max-teacher-prompt-tokens 6144 --micro-batch-rows 4 --gradient-checkpointing
(The length budgets and memory flags of the last command are ours, not the paper's.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

import grpo
import sd
from common.data import Example
from common.dist import all_reduce, gather_floats
from common.run import setup
from common.verifiers import Verdict


@dataclass
class Args(sd.Args):
    lam_max: float = 0.5
    """Weight of the AntiSD credit when the gate is on (0 reproduces grpo.py)."""
    gate_warmup_steps: int = 5
    """Gate warm-up W: steps run as plain GRPO (g=0) while recording H_warm."""
    gate_down: float = 0.93
    """The gate turns off when the teacher-entropy median drops below gate_down * H_warm."""
    no_gate: bool = False
    """Ablation: g = 1 at every step, no warm-up."""
    divergence: Literal["jsd", "revkl"] = "jsd"
    """Ascend the Jensen-Shannon divergence (delta = -phi(u)) or the reverse KL (delta = -u)."""
    h_warm_agg: Literal["pooled", "step-median"] = "pooled"
    """H_warm: median of all warm-up token entropies, or median of the warm-up step medians."""


# ---------------------------------------------------------------------------------------------------
# The algorithm: credit, gate, teacher context (pure functions and a small state machine).


def phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 0.5 * (softplus(u) - log 2) (§2.3); F.softplus is linear above 20, so no exp overflow."""
    return 0.5 * (F.softplus(u) - math.log(2.0))


def antisd_credit(u: torch.Tensor, divergence: str = "jsd") -> torch.Tensor:
    """delta = -phi(u) (JSD ascent, bounded above by 0.5 log 2) or -u (reverse-KL ascent) (§2.3)."""
    return -phi(u) if divergence == "jsd" else -u


BIN_NATS, NUM_BINS = 1e-4, 200_000
"""Warm-up entropy histogram: 1e-4-nat bins over [0, 20) nats (entropy <= log V < 20 for any vocabulary)."""


def histogram_median(counts: torch.Tensor) -> float:
    """Centre of the bin holding the lower median of the counted values (within BIN_NATS / 2 of it)."""
    k = (int(counts.sum()) - 1) // 2  # rank of the lower median, as torch.median
    return (int(torch.searchsorted(counts.cumsum(0), torch.tensor(k), right=True)) + 0.5) * BIN_NATS


@dataclass
class EntropyGate:
    """The entropy-triggered switch g (§2.3): warm-up with g=0 recording H_warm, then a Schmitt trigger.

    On -> off when H < down * H_warm, off -> on when H >= H_warm; in between g keeps its value, so a
    median hovering near one threshold cannot make it chatter.
    """

    warmup_steps: int = 5
    down: float = 0.93
    agg: str = "pooled"
    enabled: bool = True
    step: int = 0
    on: bool = True
    h_warm: float | None = None
    counts: torch.Tensor | None = field(default_factory=lambda: torch.zeros(NUM_BINS, dtype=torch.long))
    """Pooled warm-up token entropies as a histogram (dropped once H_warm is known)."""
    medians: list[float] = field(default_factory=list)
    """Warm-up step medians."""

    def __post_init__(self):
        if self.enabled and self.warmup_steps < 1:
            raise ValueError("--gate-warmup-steps must be >= 1 (H_warm is measured in warm-up); use --no-gate instead")

    def update(self, h: float, entropies: torch.Tensor) -> float:
        """g for this step from its entropy median `h` and (warm-up only) its token entropies."""
        if not self.enabled:
            return 1.0
        self.step += 1
        if self.step <= self.warmup_steps:
            self.medians.append(h)
            bins = (entropies.double() / BIN_NATS).long().clamp(0, NUM_BINS - 1)
            self.counts += torch.bincount(bins, minlength=NUM_BINS).cpu()
            if self.step == self.warmup_steps:
                pooled = self.agg == "pooled"
                self.h_warm = histogram_median(self.counts) if pooled else torch.tensor(self.medians).median().item()
                self.counts, self.medians = None, []
            return 0.0
        if self.on and h < self.down * self.h_warm:
            self.on = False
        elif not self.on and h >= self.h_warm:
            self.on = True
        return float(self.on)

    def state_dict(self) -> dict:
        return {"step": self.step, "on": self.on, "h_warm": self.h_warm, "counts": self.counts, "medians": self.medians}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.on, self.h_warm = state["step"], state["on"], state["h_warm"]
        self.counts, self.medians = state["counts"], list(state["medians"])


def peer_rows(correct: list[bool], group_size: int) -> list[int | None]:
    """For each row, the first other correct row of its group (never itself), else None."""
    peers = []
    for i in range(len(correct)):
        start = i - i % group_size
        peers.append(next((j for j in range(start, start + group_size) if j != i and correct[j]), None))
    return peers


def correctness_sentence(example: Example, verdict: Verdict) -> str:
    """Verifier feedback on the row's own attempt; code reward is the fraction of tests passed."""
    if example.task == "code":
        m = len(example.tests or [])
        return f"Your code passes {round(verdict.reward * m)} of {m} test cases."
    return "Your answer is correct." if verdict.correct else "Your answer is incorrect."


def privileged_block(example: Example, verdict: Verdict, peer_text: str | None, mode: str, feedback: bool) -> str:
    """c_i: a verified solution (a correct peer rollout, else sd.py's solution/answer block), then feedback."""
    block = peer_text if peer_text is not None else sd.privileged_block(example, verdict, mode, feedback=False)
    return f"{block}\n\n{correctness_sentence(example, verdict)}" if feedback else block


def antisd_metrics(delta: torch.Tensor, credit: torch.Tensor, token_advantages: torch.Tensor, mask: torch.Tensor,
                   has_peer: torch.Tensor) -> dict:
    """Credit, advantage and context statistics over completion tokens and rows (over all ranks)."""
    valid, n_tokens = mask.bool(), all_reduce(mask.sum())
    n_rows = all_reduce(torch.tensor(float(mask.shape[0]), device=mask.device))
    return {"antisd/delta_mean": (all_reduce(delta.sum()) / n_tokens).item(),
            "antisd/frac_deliberation": (all_reduce(((credit < 0) & valid).float().sum()) / n_tokens).item(),
            "antisd/adv_min": all_reduce(token_advantages[valid].min(), "min").item(),
            "antisd/adv_max": all_reduce(token_advantages[valid].max(), "max").item(),
            "antisd/frac_peer_context": (all_reduce(has_peer.float().sum()) / n_rows).item()}


def main(args: Args) -> None:
    args = grpo.apply_preset(args)
    if args.sd_loss != "token" or args.teacher != "current":
        raise ValueError("antisd.py folds its credit into the advantage with the current policy as teacher: "
                         "drop --sd-loss and --teacher (token mode, current weights)")
    run = setup(args, "antisd")
    gate = EntropyGate(args.gate_warmup_steps, args.gate_down, args.h_warm_agg, enabled=not args.no_gate)
    if run.start_step > 0:
        if "gate" not in run.extra:
            raise ValueError(f"the checkpoint in {run.out_dir} has no gate state: it was not written by antisd.py")
        gate.load_state_dict(run.extra["gate"])
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = grpo.collect_batch(run, args)
        advantages = args.grpo_coef * grpo.group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old.
        old, _ = grpo.score_old_and_ref(run, args, batch)

        # 3. Teacher context c_i: a correct peer of the group (else the solution), then correctness feedback.
        peers = peer_rows([v.correct for v in batch.verdicts], args.group_size)
        peer_texts = [batch.rollout.texts[p] if p is not None else None for p in peers]
        blocks = [privileged_block(e, v, text, args.privileged, args.feedback)
                  for e, v, text in zip(batch.examples, batch.verdicts, peer_texts)]

        # 4. Teacher scores the same completion tokens, with its full-vocabulary entropy at tau.
        t1 = time.perf_counter()
        teacher = sd.score_teacher(run, args, batch, blocks, with_entropy=True)
        t_teacher = time.perf_counter() - t1

        # 5. Gate: H = median teacher entropy over every completion token of the batch (all ranks).
        entropies = gather_floats(teacher["entropy"][mask.bool()].float())
        h = entropies.median().item()
        g = gate.update(h, entropies)

        # 6. Credit u = t - s_old; delta = -phi(u); token advantage A_t = A_i + g * lam_max * delta.
        credit = sd.token_credit(teacher["logprobs"], old["logprobs"], mask)
        delta = antisd_credit(credit, args.divergence) * mask
        token_advantages = advantages[:, None] + g * args.lam_max * delta

        # 7. Clipped-surrogate update.
        metrics |= grpo.ppo_update(run, args, batch, token_advantages, old["logprobs"], None, step)

        distilled = torch.full((mask.shape[0],), g * args.lam_max != 0, device=mask.device)
        metrics |= sd.sd_metrics(credit, teacher, mask, distilled, t_teacher)
        has_peer = torch.tensor([p is not None for p in peers], device=mask.device)
        metrics |= antisd_metrics(delta, credit, token_advantages, mask, has_peer)
        metrics |= {"gate/entropy_median": h, "gate/on": g}
        if gate.h_warm is not None:  # known from the last warm-up step on
            metrics["gate/h_warm"] = gate.h_warm
        grpo.finish_step(run, args, step, t0, metrics, batch, advantages, old, {"gate": gate.state_dict()})
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
