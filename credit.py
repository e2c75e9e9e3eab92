"""CREDIT: contrastive credit for on-policy self-distillation, keeping only input-specific teacher signal.

Paper: Shen et al. 2026, "From Generic Correlation to Input-Specific Credit in On-Policy Self
Distillation" (arXiv 2605.11613). Source status: SECONDARY. The paper's text and code could not be
read here; two independent secondary sources (an audit note quoting its Eq. 8, Algorithm 1 and
Appendix A Table 3, and a summary of the PDF) agree on what follows. See docs/credit.md.

Idea: part of what makes a self-teacher shown feedback z like a token is generic: it would like it
after any problem, given the same z. CREDIT removes that part with a batch-contrastive baseline, the
teacher re-scored with the problem swapped for an unrelated prompt x' of the same batch:

    S_t(v) = pi_theta(v | x, y_<t)     T_t(v) = pi_T(v | x, z, y_<t)     (student; teacher with feedback z)
    G_t(v) = (1/C) sum_k log pi_T(v | x'_k, z, y_<t)                      (contrast: C unrelated problems)
    R_t(v) = log T_t(v) - log S_t(v) - lam * G_t(v)                        (vocabulary-level reward, Eq. 8)
    L      = lam_sd * mean_t w_t KL(S_t || Q_t),  Q_t(v) ∝ T_t(v) exp(-lam G_t(v))   (reverse-KL distillation)

KL(S || Q) = -E_S[R] + log Z with Z the normaliser of Q, which does not depend on the student: minimising
it ascends the expected vocabulary-level reward, so R drives SDPO's distillation gradient. There is no GRPO term (GRPO and SDPO are the paper's baselines); at lam = 0
this is SDPO's loss, which `sd.py --sd-loss logit --topk-from teacher --jsd-alpha 1 --topk 20
--grpo-coef 0 --teacher ema --ema-rate 0.01` reproduces bit for bit (test).

The paper's recipe, the defaults here [secondary: Table 3]: C = 1 contrast input (`--num-contrast`),
lam = 0.1 (`--contrast-weight`; larger values over-debias), teacher = EMA of the student at rate 0.01
(`--teacher ema --ema-rate 0.01`), reverse KL on the teacher's top-20 plus a tail bucket (the code-task
setting: `--jsd-alpha 1 --topk 20`; the science setting is `--jsd-alpha 0.5 --topk 100`), no GRPO term
(`--grpo-coef 0`), training temperature 1. Its lr 1e-6 and 32 x 8 batches are for 8B models; on the
toy task the shared defaults apply (lr 3e-4, 8 x 8).

Choices the sources leave open, made here:
- Top-k, tail and contrast: T's log-probs at the teacher's own top-k indices plus the tail bucket
  log(1 - sum_topk T); each contrast input's log-probs at the same k indices plus its own tail; G is
  their mean over the C inputs (bucket by bucket, in log space); log Q = log T - lam G renormalised
  over the k + 1 buckets. At lam = 0, Q is T's buckets as they are (they already sum to one), which
  keeps lam = 0 equal to SDPO's loss bit for bit.
- The JSD setting (`--jsd-alpha` between 0 and 1) uses Q in place of T: D_alpha(S || Q).
- w_t = min(exp(s_t - s_old_t), 2) detached, as SDPO (exactly 1 with one update per batch).
- Partners: per prompt group, from a seeded derangement over the batch's prompt groups (never the
  row's own group; all rows of a group share partners); needs at least 2 prompts per rank.
- Teacher context z: sd.py's (reference solution or answer, then feedback on the attempt).
- The contrast pass needs the teacher's top-k indices, so it is a second scoring call after the
  teacher's (all C inputs in one call); the sampled-token contrast is scored with it for the metrics.

The earlier reconstruction, in the GRPO frame (`--sd-loss token --grpo-coef 1 --contrast-weight 0.5
--teacher current`): a one-sample estimate of the same reverse-KL gradient folded into the advantage,

    delta_t = t_t(x_i, z_i) - lam * mean_k t_t(x'_k, z_i) - s_old_t,    A_t = A_i + lam_token * delta_t

with `--lam` as lam_token; at `--contrast-weight 0` it is `sd.py --sd-loss token` bit for bit (test).
Here the main and the C contrast passes are one scoring call of (C+1) x B rows (at contrast weight 0
the main pass is a call of its own, padded exactly as in sd.py).

The GRPO frame's flags are grpo.py's: `--adv-scale`, `--loss-agg`, `--eps-low/--eps-high`, and `--beta`
(the k3 KL to the frozen initial model, logged as `loss/kl`; an `initial` teacher doubles as that
reference). grpo.py's `--preset` and overlong shaping are not offered here; `--dynamic-sampling` is.

Run:
    python credit.py                               # the paper's recipe on the toy task
    python credit.py --sd-loss token --grpo-coef 1 --contrast-weight 0.5 --teacher current   # the GRPO frame
    torchrun --nproc_per_node 8 credit.py --model Qwen/Qwen3-8B --dataset math --num-prompts 32 \
        --max-new-tokens 4096 --max-teacher-prompt-tokens 6144 --learning-rate 1e-6 --total-steps 200
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

from common.args import TrainArgs, check, cli
from common.batch import Batch, collect_batch, score_rollout
from common.dist import all_reduce
from common.example import Example
from common.rollout import select_rows
from common.run import Run, setup
from common.teacher import TEACHER_INSTRUCTION, ema_update, score_teacher
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
    grpo_coef: float = 0.0
    """Scale of the GRPO advantage (CREDIT has no GRPO term; 1 with --sd-loss token gives the GRPO frame)."""

    # Self-distillation (sd.py)
    teacher: Literal["current", "ema", "initial"] = "ema"
    """Teacher weights: an EMA of the policy (CREDIT, SDPO), the current policy, or the frozen initial model."""
    ema_rate: float = 0.01
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step (CREDIT: 0.01)."""
    privileged: Literal["solution", "answer"] = "solution"
    """Privileged block z: the reference solution (answer when missing) or the final answer only."""
    feedback: bool = True
    """Append feedback on the row's own attempt (correct/incorrect; the verifier's message for code)."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    teacher_instruction: str = TEACHER_INSTRUCTION
    """The teacher prompt's last line, after the privileged block ("" for none)."""
    sd_loss: Literal["logit", "token"] = "logit"
    """`logit`: distil toward Q ∝ T exp(-lam G) (the paper); `token`: fold the sampled-token credit into A_i."""
    lam_sd: float = 1.0
    """Logit mode: weight of the distillation loss."""
    jsd_alpha: float = 1.0
    """Logit mode: generalized JSD mixture weight (1: reverse KL(S||Q), the paper's code setting; 0.5: JSD)."""
    topk: int = 20
    """Logit mode: distil over the teacher's top-k tokens plus one tail bucket (the paper: 20, or 100 with JSD)."""
    is_clip: float = 2.0
    """Logit mode: clip of the detached importance weight exp(s - s_old)."""
    lam: float = 0.5
    """Token mode: weight of the credit delta in the token advantage."""

    # CREDIT
    contrast_weight: float = 0.1
    """lam of Eq. 8: weight of the contrastive baseline G (0 reproduces sd.py, in either mode)."""
    num_contrast: int = 1
    """C: unrelated prompts per row (distinct while C < P); their log-probs are averaged in log space."""

    def validate(self) -> None:
        super().validate()
        check(self.eps_low, "eps_low", 0, 1, high_open=True)
        check(self.eps_high, "eps_high", low=0)
        check(self.beta, "beta", low=0)
        check(self.grpo_coef, "grpo_coef", low=0)
        check(self.ema_rate, "ema_rate", 0, 1, low_open=True)
        check(self.max_teacher_prompt_tokens, "max_teacher_prompt_tokens", low=1)
        check(self.lam, "lam")
        check(self.lam_sd, "lam_sd", low=0)
        check(self.jsd_alpha, "jsd_alpha", 0, 1)
        check(self.topk, "topk", low=1)
        check(self.is_clip, "is_clip", low=0, low_open=True)
        check(self.contrast_weight, "contrast_weight", low=0)
        check(self.num_contrast, "num_contrast", low=1)


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


# Same as sd.py: generalized_jsd
def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_alpha over the last dim of log-probs: (1-a) KL(S||M) + a KL(T||M), M = (1-a) pS + a pT.

    alpha = 0 is KL(T||S) and alpha = 1 is KL(S||T) (the mixture form vanishes at the ends).
    """
    def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    if alpha == 0:
        return kl(teacher, student)
    if alpha == 1:
        return kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - alpha), teacher + math.log(alpha)]), dim=0)
    return (1 - alpha) * kl(student, mixture) + alpha * kl(teacher, mixture)


# Same as sd.py: distillation_loss
def distillation_loss(mb: MicroBatch, args: Args, old_logprobs: torch.Tensor, teacher_gathered: torch.Tensor,
                      distill_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit mode: lam_sd * token mean over distilled rows of w_t * D_alpha(student top-k || teacher top-k); its sum.

    w_t = min(exp(s_t - s_old_t), is_clip), detached; gradients flow only through the student.
    """
    weight = torch.exp(mb.out["logprobs"] - old_logprobs[mb.rows]).clamp(max=args.is_clip).detach()
    per_token = weight * generalized_jsd(mb.out["gathered"], teacher_gathered[mb.rows].detach(), args.jsd_alpha)
    masked = per_token * distill_mask[mb.rows]
    return args.lam_sd * masked.sum() / mb.tokens["distill"], masked.sum()


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
    by its own generator (never the global RNG), so lam and C leave the rest of the run unchanged.
    """
    require_partners(num_groups)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_groups))
    position = order.argsort()  # where each group sits in the cycle
    offsets = 1 + torch.arange(k) % (num_groups - 1)
    return order[(position[:, None] + offsets) % num_groups].repeat_interleave(group_size, dim=0)


def contrastive_credit(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       weight: float, mask: torch.Tensor) -> torch.Tensor:
    """Token mode: delta = t(x_i, z_i) - lam * mean_k t(x'_k, z_i) - s_old on completion tokens, 0 on padding.

    contrast_logprobs is [K, B, T]; the K partners are averaged in log space, i.e. the arithmetic mean
    of their log-probs. Computed as u - lam * c so that lam = 0 gives token_credit's floats (sd.py's) exactly.
    """
    return token_credit(teacher_logprobs, old_logprobs, mask) - weight * contrast_logprobs.mean(0).detach() * mask


def score_with_problems(run: Run, args: Args, batch: Batch, blocks: list[str], groups: torch.Tensor,
                        gather_index: torch.Tensor | None = None) -> dict:
    """Teacher scores [K, B, ...] of row i's own completion and block z_i after the problem of prompt group
    groups[i, k] (`logprobs` is t(x_{g_k(i)}, z_i)), for all k in one scoring call; with `gather_index`
    [B, T, k] also their log-probs at those indices + tail (`gathered`)."""
    B, K = groups.shape
    problems = [batch.examples[g * args.group_size].prompt for g in groups.T.reshape(-1).tolist()]
    tiled = dataclasses.replace(batch, rollout=select_rows(batch.rollout, list(range(B)) * K))  # K copies of the rows
    index = gather_index.repeat(K, 1, 1) if gather_index is not None else None
    scores = score_teacher(run, tiled, blocks * K, args.max_teacher_prompt_tokens, problems, gather_index=index,
                           instruction=args.teacher_instruction)
    return {k: v.view(K, B, *v.shape[1:]) for k, v in scores.items()}


def contrastive_target(teacher_gathered: torch.Tensor, contrast_gathered: torch.Tensor, weight: float) -> torch.Tensor:
    """log Q = log T - lam * G over the teacher's top-k + tail buckets, renormalised (Q ∝ T exp(-lam G), Eq. 8).

    teacher_gathered [B, T, k+1]; contrast_gathered [C, B, T, k+1], whose mean over C is G. At lam = 0
    T's buckets are returned as they are: they already sum to one, so the loss is SDPO's bit for bit.
    """
    if weight == 0:
        return teacher_gathered
    logits = teacher_gathered - weight * contrast_gathered.mean(0)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def credit_metrics(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   credit: torch.Tensor, weight: float, mask: torch.Tensor) -> dict[str, float]:
    """The subtracted term, its Pearson correlation with t, what is left of t, and sign flips versus sd.py."""
    t, c = teacher_logprobs.double(), contrast_logprobs.mean(0).double()
    flipped = torch.sign(credit) != torch.sign(token_credit(teacher_logprobs, old_logprobs, mask))
    m = mask.double()
    n, sub, left, flips, st, sc, stt, scc, stc = all_reduce(torch.stack(
        [m.sum()] + [(x * m).sum() for x in (weight * c, t - weight * c, flipped.double(), t, c, t * t, c * c, t * c)])).tolist()
    cov, var_t, var_c = stc / n - st * sc / n ** 2, stt / n - (st / n) ** 2, scc / n - (sc / n) ** 2
    return {"credit/contrast_mean": sub / n, "credit/input_specific_mean": left / n, "credit/sign_flip_frac": flips / n,
            "credit/corr_teacher_contrast": cov / max(math.sqrt(max(var_t * var_c, 0.0)), 1e-12)}


def main(args: Args) -> None:
    require_partners(args.num_prompts // int(os.environ.get("WORLD_SIZE", "1")))  # fail before any work
    run = setup(args, "credit", teacher_weights=args.teacher, reference=args.beta > 0)
    logit = args.sd_loss == "logit"
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i (0 at the paper's --grpo-coef 0).
        batch = collect_batch(run)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old, reference log-probs.
        old = score_rollout(run, batch, with_entropy=True)
        ref_logprobs = score_rollout(run, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context z_i as sd.py; C partner prompts x'_k from other prompt groups of the batch.
        blocks = [privileged_block(e, v, args.privileged, args.feedback) for e, v in zip(batch.examples, batch.verdicts)]
        partners = contrast_partners(run.local_prompts, args.group_size, args.num_contrast, (args.seed, run.d.rank, step))

        # 4. Teacher T_t = pi_T(. | x_i, z_i, y_<t) and contrast G_t from pi_T(. | x'_k, z_i, y_<t) on the same tokens.
        own = torch.arange(mask.shape[0], device=partners.device)[:, None] // args.group_size
        if logit:  # T at its own top-k + tail, then the C contrasts at T's indices (they must be known first)
            teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens, topk=args.topk, gather_topk=True,
                                    instruction=args.teacher_instruction)
            contrast_scores = score_with_problems(run, args, batch, blocks, partners, teacher["topk_index"])
        elif args.contrast_weight > 0:  # sampled tokens only: the main and the C contrast passes in one call
            scores = score_with_problems(run, args, batch, blocks, torch.cat([own, partners], 1))
            teacher, contrast_scores = {k: v[0] for k, v in scores.items()}, {"logprobs": scores["logprobs"][1:]}
        else:  # padded exactly as sd.py's pass, so that lam = 0 is sd.py bit for bit
            teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens, instruction=args.teacher_instruction)
            contrast_scores = score_with_problems(run, args, batch, blocks, partners)
        contrast = contrast_scores["logprobs"]
        t_teach = time.perf_counter()

        # 5. Logit mode: the target Q_t ∝ T_t exp(-lam G_t) (Eq. 8). Token mode: the sampled-token credit
        #    delta = t - lam * mean_k c_k - s_old and the token advantage A_t = A_i + lam_token * delta.
        credit = contrastive_credit(teacher["logprobs"], contrast, old["logprobs"], args.contrast_weight, mask)
        distilled = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        if logit:
            target = contrastive_target(teacher["gathered"], contrast_scores["gathered"], args.contrast_weight)
            token_advantages = advantages[:, None].expand_as(mask).contiguous()
        else:
            token_advantages = advantages[:, None] + args.lam * credit

        def loss_fn(mb: MicroBatch):
            loss, stats = policy_loss(mb, args, token_advantages, old["logprobs"], ref_logprobs)
            if logit:  # lam_sd * mean_t w_t KL(S_t || Q_t) on the teacher's top-k + tail
                distill, stats["loss/distill"] = distillation_loss(mb, args, old["logprobs"], target, mask)
                loss = loss + distill
            return loss, stats

        # 6. Update (distillation, + the surrogate if --grpo-coef > 0), then the EMA teacher follows.
        metrics |= optimize(run, batch, loss_fn, step, token_masks={"distill": mask} if logit else None,
                            stat_masks={"loss/distill": "distill"},
                            row_inputs={"gather_index": teacher["topk_index"]} if logit else None)
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        metrics |= sd_metrics(credit, teacher, mask, distilled, t_teach - t_score)
        metrics |= credit_metrics(teacher["logprobs"], contrast, old["logprobs"], credit, args.contrast_weight, mask)
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_teach}
        run.end_step(step, t0, metrics, batch, advantages, old["entropy"])
    run.close()


if __name__ == "__main__":
    main(cli(Args))
