"""Anti-Self-Distillation (AntiSD): ascend the divergence from the policy's own answer-conditioned teacher.

Paper: Shen et al. 2026, "Anti-Self-Distillation for Reasoning RL via Pointwise Mutual Information"
(arXiv 2605.11609). Source: the paper's equations, hyperparameters and Appendix C. See docs/antisd.md.

Idea: the SD token credit u_t is a pMI increment: high where knowing the answer makes a token likely
(a shortcut to a known result), negative where the answer does not explain it (the student's own
deliberation). AntiSD ascends the Jensen-Shannon divergence instead of descending a KL: a bounded
bonus for deliberation, a penalty for shortcuts, switched off when the teacher's entropy collapses.

    u_t      = log pi(y_t | x, c, y_<t) - log pi_old(y_t | x, y_<t)       (token log-ratio, shared weights)
    delta_t  = -phi(u_t),  phi(u) = 0.5 * (softplus(u) - log 2)            (JSD score, <= 0.5 log 2)
    A[b, t]  = A_i + g * lam_max * delta_t                                  (token advantage; PPO clip as grpo.py)
    H        = median teacher entropy over the batch's completion tokens; g = 0 for W warm-up steps that
               record H_warm, then a Schmitt trigger: 1 -> 0 when H < 0.93 H_warm, 0 -> 1 when H >= H_warm
    c_i      = Appendix C: the prompt, a correct peer of the group (else the reference solution), and
               the assessment of the row's own attempt (`Your answer is correct.` / `... incorrect.`)

Run:
    python antisd.py                                  # the toy task, CPU, about a minute
    torchrun --nproc_per_node 8 antisd.py --model Qwen/Qwen3-4B-Instruct-2507 --dataset dapo-math \\
        --eval-dataset aime --num-prompts 32 --group-size 8 --total-steps 200 --learning-rate 1e-6 \\
        --max-new-tokens 4096 --max-teacher-prompt-tokens 6144 --micro-batch-rows 4 --gradient-checkpointing
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from common.args import ArgError, TrainArgs, check, cli
from common.batch import Batch, collect_batch, score_rollout
from common.dist import all_reduce, gather_floats
from common.example import Example, Verdict
from common.run import setup
from common.teacher import TeacherMessage, choose_peers, score_teacher, teacher_metrics
from common.tracking import warn_once
from common.update import MicroBatch, Update


@dataclass
class Args(TrainArgs):
    """Anti-Self-Distillation: ascend a bounded divergence from the answer-conditioned self-teacher, entropy-gated."""

    eps_high: float = 0.2
    """Upper clip range of the ratio (AntiSD: PPO clip 0.2; 0.28 is DAPO's clip-higher)."""
    grpo_coef: float = 1.0
    """Scale of the GRPO advantage."""

    # Teacher context (Appendix C)
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their verified solution shortened in the middle."""

    # AntiSD
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
    peer: Literal["random", "first"] = "random"
    """The verified solution: a correct other row of the group drawn uniformly (seeded), or the first one."""

    def validate(self) -> None:
        super().validate()
        check(self.grpo_coef, "grpo_coef", low=0)
        check(self.max_teacher_prompt_tokens, "max_teacher_prompt_tokens", low=1)
        check(self.lam_max, "lam_max", low=0)
        if not self.no_gate:
            check(self.gate_warmup_steps, "gate_warmup_steps", low=1, why="H_warm is measured in warm-up; or --no-gate")
        check(self.gate_down, "gate_down", 0, 1, low_open=True)


def phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 0.5 * (softplus(u) - log 2); F.softplus is linear above 20, so no exp overflow."""
    return 0.5 * (F.softplus(u) - math.log(2.0))


def antisd_credit(u: torch.Tensor, divergence: str = "jsd") -> torch.Tensor:
    """delta = -phi(u) (JSD ascent, bounded above by 0.5 log 2) or -u (reverse-KL ascent)."""
    return -phi(u) if divergence == "jsd" else -u


BIN_NATS, NUM_BINS = 1e-4, 200_000
"""Warm-up entropy histogram: 1e-4-nat bins over [0, 20) nats (entropy <= log V < 20 for any vocabulary)."""


def histogram_median(counts: torch.Tensor) -> float:
    """Centre of the bin holding the lower median of the counted values (within BIN_NATS / 2 of it)."""
    k = (int(counts.sum()) - 1) // 2  # rank of the lower median, as torch.median
    return (int(torch.searchsorted(counts.cumsum(0), torch.tensor(k), right=True)) + 0.5) * BIN_NATS


@dataclass
class EntropyGate:
    """The entropy-triggered switch g: warm-up with g=0 recording H_warm, then a Schmitt trigger.

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

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ArgError("--resume: the checkpoint has no gate state (antisd.py did not write it)")
        self.step, self.on, self.h_warm = state["step"], state["on"], state["h_warm"]
        self.counts, self.medians = state["counts"], list(state["medians"])


def correctness_sentence(example: Example, verdict: Verdict) -> str:
    """AntiSD's assessment of the row's own attempt: binary for math, the tests passed for code (Appendix C)."""
    if example.task == "code":
        m = len(example.tests or [])
        return f"Your code passes {round(verdict.reward * m)} of {m} test cases."
    return "Your answer is correct." if verdict.correct else "Your answer is incorrect."


def antisd_message(example: Example, verdict: Verdict, peer: str | None) -> TeacherMessage:
    """AntiSD's teacher context (Appendix C): a verified solution (a correct peer, else the reference), assessed."""
    return TeacherMessage(f"{example.prompt}\n\nYour previous attempt:\n",
                          peer if peer is not None else reference_solution(example),
                          f"\n\nPrevious assessment: {correctness_sentence(example, verdict)}\n"
                          "Now solve this problem step by step.")


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


def teacher_messages(batch: Batch, args: Args, generator: torch.Generator) -> tuple[list[TeacherMessage], torch.Tensor]:
    """Each row's teacher message (Appendix C): a correct peer of its group chosen by --peer (else the reference
    solution) and the assessment of the row's own attempt; also each row's peer (-1: none)."""
    correct = torch.tensor([v.correct for v in batch.verdicts])
    peers = choose_peers(correct, args.group_size, args.peer, generator)
    return [antisd_message(e, v, batch.rollout.texts[p] if p >= 0 else None)
            for e, v, p in zip(batch.examples, batch.verdicts, peers.tolist())], peers


def main(args: Args) -> None:
    run = setup(args, "antisd", reference=args.beta > 0)
    gate = EntropyGate(args.gate_warmup_steps, args.gate_down, args.h_warm_agg, enabled=not args.no_gate)
    if run.start_step > 0:
        gate.load_state_dict(run.extra.get("gate"))
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = collect_batch(run, args)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (one update per batch: from the update's own forward), reference log-probs.
        one_update = args.ppo_epochs * args.num_minibatches == 1
        old = {} if one_update else score_rollout(run, args, batch, with_entropy=True)
        ref_logprobs = score_rollout(run, args, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context c_i (Appendix C): a correct peer of the group (else the reference), the assessment.
        generator = torch.Generator().manual_seed((args.seed + run.d.rank) * 1_000_003 + step)  # not the global RNG
        messages, peers = teacher_messages(batch, args, generator)

        # 4. Teacher scores the same completion tokens, with its full-vocabulary entropy at tau.
        teacher = score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens, with_entropy=True)
        t_teach = time.perf_counter()

        # 5. Gate: H = median teacher entropy over every completion token of the batch (all ranks).
        entropies = gather_floats(teacher["entropy"][mask.bool()].float())
        h = entropies.median().item()
        g = gate.update(h, entropies)

        # 6-7. Per micro-batch: credit u = t - s_old; delta = -phi(u); token advantage A_t = A_i + g * lam_max * delta;
        #    the clipped surrogate on the token advantages.
        credit, delta, token_advantages = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
        update = Update(run, args, batch, step, old.get("logprobs"))
        for minibatch in update.minibatches():
            for rows in minibatch.split(args.micro_batch_rows):
                mb = update.forward(rows)
                credit[mb.rows] = token_credit(teacher["logprobs"][mb.rows], update.old_logprobs[mb.rows], mb.mask)
                delta[mb.rows] = antisd_credit(credit[mb.rows], args.divergence) * mb.mask
                token_advantages[mb.rows] = advantages[mb.rows, None] + g * args.lam_max * delta[mb.rows]
                loss, sums = policy_loss(mb, args, token_advantages, update.old_logprobs, ref_logprobs)
                loss.backward()
                update.log(sums)
            update.step()
        metrics |= update.metrics()
        t_update = time.perf_counter()

        metrics |= teacher_metrics(credit, teacher, mask, t_teach - t_score)
        has_peer = (peers >= 0).to(mask.device)
        metrics |= antisd_metrics(delta, credit, token_advantages, mask, has_peer)
        gate_stats = {"gate/entropy_median": h, "gate/on": g, "gate/h_warm": gate.h_warm}  # H_warm: after warm-up
        metrics |= {key: value for key, value in gate_stats.items() if value is not None}
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_teach}
        run.end_step(step, t0, metrics, batch, advantages, old.get("entropy", update.entropy),
                     {"gate": gate.state_dict()})
    run.close()


# ---------------------------------------------------------------------------------------------------
# Copies of small functions another script defines (kept identical by tests/test_layout.py).


# Same as grpo.py: group_advantages
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """A_i = r_i - mean_g(r), divided by std_g(r) + 1e-4 (`group`), the batch std (`batch`) or 1 (`none`)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)  # unbiased std, as TRL
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4)
    return centred.reshape(-1)


# Same as grpo.py: clipped_surrogate
def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and the ratio rho."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), ratio


# Same as grpo.py: k3_kl
def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - s) - (ref - s) - 1 >= 0."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


# Same as grpo.py: aggregate
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, num_rows: float, num_tokens: float,
              max_new_tokens: int) -> torch.Tensor:
    """Reduce a [b, T] loss over a micro-batch with denominators taken over the whole minibatch.

    sequence: sum_i (sum_t l / |y_i|) / rows;  token: sum l / tokens;  constant: sum l / (rows * L_max).
    """
    masked = per_token * mask
    if mode == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_rows
    if mode == "token":
        return masked.sum() / num_tokens
    if mode == "constant":
        return masked.sum() / (num_rows * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# Same as grpo.py: policy_loss
def policy_loss(mb: MicroBatch, args: Args, advantages: torch.Tensor, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's clipped surrogate on token advantages [B, T], aggregated, + beta * k3 KL; and its sums."""
    logprobs, m, adv, old = mb.out["logprobs"], mb.mask, advantages[mb.rows], old_logprobs[mb.rows]
    per_token, ratio = clipped_surrogate(logprobs, old, adv, args.eps_low, args.eps_high)
    tokens = mb.tokens["completion"]
    loss = aggregate(per_token, m, args.loss_agg, mb.num_rows, tokens, args.max_new_tokens)
    stats = {"loss/policy": (per_token * m).sum(),
             "policy/clip_frac_low": ((ratio < 1 - args.eps_low) & (adv < 0)).float().mul(m).sum(),
             "policy/clip_frac_high": ((ratio > 1 + args.eps_high) & (adv > 0)).float().mul(m).sum(),
             "policy/ratio_mean": (ratio.detach() * m).sum()}
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs[mb.rows])
        loss = loss + args.beta * aggregate(kl, m, args.loss_agg, mb.num_rows, tokens, args.max_new_tokens)
        stats["loss/kl"] = (kl * m).sum()
    return loss, stats


# Same as sd.py: reference_solution
def reference_solution(example: Example) -> str:
    """The dataset's worked solution; its final answer when it has none (said once)."""
    if example.solution:
        return example.solution
    warn_once("no-solution", "note: examples without a reference solution show the teacher their final answer")
    return example.answer


# Same as sd.py: token_credit
def token_credit(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = t - s_old on completion tokens, 0 on padding (all detached)."""
    return (teacher_logprobs - old_logprobs).detach() * mask



if __name__ == "__main__":
    main(cli(Args))
