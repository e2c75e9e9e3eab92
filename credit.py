"""CREDIT: contrastive credit for on-policy self-distillation, keeping only input-specific teacher signal.

Paper: Shen et al. 2026, "From Generic Correlation to Input-Specific Credit in On-Policy Self
Distillation" (arXiv 2605.11613). Sources: SECONDARY (the paper's text and code could not be read
here; two independent summaries agree). See docs/credit.md.

Idea: CREDIT is SDPO plus a correction. Part of what makes a self-teacher shown feedback z like a token
is generic: it would like it after any problem. CREDIT subtracts the teacher re-scored with the
problem swapped for an unrelated prompt x' of the same batch:

    S_t(v) = pi_theta(v | x, y_<t)     T_t(v) = pi_T(v | x, z, y_<t)     (student; teacher with SDPO's z)
    G_t(v) = (1/C) sum_k log pi_T(v | x'_k, z, y_<t)                      (contrast: C unrelated problems)
    R_t(v) = log T_t(v) - log S_t(v) - lam * G_t(v)                        (vocabulary-level reward, Eq. 8)
    L      = lam_sd * mean_t w_t D_alpha(S_t || Q_t),  Q_t(v) ∝ T_t(v) exp(-lam G_t(v))   (SDPO's loss on Q)

z and the masking are SDPO's (rows with neither a successful peer nor feedback are not distilled).
Defaults [secondary, Table 3]: C = 1, lam = 0.1, EMA teacher 0.01, reverse KL on the student's top-20
+ a tail bucket, no GRPO term. `--contrast-weight 0` is `sd.py --preset sdpo --ema-rate 0.01
--jsd-alpha 1 --topk 20` bit for bit.

Run:
    python credit.py                               # the paper's recipe on the toy task
    torchrun --nproc_per_node 8 credit.py --model Qwen/Qwen3-8B --dataset math --num-prompts 32 \\
        --max-new-tokens 4096 --max-teacher-prompt-tokens 6144 --learning-rate 1e-6 --total-steps 200
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.args import TrainArgs, check, cli, world_size
from common.batch import Batch, collect_batch, score_rollout
from common.dist import all_reduce
from common.example import Example, Verdict
from common.run import Run, setup
from common.teacher import (
    ScoredOnce,
    TeacherMessage,
    choose_peers,
    coverage_metrics,
    ema_update,
    score_teacher,
    teacher_metrics,
)
from common.update import MicroBatch, Update


@dataclass
class Args(TrainArgs):
    """CREDIT: SDPO's self-distillation toward a teacher minus a batch-contrastive baseline (other problems)."""

    grpo_coef: float = 0.0
    """Scale of a GRPO term added to the distillation (CREDIT has none; 1: a reward term against drift)."""

    # Self-distillation (SDPO)
    teacher: Literal["current", "ema", "initial"] = "ema"
    """Teacher weights: an EMA of the policy (CREDIT, SDPO), the current policy, or the frozen initial model."""
    ema_rate: float = 0.01
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step (CREDIT: 0.01)."""
    env_feedback: bool = True
    """Show the environment's feedback on a failed attempt (code: the failing tests) when no peer succeeded."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    lam_sd: float = 1.0
    """Weight of the distillation loss."""
    jsd_alpha: float = 1.0
    """Generalized JSD mixture weight (1: reverse KL(S||Q), the paper's code setting; 0.5: JSD)."""
    topk: int = 20
    """Distil over the student's top-k tokens plus one tail bucket (the paper: 20, or 100 with JSD)."""
    is_clip: float = 2.0
    """Clip of the detached importance weight exp(s - s_old)."""

    # CREDIT
    contrast_weight: float = 0.1
    """lam of Eq. 8: weight of the contrastive baseline G (0 reproduces sd.py --preset sdpo)."""
    num_contrast: int = 1
    """C: unrelated prompts per row (distinct while C < P); their log-probs are averaged in log space."""

    def validate(self) -> None:
        super().validate()
        check(self.grpo_coef, "grpo_coef", low=0)
        check(self.ema_rate, "ema_rate", 0, 1, low_open=True)
        check(self.max_teacher_prompt_tokens, "max_teacher_prompt_tokens", low=1)
        check(self.lam_sd, "lam_sd", low=0)
        check(self.jsd_alpha, "jsd_alpha", 0, 1)
        check(self.topk, "topk", low=1)
        check(self.is_clip, "is_clip", low=0, low_open=True)
        check(self.contrast_weight, "contrast_weight", low=0)
        check(self.num_contrast, "num_contrast", low=1)
        check(self.num_prompts // world_size(), "num_prompts", low=2, why=f"CREDIT contrasts each prompt with another "
              f"prompt of the same batch, so each of the {world_size()} rank(s) needs 2 or more")


SDPO_SUCCESS = 0.5
"""SDPO's success_reward_threshold: a rollout with at least this reward is a demonstration for its group."""


def contrast_partners(num_groups: int, group_size: int, k: int, seed: int | tuple[int, ...]) -> torch.Tensor:
    """Partner prompt group of each row for each k, [B, K]: a seeded derangement over the P groups.

    Groups are put in a random cyclic order pi; the group at position j gets pi[j + o_k mod P] with
    offsets o_k = 1, 2, ..., P-1, 1, 2, ...: never itself, and min(K, P-1) distinct partners. Seeded
    by its own generator (never the global RNG), so lam and C leave the rest of the run unchanged.
    """
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_groups))
    position = order.argsort()  # where each group sits in the cycle
    offsets = 1 + torch.arange(k) % (num_groups - 1)
    return order[(position[:, None] + offsets) % num_groups].repeat_interleave(group_size, dim=0)


def score_with_problems(run: Run, args: Args, batch: Batch, contexts: list[tuple[str | None, str | None]],
                        rows: list[int], problem_rows: list[int], gather_index: torch.Tensor) -> dict:
    """Teacher scores of row rows[j]'s own completion and SDPO context after the problem of row problem_rows[j],
    all in one scoring call, with its log-probs at `gather_index` [j, T, k] (the student's top-k) + tail."""
    messages = [sdpo_message(batch.examples[q].prompt, *contexts[i]) for i, q in zip(rows, problem_rows)]
    return score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens, rows, gather_index)


def teacher_and_contrast(run: Run, args: Args, batch: Batch, contexts: list[tuple[str | None, str | None]],
                         partners: torch.Tensor, rows: list[int], gather_index: torch.Tensor) -> dict:
    """Of `rows`: the teacher at each row's own problem and, for distilled rows, its C contrasts at the partners'
    problems, at the student's top-k `gather_index` [b, T, k] in one scoring call (at lam = 0 the teacher's is a
    call of its own, padded as sd.py's). Adds `contrast_logprobs` [b, C, T] and `contrast_gathered`, zero on rows
    that are not distilled."""
    b, C, G = len(rows), args.num_contrast, args.group_size
    picked = [j for j, i in enumerate(rows) if contexts[i] != (None, None)]
    contrast_rows, contrast_index = [rows[j] for j in picked] * C, gather_index[picked].repeat(C, 1, 1)
    contrast_problems = [G * int(partners[rows[j], k]) for k in range(C) for j in picked]
    if args.contrast_weight > 0 and picked:
        scores = score_with_problems(run, args, batch, contexts, rows + contrast_rows, rows + contrast_problems,
                                     torch.cat([gather_index, contrast_index]))
        teacher, scored = {k: v[:b] for k, v in scores.items()}, {k: v[b:] for k, v in scores.items()}
    else:
        teacher = score_with_problems(run, args, batch, contexts, rows, rows, gather_index)
        scored = score_with_problems(run, args, batch, contexts, contrast_rows, contrast_problems,
                                     contrast_index) if picked else None
    for key in ("logprobs", "gathered"):
        value = teacher[key].new_zeros(b, C, *teacher[key].shape[1:])
        if scored is not None:
            value[picked] = scored[key].view(C, len(picked), *value.shape[2:]).transpose(0, 1)
        teacher[f"contrast_{key}"] = value
    return teacher


def contrastive_target(teacher_gathered: torch.Tensor, contrast_gathered: torch.Tensor, weight: float) -> torch.Tensor:
    """log Q = log T - lam * G over the student's top-k + tail buckets, renormalised (Q ∝ T exp(-lam G), Eq. 8).

    teacher_gathered [b, T, k+1]; contrast_gathered [b, C, T, k+1], whose mean over C is G. At lam = 0
    T's buckets are returned as they are: they already sum to one, so the loss is SDPO's bit for bit.
    """
    if weight == 0:
        return teacher_gathered
    logits = teacher_gathered - weight * contrast_gathered.mean(1)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def credit_metrics(teacher_logprobs: torch.Tensor, contrast_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   weight: float, mask: torch.Tensor) -> dict[str, float]:
    """On distilled tokens (`mask`), at the sampled token: the subtracted term lam * mean_k c_k, what is left of t,
    its Pearson correlation with t, and how often u - lam * mean_k c_k has the other sign than u = t - s_old."""
    t, c = teacher_logprobs.double(), contrast_logprobs.mean(1).double()
    u = token_credit(teacher_logprobs, old_logprobs, mask)
    flipped = torch.sign(u - weight * c.float() * mask) != torch.sign(u)
    m = mask.double()
    terms = (weight * c, t - weight * c, flipped.double(), t, c, t * t, c * c, t * c)
    sums = all_reduce(torch.stack([m.sum()] + [(x * m).sum() for x in terms])).tolist()
    n, sub, left, flips, st, sc, stt, scc, stc = sums
    n = max(n, 1.0)
    cov, var_t, var_c = stc / n - st * sc / n ** 2, stt / n - (st / n) ** 2, scc / n - (sc / n) ** 2
    return {"credit/contrast_mean": sub / n, "credit/input_specific_mean": left / n, "credit/sign_flip_frac": flips / n,
            "credit/corr_teacher_contrast": cov / max(math.sqrt(max(var_t * var_c, 0.0)), 1e-12)}


def main(args: Args) -> None:
    run = setup(args, "credit", teacher_weights=args.teacher, reference=args.beta > 0)
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i (0 at the paper's --grpo-coef 0).
        batch = collect_batch(run, args)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()
        G = args.group_size

        # 2. Old-policy log-probs s_old and the student's top-k indices to distil over, reference log-probs. With one
        #    update per batch they come from the update's own forward: no separate pass.
        one_update = args.ppo_epochs * args.num_minibatches == 1
        old = {} if one_update else score_rollout(run, args, batch, with_entropy=True, topk=args.topk)
        ref_logprobs = score_rollout(run, args, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. SDPO's context z_i (a successful peer, else feedback; rows with neither are not distilled) and
        #    C partner prompts x'_k from other prompt groups of the batch.
        contexts = sdpo_contexts(batch, G, args.env_feedback)
        distilled = torch.tensor([c != (None, None) for c in contexts])
        distill_mask = mask * distilled.to(mask.device)[:, None]
        partners = contrast_partners(run.local_prompts, G, args.num_contrast, (args.seed, run.d.rank, step))

        # 4. Teacher T_t = pi_T(. | x_i, z_i, y_<t) and (distilled rows) contrasts pi_T(. | x'_k, z_i, y_<t) at the
        #    student's top-k + tail, one scoring call; with one update per batch, per micro-batch inside the update.
        teacher = ScoredOnce(len(contexts), functools.partial(teacher_and_contrast, run, args, batch, contexts,
                                                              partners))
        if not one_update:
            teacher(gather_index=old["topk_index"])
        token_advantages = advantages[:, None].expand_as(mask).contiguous()

        # 5-6. Per micro-batch: the target Q_t ∝ T_t exp(-lam G_t) over the student's top-k + tail (Eq. 8); the
        #    distillation loss toward it (+ the surrogate if --grpo-coef > 0). The EMA teacher follows.
        update = Update(run, args, batch, step, old.get("logprobs"), token_masks={"distill": distill_mask})
        for minibatch in update.minibatches():
            for rows in minibatch.split(args.micro_batch_rows):
                mb = update.forward(rows, gather_index=old.get("topk_index"), topk=args.topk * one_update,
                                    gather_topk=one_update)
                t, s_old = teacher(mb.rows, gather_index=mb.out.get("topk_index")), update.old_logprobs
                target = contrastive_target(t["gathered"], t["contrast_gathered"], args.contrast_weight)
                policy, sums = policy_loss(mb, args, token_advantages, s_old, ref_logprobs)
                divergence = generalized_jsd(mb.out["gathered"], target, args.jsd_alpha)  # D_alpha(S_t || Q_t)
                distill, sums["loss/distill"] = distillation_loss(mb, args, s_old, divergence, distill_mask)
                loss = policy + distill
                loss.backward()
                update.log(sums)
            update.step()
        metrics |= update.metrics({"loss/distill": "distill"})
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        t, s_old = teacher.values, update.old_logprobs
        metrics |= teacher_metrics(token_credit(t["logprobs"], s_old, distill_mask), t, mask, teacher.seconds)
        metrics |= coverage_metrics(distilled, batch.rewards >= SDPO_SUCCESS, G, step, run.d.is_main)
        metrics |= credit_metrics(t["logprobs"], t["contrast_logprobs"], s_old, args.contrast_weight, distill_mask)
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen,
                    "perf/update_s": t_update - t_score - teacher.seconds}
        run.end_step(step, t0, metrics, batch, advantages, old.get("entropy", update.entropy))
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


# Same as sd.py: environment_feedback
def environment_feedback(example: Example, verdict: Verdict) -> str | None:
    """The environment's feedback on a failed attempt: a code task's test report; other tasks give none."""
    return verdict.feedback if example.task == "code" and not verdict.correct and verdict.feedback else None


# Same as sd.py: without_thinking
def without_thinking(text: str) -> str:
    """A demonstration with its `<think>...</think>` blocks removed (SDPO's remove_thinking_from_demonstration)."""
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)


# Same as sd.py: sdpo_message
def sdpo_message(prompt: str, peer: str | None, feedback: str | None) -> TeacherMessage:
    """SDPO's reprompt (lasgroup/SDPO actor.yaml): the prompt, a successful peer or else the feedback, the instruction.

    `{prompt}{solution}{feedback}\\n\\nCorrectly solve the original question.` with solution
    `\\nCorrect solution:\\n\\n{peer}` and feedback `\\nThe following is feedback from your unsuccessful earlier
    attempt:\\n\\n{feedback}`; feedback only without a peer; with neither, the plain prompt.
    """
    instruction = "\n\nCorrectly solve the original question."
    if peer is not None:
        return TeacherMessage(f"{prompt}\nCorrect solution:\n\n", peer, instruction)
    if feedback is not None:
        return TeacherMessage(f"{prompt}\nThe following is feedback from your unsuccessful earlier attempt:\n\n",
                              feedback, instruction)
    return TeacherMessage(prompt)


# Same as sd.py: sdpo_contexts
def sdpo_contexts(batch: Batch, group_size: int, env_feedback: bool) -> list[tuple[str | None, str | None]]:
    """Each row's (peer, feedback): the first successful other row of its group, thinking removed; else the
    environment's feedback on its attempt (if `env_feedback`); (None, None) rows are not distilled."""
    peers = choose_peers(batch.rewards >= SDPO_SUCCESS, group_size, "first").tolist()
    return [(without_thinking(batch.rollout.texts[p]), None) if p >= 0 else
            (None, environment_feedback(e, v) if env_feedback else None)
            for e, v, p in zip(batch.examples, batch.verdicts, peers)]


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
def distillation_loss(mb: MicroBatch, args: Args, old_logprobs: torch.Tensor, divergence: torch.Tensor,
                      distill_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam_sd * the mean over distilled tokens of w_t * D_t (D: the micro-batch's divergence [b, T]); its sum.

    w_t = min(exp(s_t - s_old_t), is_clip), detached (the log-ratio clamped to +-20 first, as SDPO's code).
    """
    weight = torch.exp((mb.out["logprobs"] - old_logprobs[mb.rows]).clamp(-20, 20)).clamp(max=args.is_clip).detach()
    masked = weight * divergence * distill_mask[mb.rows]
    return args.lam_sd * masked.sum() / mb.tokens["distill"], masked.sum()



if __name__ == "__main__":
    main(cli(Args))
