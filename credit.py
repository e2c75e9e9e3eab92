"""CREDIT: contrastive credit for on-policy self-distillation, keeping only input-specific teacher signal.

Paper: Shen et al. 2026, "From Generic Correlation to Input-Specific Credit in On-Policy Self
Distillation" (arXiv 2605.11613). Built on sd.py's frame (ALGORITHMS.md §2); only the credit changes.

Idea: the SD token reward u_t = t_t - s_old_t sums to pMI(y; z | x), but part of what makes the
teacher like a token is generic (it would like it after any problem, given the same hint z). Remove
that part with a batch-contrastive baseline: re-score the same completion with the problem text of
unrelated prompts x'_k from the batch, keeping row i's privileged block z_i, and subtract it:

    t_t(x, z)  = log pi_T(y_t | x, z, y_<t)                  (teacher log-prob of the sampled token, §0)
    delta_t    = t_t(x_i, z_i) - alpha * mean_k t_t(x'_k, z_i) - s_old_t           (contrastive credit)
    A_t        = A_i + lam * delta_t                          (token advantage, clipped surrogate of §1)

RECONSTRUCTED: the paper's body and code were unavailable; the formula above is rebuilt from its
abstract (the reward is a Bayesian filtering increment summing to pMI; a batch-contrastive baseline
penalises responses that stay likely under unrelated inputs of the same batch) and independent notes.

Choices (ALGORITHMS.md §2.2, marked [choice] there):
- `--alpha` (default 0.5): weight of the contrastive baseline; 0 is exactly `sd.py --sd-loss token`.
- `--num-contrast K` (default 1): partners per row, from a seeded derangement over the batch's prompt
  groups (never the row's own group; all rows of a group share partners); the K teacher log-probs are
  averaged in log space (their arithmetic mean). Needs at least 2 prompts per rank.
- Token mode only (the contrast is a credit, not a divergence target): there is no `--sd-loss`.
- Everything else (teacher weights `--teacher`, privileged block `--privileged`, `--feedback`, the
  teacher prompt) as sd.py.

Cost: K extra teacher forwards of B rows per step. With alpha > 0 the main teacher pass and the K
contrast passes are one scoring call of (K+1) x B rows, micro-batched by `--micro-batch-rows` (raise
it to use more memory for fewer, larger forwards). With alpha = 0 the main pass is a call of its own,
padded exactly as in sd.py, so that it reproduces sd.py bit for bit (other padding changes float
rounding); the contrast term is still scored for the metrics.

The GRPO frame's flags are grpo.py's: `--adv-scale`, `--loss-agg`, `--eps-low/--eps-high`, and `--beta`
(the k3 KL to the frozen initial model, logged as `loss/kl`; an `initial` teacher doubles as that
reference). grpo.py's `--preset` and overlong shaping are not offered here; `--dynamic-sampling` is.

Run:
    python credit.py                               # the toy task, alpha 0.5, one partner
    torchrun --nproc_per_node 8 credit.py --model Qwen/Qwen3-1.7B --dataset math --num-prompts 64 \\
        --max-new-tokens 2048 --max-teacher-prompt-tokens 4096 --learning-rate 1e-6 --total-steps 200
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

from common.args import TrainArgs
from common.batch import Batch, collect_batch, score_rollout
from common.dist import all_reduce
from common.example import Example
from common.rollout import select_rows
from common.run import Run, setup
from common.teacher import ema_update, score_teacher
from common.tracking import warn_once
from common.update import MicroBatch, optimize
from common.verifiers import Verdict


@dataclass
class Args(TrainArgs):
    """CREDIT: self-distillation credit minus a batch-contrastive baseline (the teacher scored after other problems)."""

    # The GRPO frame (grpo.py)
    adv_scale: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group std, the batch std, or nothing (Dr. GRPO)."""
    loss_agg: Literal["sequence", "token", "constant"] = "token"
    """Loss aggregation: per-row mean (GRPO), token mean (DAPO), or / (rows * max_new_tokens) (Dr. GRPO)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (DAPO clip-higher)."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the frozen initial model (0 disables the reference model)."""
    grpo_coef: float = 1.0
    """Scale of the GRPO advantage."""

    # Self-distillation (sd.py)
    teacher: Literal["current", "ema", "initial"] = "current"
    """Teacher weights: the current policy, an EMA of it (SDPO), or the frozen initial model (OPSD)."""
    ema_rate: float = 0.05
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step."""
    privileged: Literal["solution", "answer"] = "solution"
    """Privileged block z: the reference solution (answer when missing) or the final answer only."""
    feedback: bool = True
    """Append feedback on the row's own attempt (correct/incorrect; the verifier's message for code)."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    lam: float = 0.5
    """Weight of the credit delta in the token advantage (0 reproduces grpo.py)."""

    # CREDIT
    alpha: float = 0.5
    """Weight of the contrastive baseline mean_k t(x'_k, z_i) in the credit (0 reproduces sd.py)."""
    num_contrast: int = 1
    """K: partner prompts per row (distinct while K < P); their teacher log-probs are averaged in log space."""


# ---------------------------------------------------------------------------------------------------
# The GRPO frame: advantage, surrogate, KL, aggregation (copied from grpo.py, kept identical by a test).


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
def policy_loss(mb: MicroBatch, args: Args, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
                ref_logprobs: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's clipped surrogate on token advantages [B, T], aggregated, + beta * k3 KL; and its sums.

    `old_logprobs=None`: this forward is the rollout policy itself (one epoch, one minibatch), so its
    detached log-probs are pi_old and rho == 1.
    """
    logprobs, m, adv = mb.out["logprobs"], mb.mask, advantages[mb.rows]
    old = logprobs.detach() if old_logprobs is None else old_logprobs[mb.rows]
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


# ---------------------------------------------------------------------------------------------------
# sd.py's teacher context and token credit (copied, kept identical by a test).


# Same as sd.py: feedback_sentence
def feedback_sentence(example: Example, verdict: Verdict) -> str:
    """SDPO-style feedback on the row's own attempt; code tasks get the verifier's message."""
    if example.task == "code":
        return f"Feedback on your previous attempt: {verdict.feedback}"
    return "Your previous attempt was correct." if verdict.correct else "Your previous attempt was incorrect."


# Same as sd.py: answer_block
def answer_block(example: Example) -> str:
    """The endpoint cue: only the final answer."""
    return f"The correct final answer is: {example.answer}"


# Same as sd.py: reference_block
def reference_block(example: Example, mode: str) -> str:
    """The dataset's reference solution (`solution`; the answer when there is none) or the answer only."""
    if mode == "solution" and example.solution:
        return example.solution
    if mode == "solution":
        warn_once("no-solution", "note: examples without a reference solution use the answer-only block")
    return answer_block(example)


# Same as sd.py: privileged_block
def privileged_block(example: Example, verdict: Verdict, mode: str, feedback: bool) -> str:
    """c_i for sd.py: the reference solution (or the answer), then feedback on the attempt."""
    block = reference_block(example, mode)
    return f"{block}\n\n{feedback_sentence(example, verdict)}" if feedback else block


# Same as sd.py: token_credit
def token_credit(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = t - s_old on completion tokens, 0 on padding (all detached)."""
    return (teacher_logprobs - old_logprobs).detach() * mask


# Same as sd.py: sd_metrics
def sd_metrics(credit: torch.Tensor, teacher: dict, mask: torch.Tensor, distilled: torch.Tensor, t_teacher: float) -> dict:
    """Credit, pMI and teacher statistics over completion tokens (averaged over ranks)."""
    n_tokens, n_rows = all_reduce(mask.sum()), all_reduce(torch.tensor(float(mask.shape[0])))
    return {"sd/credit_mean": (all_reduce(credit.sum()) / n_tokens).item(),
            "sd/credit_abs_mean": (all_reduce(credit.abs().sum()) / n_tokens).item(),
            "sd/pmi_seq_mean": (all_reduce(credit.sum()) / n_rows).item(),
            "sd/teacher_logp_mean": (all_reduce((teacher["logprobs"] * mask).sum()) / n_tokens).item(),
            "sd/teacher_prompt_len": (all_reduce(teacher["prompt_len"].sum()) / n_rows).item(),
            "sd/frac_shortened": (all_reduce(teacher["shortened"].sum()) / n_rows).item(),
            "sd/frac_rows_distilled": (all_reduce(distilled.float().sum()) / n_rows).item(),
            "perf/teacher_s": t_teacher}


# ---------------------------------------------------------------------------------------------------
# The algorithm: contrastive partners and credit (pure functions), the contrastive teacher pass.


def require_partners(num_groups: int) -> None:
    """A row's partner must come from another prompt group of the (per-rank) batch."""
    if num_groups < 2:
        raise ValueError(f"CREDIT contrasts each prompt with another prompt of the same batch, but a rank holds "
                         f"{num_groups} prompt(s): raise --num-prompts to at least 2 x the number of ranks")


def contrast_partners(num_groups: int, group_size: int, k: int, seed: int | tuple[int, ...]) -> torch.Tensor:
    """Partner prompt group of each row for each k, [B, K]: a seeded derangement over the P groups.

    Groups are put in a random cyclic order pi; the group at position j gets pi[j + o_k mod P] with
    offsets o_k = 1, 2, ..., P-1, 1, 2, ...: never itself, and min(K, P-1) distinct partners. Seeded
    by its own generator (never the global RNG), so alpha and K leave the rest of the run unchanged.
    """
    require_partners(num_groups)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_groups))
    position = order.argsort()  # where each group sits in the cycle
    offsets = 1 + torch.arange(k) % (num_groups - 1)
    return order[(position[:, None] + offsets) % num_groups].repeat_interleave(group_size, dim=0)


def contrastive_credit(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       alpha: float, mask: torch.Tensor) -> torch.Tensor:
    """delta = t(x_i, z_i) - alpha * mean_k t(x'_k, z_i) - s_old on completion tokens, 0 on padding.

    contrast_logprobs is [K, B, T]; the K partners are averaged in log space, i.e. the arithmetic mean
    of their log-probs. Computed as u - alpha * c so that alpha = 0 gives token_credit's floats (sd.py's) exactly.
    """
    return token_credit(teacher_logprobs, old_logprobs, mask) - alpha * contrast_logprobs.mean(0).detach() * mask


def score_with_problems(run: Run, args: Args, batch: Batch, blocks: list[str], groups: torch.Tensor) -> dict:
    """Teacher scores [K, B, ...] of row i's own completion and block z_i after the problem of prompt group
    groups[i, k] (`logprobs` is t(x_{g_k(i)}, z_i)), for all k in one scoring call."""
    B, K = groups.shape
    problems = [batch.examples[g * args.group_size].prompt for g in groups.T.reshape(-1).tolist()]
    tiled = dataclasses.replace(batch, rollout=select_rows(batch.rollout, list(range(B)) * K))  # K copies of the rows
    return {k: v.view(K, B, *v.shape[1:]) for k, v in score_teacher(run, tiled, blocks * K, args.max_teacher_prompt_tokens, problems).items()}


def credit_metrics(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   credit: torch.Tensor, alpha: float, mask: torch.Tensor) -> dict[str, float]:
    """The subtracted term, its Pearson correlation with t, what is left of t, and sign flips versus sd.py."""
    t, c = teacher_logprobs.double(), contrast_logprobs.mean(0).double()
    flipped = torch.sign(credit) != torch.sign(token_credit(teacher_logprobs, old_logprobs, mask))
    m = mask.double()
    n, sub, left, flips, st, sc, stt, scc, stc = all_reduce(torch.stack(
        [m.sum()] + [(x * m).sum() for x in (alpha * c, t - alpha * c, flipped.double(), t, c, t * t, c * c, t * c)])).tolist()
    cov, var_t, var_c = stc / n - st * sc / n ** 2, stt / n - (st / n) ** 2, scc / n - (sc / n) ** 2
    return {"credit/contrast_mean": sub / n, "credit/input_specific_mean": left / n, "credit/sign_flip_frac": flips / n,
            "credit/corr_teacher_contrast": cov / max(math.sqrt(max(var_t * var_c, 0.0)), 1e-12)}


def main(args: Args) -> None:
    require_partners(args.num_prompts // int(os.environ.get("WORLD_SIZE", "1")))  # fail before any work
    run = setup(args, "credit", teacher_weights=args.teacher, reference=args.beta > 0)
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = collect_batch(run)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old, reference log-probs.
        old = score_rollout(run, batch, with_entropy=True)
        ref_logprobs = score_rollout(run, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context z_i as sd.py; K partner prompts x'_k from other prompt groups of the batch.
        blocks = [privileged_block(e, v, args.privileged, args.feedback) for e, v in zip(batch.examples, batch.verdicts)]
        partners = contrast_partners(run.local_prompts, args.group_size, args.num_contrast, (args.seed, run.d.rank, step))

        # 4. Teacher scores the same completion tokens: t = t(x_i, z_i) and c_k = t(x'_k, z_i), in one call
        # (alpha = 0: t alone, padded as in sd.py, then the c_k).
        own = torch.arange(mask.shape[0], device=partners.device)[:, None] // args.group_size
        if args.alpha > 0:
            scores = score_with_problems(run, args, batch, blocks, torch.cat([own, partners], 1))
            teacher, contrast = {k: v[0] for k, v in scores.items()}, scores["logprobs"][1:]
        else:
            teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens)
            contrast = score_with_problems(run, args, batch, blocks, partners)["logprobs"]
        t_teach = time.perf_counter()

        # 5. Credit delta = t - alpha * mean_k c_k - s_old; token advantage A_t = A_i + lam * delta.
        credit = contrastive_credit(teacher["logprobs"], contrast, old["logprobs"], args.alpha, mask)
        distilled = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        token_advantages = advantages[:, None] + args.lam * credit

        # 6. Clipped-surrogate update, then the EMA teacher follows.
        metrics |= optimize(run, batch, lambda mb: policy_loss(mb, args, token_advantages, old["logprobs"], ref_logprobs), step)
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        metrics |= sd_metrics(credit, teacher, mask, distilled, t_teach - t_score)
        metrics |= credit_metrics(teacher["logprobs"], contrast, old["logprobs"], credit, args.alpha, mask)
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_teach}
        run.end_step(step, t0, metrics, batch, advantages, old["entropy"])
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
