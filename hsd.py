"""Hindsight Self-Distillation (HSD): the self-teacher reads a successful peer rollout of the same group.

Paper: Li, Hong, Lan 2026, "Localizing Credit at the Divergence: Path-Conditioned Self-Distillation
for LLM Reasoning" (arXiv 2606.15576). Source status: only the abstract and secondary summaries were
readable. From them [paper]: the teacher is conditioned on a successful peer rollout from the same group
(its full text) plus the ground-truth answer, and falls back to the answer alone when no peer
succeeded; the claim is that such a teacher puts its (negative) credit where the failed attempt left the
successful path, while an answer-only teacher is nearly silent mid-trace. Everything else, the loss
machinery included, is the project's choice and is sd.py's frame unchanged: only the context c differs.

    c_i = "A correct solution:\\n\\n{y_j}\\n\\nThe correct final answer is: {answer}"   j: a successful peer, j != i
    c_i = "The correct final answer is: {answer}"                                   no peer in the group
    u_t = log pi_T(y_t | x, c_i, y_<t) - log pi_old(y_t | x, y_<t)
    token mode (default):  A_t = A_i + lam * u_t ;   logit mode:  L = L_GRPO + lam_sd * D_alpha(pS || pT)   (sd.py)

Diagnostic [derived], logged every step for failed rows i with a peer j: the divergence index
d = longest common token prefix of y_i and y_j (the first token where i left j's path), the share of
negative credit mass within +-w tokens of d, sum_{|t-d|<=w} min(u_t, 0) / sum_t min(u_t, 0) (0 when a
row has no negative credit), and the offset argmin_t u_t - d of the most negative credit token. Every
`--diagnostics-every` steps the same rows are also scored by the answer-only teacher (one extra teacher
pass), giving the `..._answer_only` figures: the paper's claim is that HSD's figures concentrate at d more.
Metrics: hsd/{frac_rows_with_peer, frac_all_fail_groups, frac_rows_diagnosed, div_index_mean} and
hsd/{credit_mass_near_div, argmin_offset_mean, argmin_abs_offset_mean}[_answer_only] (absent on a step
without diagnosed rows; the signed offset can cancel, the absolute one measures concentration).

Choices (ALGORITHMS.md §2.4, marked [choice] there or here):
- `--peer random` (default): uniform among the other successful rows of the group, which keeps the
  peer an exact sample of the success-conditioned policy [derived]; drawn from a generator seeded by
  (seed, rank, step), never the global RNG, so runs and resumes reproduce. `first` / `shortest` ablate it.
- `--on-success peer` (default): a successful row distils toward another success when one exists,
  else toward the answer-only block; `answer`: always answer-only; `skip`: no SD credit or loss
  (token mode: its advantage is A_i alone; logit mode: its rows leave the distillation loss).
- `--feedback` (on by default, as sd.py): the block ends with feedback on the row's own attempt
  (`Your previous attempt was correct/incorrect.`; a code verifier's message), for both teachers.
- The peer's text is its decoded completion, special tokens skipped, nothing stripped; a teacher prompt
  over `--max-teacher-prompt-tokens` has the block shortened from its middle (common/teacher.py).
- `--privileged` is inherited from sd.py and unused: here the context is the method.
- `--div-window` (8) is the w of the diagnostic; `--diagnostics-every 0` turns the extra pass off.
- Teacher weights, credit, loss and their defaults: sd.py's (`--teacher`, `--sd-loss`, `--lam`, ...).

Run:
    python hsd.py                                  # token mode on the toy task
    python hsd.py --sd-loss logit --grpo-coef 0    # pure logit distillation toward the peer-conditioned teacher
    torchrun --nproc_per_node 8 hsd.py --model Qwen/Qwen3-1.7B --dataset math --num-prompts 64 \\
        --max-new-tokens 2048 --max-teacher-prompt-tokens 4096 --learning-rate 1e-6 --total-steps 200
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import grpo
import sd
from common.data import Example
from common.dist import all_reduce
from common.run import setup
from common.verifiers import Verdict


@dataclass
class Args(sd.Args):
    peer: Literal["random", "first", "shortest"] = "random"
    """Which successful peer of the group conditions the teacher: uniform at random, the first, the shortest."""
    on_success: Literal["peer", "answer", "skip"] = "peer"
    """Successful rows: distil toward another success (answer-only without one), the answer only, or not at all."""
    diagnostics_every: int = 1
    """Score with the answer-only teacher too every N steps, for the `_answer_only` diagnostics (0: never)."""
    div_window: int = 8
    """Diagnostic: credit mass counts as near the divergence index d within +- this many tokens."""


# ---------------------------------------------------------------------------------------------------
# The algorithm: peer choice, hindsight context, divergence diagnostics (pure functions).


def choose_peers(correct: torch.Tensor, group_size: int, mode: str, generator: torch.Generator | None = None,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the batch index of a successful other row of its group, or -1 when there is none.

    correct [B] bool with groups contiguous; `random` draws uniformly (iid keys, argmax), `first` takes the
    lowest index, `shortest` the fewest `lengths` tokens (ties: lowest index). A row never picks itself.
    """
    G = group_size
    ok = correct.view(-1, G)
    candidates = ok[:, None, :] & ~torch.eye(G, dtype=torch.bool)  # [P, row, peer]
    if mode == "random":
        key = torch.rand(candidates.shape, generator=generator)
    elif mode == "first":
        key = torch.zeros(candidates.shape)  # argmax returns the first maximal index
    elif mode == "shortest":
        key = -lengths.view(-1, 1, G).float().expand(candidates.shape)
    else:
        raise ValueError(f"unknown peer choice {mode!r}")
    pick = key.masked_fill(~candidates, -math.inf).argmax(-1) + G * torch.arange(ok.shape[0])[:, None]
    return torch.where(candidates.any(-1), pick, -1).reshape(-1)


def hindsight_block(peer_text: str, answer: str) -> str:
    """The privileged block of HSD: a successful peer's full completion, then the ground-truth answer."""
    return f"A correct solution:\n\n{peer_text}\n\nThe correct final answer is: {answer}"


def privileged_block(example: Example, verdict: Verdict, peer_text: str | None, feedback: bool) -> str:
    """c_i: the hindsight block (answer-only without a peer), then sd.py's feedback on the attempt."""
    block = hindsight_block(peer_text, example.answer) if peer_text is not None else sd.answer_block(example)
    return f"{block}\n\n{sd.feedback_sentence(example, verdict)}" if feedback else block


def divergence_index(a_ids: torch.Tensor, b_ids: torch.Tensor, a_len: torch.Tensor, b_len: torch.Tensor) -> torch.Tensor:
    """d = length of the longest common token prefix of a[:a_len] and b[:b_len], per row ([N, T] -> [N])."""
    within = torch.arange(a_ids.shape[-1], device=a_ids.device) < torch.minimum(a_len, b_len)[..., None]
    return ((a_ids == b_ids) & within).long().cumprod(-1).sum(-1)


def credit_mass_near(delta: torch.Tensor, mask: torch.Tensor, d: torch.Tensor, window: int) -> torch.Tensor:
    """Share of negative credit within +-window of d: sum_{|t-d|<=w} min(delta,0) / sum_t min(delta,0); 0 if none."""
    negative = delta.clamp(max=0) * mask
    near = (torch.arange(delta.shape[-1], device=delta.device) - d[..., None]).abs() <= window
    total = negative.sum(-1)
    return torch.where(total < 0, (negative * near).sum(-1) / total, 0.0)


def argmin_offset(delta: torch.Tensor, mask: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """argmin_t delta_t - d over completion tokens: where the most negative credit sits relative to d."""
    return delta.masked_fill(mask == 0, math.inf).argmin(-1) - d


def hsd_metrics(correct: torch.Tensor, peers: torch.Tensor, group_size: int, ids: torch.Tensor, mask: torch.Tensor,
                credits: dict[str, torch.Tensor], window: int) -> dict[str, float]:
    """Peer coverage, then the divergence diagnostics over failed rows with a peer (left out when there are none)."""
    lengths, peer = mask.sum(-1).long(), peers.clamp(min=0)
    d = divergence_index(ids, ids[peer], lengths, lengths[peer])
    rows = (peers >= 0) & ~correct
    n_rows = all_reduce(torch.tensor(float(len(peers)), device=mask.device))
    n = all_reduce(rows.float().sum())
    all_fail = (~correct.view(-1, group_size).any(-1)).float()

    def mean(x: torch.Tensor) -> float:
        return (all_reduce((x.float() * rows).sum()) / n).item()

    out = {"hsd/frac_rows_with_peer": (all_reduce((peers >= 0).float().sum()) / n_rows).item(),
           "hsd/frac_all_fail_groups": (all_reduce(all_fail.sum()) / (n_rows / group_size)).item(),
           "hsd/frac_rows_diagnosed": (n / n_rows).item()}
    if n == 0:  # no failed row with a peer on any rank: nothing to diagnose (JSON has no NaN)
        return out
    out["hsd/div_index_mean"] = mean(d)
    for suffix, credit in credits.items():
        offset = argmin_offset(credit, mask, d)
        out[f"hsd/credit_mass_near_div{suffix}"] = mean(credit_mass_near(credit, mask, d, window))
        out[f"hsd/argmin_offset_mean{suffix}"] = mean(offset)
        out[f"hsd/argmin_abs_offset_mean{suffix}"] = mean(offset.abs())
    return out


def main(args: Args) -> None:
    args = grpo.apply_preset(args)
    run = setup(args, "hsd", with_teacher=args.teacher != "current")
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = grpo.collect_batch(run, args)
        advantages = args.grpo_coef * grpo.group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (logit mode: also the top-k indices to distil over).
        old, _ = grpo.score_old_and_ref(run, args, batch, topk=args.topk if args.sd_loss == "logit" else 0)

        # 3. Teacher context c_i: a successful peer of the same group + the answer (answer only without a peer).
        correct = torch.tensor([v.correct for v in batch.verdicts])
        generator = torch.Generator().manual_seed((args.seed + run.d.rank) * 1_000_003 + step)  # not the global RNG
        peers = choose_peers(correct, args.group_size, args.peer, generator, batch.rollout.lengths.cpu())
        if args.on_success != "peer":
            peers[correct] = -1
        distilled = (~correct if args.on_success == "skip" else torch.ones_like(correct)).to(run.d.device)
        texts = batch.rollout.texts
        blocks = [privileged_block(e, v, texts[p] if p >= 0 else None, args.feedback)
                  for e, v, p in zip(batch.examples, batch.verdicts, peers.tolist())]

        # 4. Teacher scores the same completion tokens: t = log pi_T(y_t | x, c, y_<t).
        t1 = time.perf_counter()
        teacher = sd.score_teacher(run, args, batch, blocks, gather_index=old.get("topk_index"))
        t_teacher = time.perf_counter() - t1

        # 5. Credit u = t - s_old (0 on skipped rows); token advantage A_t = A_i + lam * u or a distillation loss.
        credit = sd.token_credit(teacher["logprobs"], old["logprobs"], mask * distilled[:, None])
        extra = None
        if args.sd_loss == "token":
            token_advantages = advantages[:, None] + args.lam * credit
        else:
            token_advantages = advantages[:, None].expand_as(mask).contiguous()
            extra = sd.distillation_loss(args, old, teacher, distilled.float(), mask)

        # 6. Diagnostics: the answer-only teacher on the same rows, before the update changes the weights.
        #    Every rank scores all its rows, so FSDP ranks run the same forwards.
        credits = {"": credit}
        if args.diagnostics_every > 0 and step % args.diagnostics_every == 0:
            t1 = time.perf_counter()
            answer_only = sd.score_teacher(run, args, batch, [privileged_block(e, v, None, args.feedback)
                                                              for e, v in zip(batch.examples, batch.verdicts)])
            credits["_answer_only"] = sd.token_credit(answer_only["logprobs"], old["logprobs"], mask)
            metrics["perf/diagnostics_s"] = time.perf_counter() - t1

        # 7. Clipped-surrogate update (+ distillation), then the EMA teacher follows.
        metrics |= grpo.ppo_update(run, args, batch, token_advantages, old["logprobs"], None, step, extra)
        if args.teacher == "ema":
            sd.ema_update(run.teacher, run.policy, args.ema_rate)

        metrics |= sd.sd_metrics(credit, teacher, mask, distilled, t_teacher)
        metrics |= hsd_metrics(correct.to(run.d.device), peers.to(run.d.device), args.group_size,
                               batch.rollout.completion_ids, mask, credits, args.div_window)
        grpo.finish_step(run, args, step, t0, metrics, batch, advantages, old)
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
