"""On-policy self-distillation (SD): the policy, shown privileged context, is its own token-level teacher.

Papers: OPSD, Zhao et al. 2026, "Self-Distilled Reasoner" (arXiv 2601.18734); SDPO, Hübotter et al.
2026, "Reinforcement Learning via Self-Distillation" (arXiv 2601.20802). Source status: PRIMARY for the
sampled-token (token) and top-k logit forms of SDPO and the frame of AntiSD §2, Eq. 2. The default is
that shared frame, which every SD script offers by flags for a comparison on one footing; the other
scripts' defaults are their own papers' recipes. See docs/sd.md.

Idea: roll out and verify as in GRPO; then let the same network score the same completion tokens after
a teacher prompt that also holds privileged context c (a reference solution or the answer, plus
feedback on the attempt). Where the teacher likes a token more than the student did, push it up:

    u_t     = log pi_T(y_t | x, c, y_<t) - log pi_old(y_t | x, y_<t)       (token log-ratio)
    sum_t u_t = log pi(y | x, c) - log pi(y | x) = pMI(y; c | x)          (identity, shared weights)
    token mode (default):  A_t = A_i + lam * u_t                          (AntiSD Eq. 1-3; SDPO token mode)
    logit mode:            L = L_GRPO + lam_sd * mean_t w_t D_alpha(pS || pT)   (SDPO / OPSD)
        D_alpha = (1-alpha) KL(S || M) + alpha KL(T || M),  M = (1-alpha) pS + alpha pT,
        alpha = 0: KL(T || S), alpha = 1: KL(S || T); on the student's top-k + one tail bucket;
        w_t = min(exp(s_t - s_old_t), 2) detached (importance weight).

Choices (see docs/sd.md):
- `--teacher current` (default; the policy before this step's update), `ema` (SDPO, rate 0.05) or
  `initial` (OPSD, the frozen starting model).
- Teacher prompt: one user turn `{problem}\\n\\n{privileged}\\n\\nNow solve the original problem step by
  step.` in the student's chat template; a too-long privileged block is cut from its middle.
  `--teacher-instruction` replaces that last line ("" drops it: on a task that asks for a short final
  answer, "step by step" makes the teacher prefer long explanations).
- Logit mode takes the top-k indices from the rollout policy's distribution (the old-policy pass), so
  the teacher is scored once per step; with one update per batch that is the current student's top-k.
  `--topk-from teacher` takes the teacher's own top-k instead (CREDIT's SDPO baseline: credit.py at
  `--contrast-weight 0`).

The GRPO frame's flags are grpo.py's: `--adv-scale`, `--loss-agg`, `--eps-low/--eps-high`, and `--beta`
(the k3 KL to the frozen initial model, logged as `loss/kl`; an `initial` teacher doubles as that
reference). grpo.py's `--preset` and overlong shaping are not offered here; `--dynamic-sampling` is.

Run:
    python sd.py                                  # token mode on the toy task
    python sd.py --sd-loss logit --grpo-coef 0    # pure logit distillation (OPSD/SDPO style)
    torchrun --nproc_per_node 8 sd.py --model Qwen/Qwen3-1.7B --dataset math --num-prompts 64 \\
        --max-new-tokens 2048 --max-teacher-prompt-tokens 4096 --learning-rate 1e-6 --total-steps 200
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from common.args import TrainArgs, check, cli
from common.batch import collect_batch, score_rollout
from common.dist import all_reduce
from common.example import Example
from common.run import setup
from common.teacher import TEACHER_INSTRUCTION, ema_update, score_teacher
from common.tracking import warn_once
from common.update import MicroBatch, optimize
from common.verifiers import Verdict


@dataclass
class Args(TrainArgs):
    """On-policy self-distillation: the policy, shown a reference solution and feedback, is its own token-level teacher."""

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
    """Scale of the GRPO advantage (0 with --sd-loss logit: pure distillation)."""

    # Self-distillation
    teacher: Literal["current", "ema", "initial"] = "current"
    """Teacher weights: the current policy, an EMA of it (SDPO), or the frozen initial model (OPSD)."""
    ema_rate: float = 0.05
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step."""
    privileged: Literal["solution", "answer"] = "solution"
    """Privileged block: the reference solution (answer when missing) or the final answer only."""
    feedback: bool = True
    """Append feedback on the row's own attempt (correct/incorrect; the verifier's message for code)."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    teacher_instruction: str = TEACHER_INSTRUCTION
    """The teacher prompt's last line, after the privileged block ("" for none)."""
    sd_loss: Literal["token", "logit"] = "token"
    """`token`: fold lam * u into the advantage; `logit`: add a top-k generalized-JSD distillation loss."""
    lam: float = 0.5
    """Token mode: weight of the credit u in the token advantage (0 reproduces grpo.py)."""
    lam_sd: float = 1.0
    """Logit mode: weight of the distillation loss."""
    jsd_alpha: float = 0.5
    """Logit mode: generalized JSD mixture weight (0 forward KL(T||S), 1 reverse KL(S||T))."""
    topk: int = 100
    """Logit mode: distil over k tokens plus one tail bucket."""
    topk_from: Literal["student", "teacher"] = "student"
    """Logit mode: take the k tokens from the student's distribution (SDPO) or the teacher's (CREDIT's SDPO baseline)."""
    is_clip: float = 2.0
    """Logit mode: clip of the detached importance weight exp(s - s_old)."""

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
# The algorithm: teacher context, token credit, divergence (pure functions).


def feedback_sentence(example: Example, verdict: Verdict) -> str:
    """SDPO-style feedback on the row's own attempt; code tasks get the verifier's message."""
    if example.task == "code":
        return f"Feedback on your previous attempt: {verdict.feedback}"
    return "Your previous attempt was correct." if verdict.correct else "Your previous attempt was incorrect."


def answer_block(example: Example) -> str:
    """The endpoint cue: only the final answer."""
    return f"The correct final answer is: {example.answer}"


def reference_block(example: Example, mode: str) -> str:
    """The dataset's reference solution (`solution`; the answer when there is none) or the answer only."""
    if mode == "solution" and example.solution:
        return example.solution
    if mode == "solution":
        warn_once("no-solution", "note: examples without a reference solution use the answer-only block")
    return answer_block(example)


def privileged_block(example: Example, verdict: Verdict, mode: str, feedback: bool) -> str:
    """c_i for sd.py: the reference solution (or the answer), then feedback on the attempt."""
    block = reference_block(example, mode)
    return f"{block}\n\n{feedback_sentence(example, verdict)}" if feedback else block


def token_credit(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = t - s_old on completion tokens, 0 on padding (all detached)."""
    return (teacher_logprobs - old_logprobs).detach() * mask


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


def distillation_loss(mb: MicroBatch, args: Args, old_logprobs: torch.Tensor, teacher_gathered: torch.Tensor,
                      distill_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit mode: lam_sd * token mean over distilled rows of w_t * D_alpha(student top-k || teacher top-k); its sum.

    w_t = min(exp(s_t - s_old_t), is_clip), detached; gradients flow only through the student.
    """
    weight = torch.exp(mb.out["logprobs"] - old_logprobs[mb.rows]).clamp(max=args.is_clip).detach()
    per_token = weight * generalized_jsd(mb.out["gathered"], teacher_gathered[mb.rows].detach(), args.jsd_alpha)
    masked = per_token * distill_mask[mb.rows]
    return args.lam_sd * masked.sum() / mb.tokens["distill"], masked.sum()


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


def main(args: Args) -> None:
    run = setup(args, "sd", teacher_weights=args.teacher, reference=args.beta > 0)
    logit = args.sd_loss == "logit"
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = collect_batch(run)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (logit mode: also the student's top-k to distil over), reference log-probs.
        teacher_topk = logit and args.topk_from == "teacher"
        old = score_rollout(run, batch, with_entropy=True, topk=args.topk if logit and not teacher_topk else 0)
        ref_logprobs = score_rollout(run, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context c_i: reference solution (or answer) + feedback on the attempt.
        blocks = [privileged_block(e, v, args.privileged, args.feedback) for e, v in zip(batch.examples, batch.verdicts)]

        # 4. Teacher scores the same completion tokens: t = log pi_T(y_t | x, c, y_<t) (logit mode: also its
        #    log-probs at the student's top-k, or at its own top-k, + the tail bucket).
        teacher = score_teacher(run, batch, blocks, args.max_teacher_prompt_tokens, gather_index=old.get("topk_index"),
                                topk=args.topk if teacher_topk else 0, gather_topk=teacher_topk,
                                instruction=args.teacher_instruction)
        distill_index = (teacher if teacher_topk else old).get("topk_index")
        t_teach = time.perf_counter()

        # 5. Credit u = t - s_old; token advantage A_t = A_i + lam * u (token mode) or a distillation loss.
        credit = token_credit(teacher["logprobs"], old["logprobs"], mask)
        distilled = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        if logit:
            token_advantages = advantages[:, None].expand_as(mask).contiguous()
        else:
            token_advantages = advantages[:, None] + args.lam * credit

        def loss_fn(mb: MicroBatch):
            loss, stats = policy_loss(mb, args, token_advantages, old["logprobs"], ref_logprobs)
            if logit:
                distill, stats["loss/distill"] = distillation_loss(mb, args, old["logprobs"], teacher["gathered"], mask)
                loss = loss + distill
            return loss, stats

        # 6. Clipped-surrogate update (+ distillation), then the EMA teacher follows.
        metrics |= optimize(run, batch, loss_fn, step, token_masks={"distill": mask} if logit else None,
                            stat_masks={"loss/distill": "distill"}, row_inputs={"gather_index": distill_index} if logit else None)
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        metrics |= sd_metrics(credit, teacher, mask, distilled, t_teach - t_score)
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_teach}
        run.end_step(step, t0, metrics, batch, advantages, old["entropy"])
    run.close()


if __name__ == "__main__":
    main(cli(Args))
