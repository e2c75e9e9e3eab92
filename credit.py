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
- Token mode only: `--sd-loss logit` is refused (the contrast is a credit, not a divergence target).
- Everything else (teacher weights `--teacher`, privileged block `--privileged`, `--feedback`, the
  teacher prompt) as sd.py.

Cost: K extra teacher forwards of B rows per step. With alpha > 0 the main teacher pass and the K
contrast passes are one scoring call of (K+1) x B rows, micro-batched by `--micro-batch-rows` (raise
it to use more memory for fewer, larger forwards). With alpha = 0 the main pass is a call of its own,
padded exactly as in sd.py, so that it reproduces sd.py bit for bit (other padding changes float
rounding); the contrast term is still scored for the metrics.

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

import numpy as np
import torch
import tyro

import grpo
import sd
from common.dist import all_reduce
from common.rollout import select_rows
from common.run import Run, setup


@dataclass
class Args(sd.Args):
    alpha: float = 0.5
    """Weight of the contrastive baseline mean_k t(x'_k, z_i) in the credit (0 reproduces sd.py)."""
    num_contrast: int = 1
    """K: partner prompts per row (distinct while K < P); their teacher log-probs are averaged in log space."""


# ---------------------------------------------------------------------------------------------------
# The algorithm: contrastive partners and credit (pure functions).


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
    of their log-probs. Computed as u - alpha * c so that alpha = 0 gives sd.token_credit's floats exactly.
    """
    return sd.token_credit(teacher_logprobs, old_logprobs, mask) - alpha * contrast_logprobs.mean(0).detach() * mask


# ---------------------------------------------------------------------------------------------------
# The contrastive teacher pass and its statistics.


def score_with_problems(run: Run, args: Args, batch: grpo.Batch, blocks: list[str], groups: torch.Tensor) -> dict:
    """Teacher scores [K, B, ...] of row i's own completion and block z_i after the problem of prompt group
    groups[i, k] (`logprobs` is t(x_{g_k(i)}, z_i)), for all k in one scoring call."""
    B, K = groups.shape
    problems = [batch.examples[g * args.group_size].prompt for g in groups.T.reshape(-1).tolist()]
    tiled = dataclasses.replace(batch, rollout=select_rows(batch.rollout, list(range(B)) * K))  # K copies of the rows
    return {k: v.view(K, B, *v.shape[1:]) for k, v in sd.score_teacher(run, args, tiled, blocks * K, problems).items()}


def credit_metrics(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   credit: torch.Tensor, alpha: float, mask: torch.Tensor) -> dict[str, float]:
    """The subtracted term, its Pearson correlation with t, what is left of t, and sign flips versus sd.py."""
    t, c = teacher_logprobs.double(), contrast_logprobs.mean(0).double()
    flipped = torch.sign(credit) != torch.sign(sd.token_credit(teacher_logprobs, old_logprobs, mask))
    m = mask.double()
    n, sub, left, flips, st, sc, stt, scc, stc = all_reduce(torch.stack(
        [m.sum()] + [(x * m).sum() for x in (alpha * c, t - alpha * c, flipped.double(), t, c, t * t, c * c, t * c)])).tolist()
    cov, var_t, var_c = stc / n - st * sc / n ** 2, stt / n - (st / n) ** 2, scc / n - (sc / n) ** 2
    return {"credit/contrast_mean": sub / n, "credit/input_specific_mean": left / n, "credit/sign_flip_frac": flips / n,
            "credit/corr_teacher_contrast": cov / max(math.sqrt(max(var_t * var_c, 0.0)), 1e-12)}


def main(args: Args) -> None:
    args = grpo.apply_preset(args)
    if args.sd_loss != "token":
        raise ValueError("credit.py folds its contrastive credit into the advantage: drop --sd-loss logit (token mode only)")
    require_partners(args.num_prompts // int(os.environ.get("WORLD_SIZE", "1")))  # fail before any work
    run = setup(args, "credit", with_teacher=args.teacher != "current")
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = grpo.collect_batch(run, args)
        advantages = args.grpo_coef * grpo.group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old.
        old, _ = grpo.score_old_and_ref(run, args, batch)

        # 3. Teacher context z_i as sd.py; K partner prompts x'_k from other prompt groups of the batch.
        blocks = [sd.privileged_block(e, v, args.privileged, args.feedback) for e, v in zip(batch.examples, batch.verdicts)]
        partners = contrast_partners(run.local_prompts, args.group_size, args.num_contrast, (args.seed, run.d.rank, step))

        # 4. Teacher scores the same completion tokens: t = t(x_i, z_i) and c_k = t(x'_k, z_i), in one call
        # (alpha = 0: t alone, padded as in sd.py, then the c_k).
        t1 = time.perf_counter()
        own = torch.arange(mask.shape[0], device=partners.device)[:, None] // args.group_size
        if args.alpha > 0:
            scores = score_with_problems(run, args, batch, blocks, torch.cat([own, partners], 1))
            teacher, contrast = {k: v[0] for k, v in scores.items()}, scores["logprobs"][1:]
        else:
            teacher = sd.score_teacher(run, args, batch, blocks)
            contrast = score_with_problems(run, args, batch, blocks, partners)["logprobs"]
        t_teacher = time.perf_counter() - t1

        # 5. Credit delta = t - alpha * mean_k c_k - s_old; token advantage A_t = A_i + lam * delta.
        credit = contrastive_credit(teacher["logprobs"], contrast, old["logprobs"], args.alpha, mask)
        distilled = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        token_advantages = advantages[:, None] + args.lam * credit

        # 6. Clipped-surrogate update, then the EMA teacher follows.
        metrics |= grpo.ppo_update(run, args, batch, token_advantages, old["logprobs"], None, step)
        if args.teacher == "ema":
            sd.ema_update(run.teacher, run.policy, args.ema_rate)

        metrics |= sd.sd_metrics(credit, teacher, mask, distilled, t_teacher)
        metrics |= credit_metrics(teacher["logprobs"], contrast, old["logprobs"], credit, args.alpha, mask)
        grpo.finish_step(run, args, step, t0, metrics, batch, advantages, old)
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
