"""On-policy self-distillation (SD): the policy, shown privileged context, is its own token-level teacher.

Papers: OPSD, Zhao et al. 2026, "Self-Distilled Reasoner" (arXiv 2601.18734); SDPO, Hübotter et al.
2026, "Reinforcement Learning via Self-Distillation" (arXiv 2601.20802). The frame below is the one
shared by the SD family (AntiSD §2, Eq. 2); credit.py, antisd.py and hsd.py change only its context c
or its credit delta.

Idea: roll out and verify as in GRPO; then let the same network score the same completion tokens after
a teacher prompt that also holds privileged context c (a reference solution or the answer, plus
feedback on the attempt). Where the teacher likes a token more than the student did, push it up:

    u_t     = log pi_T(y_t | x, c, y_<t) - log pi_old(y_t | x, y_<t)       (token log-ratio, §0)
    sum_t u_t = log pi(y | x, c) - log pi(y | x) = pMI(y; c | x)          (identity, shared weights)
    token mode (default):  A_t = A_i + lam * u_t                          (AntiSD Eq. 1-3; SDPO token mode)
    logit mode:            L = L_GRPO + lam_sd * mean_t w_t D_alpha(pS || pT)   (SDPO / OPSD)
        D_alpha = (1-alpha) KL(S || M) + alpha KL(T || M),  M = (1-alpha) pS + alpha pT,
        alpha = 0: KL(T || S), alpha = 1: KL(S || T); on the student's top-k + one tail bucket;
        w_t = min(exp(s_t - s_old_t), 2) detached (importance weight).

Choices (ALGORITHMS.md §2, marked [choice] there):
- `--teacher current` (default; the policy before this step's update), `ema` (SDPO, rate 0.05) or
  `initial` (OPSD, the frozen starting model).
- Teacher prompt: one user turn `{problem}\\n\\n{privileged}\\n\\nNow solve the original problem step by
  step.` in the student's chat template; a too-long privileged block is cut from its middle.
- Logit mode takes the top-k indices from the rollout policy's distribution (the old-policy pass), so
  the teacher is scored once per step; with one update per batch that is the current student's top-k.

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
import tyro

import grpo
from common.data import Example
from common.dist import all_reduce
from common.logprobs import score_completions
from common.run import Run, setup
from common.teacher import teacher_inputs
from common.verifiers import Verdict


@dataclass
class Args(grpo.Args):
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
    sd_loss: Literal["token", "logit"] = "token"
    """`token`: fold lam * u into the advantage; `logit`: add a top-k generalized-JSD distillation loss."""
    lam: float = 0.5
    """Token mode: weight of the credit u in the token advantage (0 reproduces grpo.py)."""
    lam_sd: float = 1.0
    """Logit mode: weight of the distillation loss."""
    grpo_coef: float = 1.0
    """Scale of the GRPO advantage (0 with --sd-loss logit: pure distillation)."""
    jsd_alpha: float = 0.5
    """Logit mode: generalized JSD mixture weight (0 forward KL(T||S), 1 reverse KL(S||T))."""
    topk: int = 100
    """Logit mode: distil over the student's top-k tokens plus one tail bucket."""
    is_clip: float = 2.0
    """Logit mode: clip of the detached importance weight exp(s - s_old)."""


# ---------------------------------------------------------------------------------------------------
# The algorithm: teacher context, token credit, divergence (pure functions).

_warned: set[str] = set()


def feedback_sentence(example: Example, verdict: Verdict) -> str:
    """SDPO-style feedback on the row's own attempt; code tasks get the verifier's message."""
    if example.task == "code":
        return f"Feedback on your previous attempt: {verdict.feedback}"
    return "Your previous attempt was correct." if verdict.correct else "Your previous attempt was incorrect."


def answer_block(example: Example) -> str:
    """The endpoint cue: only the final answer."""
    return f"The correct final answer is: {example.answer}"


def privileged_block(example: Example, verdict: Verdict, mode: str, feedback: bool) -> str:
    """c_i for sd.py: the reference solution (or the answer), then feedback on the attempt."""
    if mode == "solution" and example.solution:
        block = example.solution
    else:
        if mode == "solution" and "no-solution" not in _warned:
            _warned.add("no-solution")
            print("note: examples without a reference solution use the answer-only block", flush=True)
        block = answer_block(example)
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


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """phi <- (1 - rate) phi + rate theta, parameter by parameter (shard by shard under FSDP2)."""
    for phi, theta in zip(teacher.parameters(), student.parameters()):
        phi.lerp_(theta.detach(), rate)


# ---------------------------------------------------------------------------------------------------
# The SD step's mechanics, reused by credit.py, antisd.py and hsd.py.


def teacher_model(run: Run, args: Args) -> torch.nn.Module:
    """The network that scores as teacher: the policy itself, or the EMA / initial copy."""
    return run.policy if args.teacher == "current" else run.teacher


def score_teacher(run: Run, args: Args, batch: grpo.Batch, blocks: list[str], problems: list[str] | None = None,
                  gather_index: torch.Tensor | None = None, model: torch.nn.Module | None = None, **stats) -> dict:
    """Teacher log-probs of the batch's own completion tokens after per-row teacher prompts."""
    r = batch.rollout
    problems = problems if problems is not None else [e.prompt for e in batch.examples]
    ids, mask, shortened = teacher_inputs(run.tokenizer, problems, blocks, args.max_teacher_prompt_tokens,
                                          run.d.device, args.enable_thinking)
    with run.d.autocast():
        out = score_completions(model if model is not None else teacher_model(run, args), ids, mask, r.completion_ids,
                                r.completion_mask, args.temperature, args.logprob_chunk, args.micro_batch_rows,
                                gather_index=gather_index, **stats)
    out["shortened"] = shortened.float()
    out["prompt_len"] = mask.sum(-1).float()
    return out


def distillation_loss(args: Args, old: dict, teacher: dict, row_mask: torch.Tensor, mask: torch.Tensor) -> grpo.ExtraLoss:
    """Logit mode: w_t * D_alpha(student top-k || teacher top-k) per token, token mean over distilled rows."""
    def per_token(out: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        weight = torch.exp(out["logprobs"] - old["logprobs"][rows]).clamp(max=args.is_clip).detach()
        return weight * generalized_jsd(out["gathered"], teacher["gathered"][rows].detach(), args.jsd_alpha)

    return grpo.ExtraLoss(per_token, mask * row_mask[:, None], args.lam_sd, old["topk_index"])


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
    args = grpo.apply_preset(args)
    run = setup(args, "sd", with_teacher=args.teacher != "current")
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = grpo.collect_batch(run, args)
        advantages = args.grpo_coef * grpo.group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (logit mode: also the top-k indices to distil over).
        old, _ = grpo.score_old_and_ref(run, args, batch, topk=args.topk if args.sd_loss == "logit" else 0)

        # 3. Teacher context c_i: reference solution (or answer) + feedback on the attempt.
        blocks = [privileged_block(e, v, args.privileged, args.feedback) for e, v in zip(batch.examples, batch.verdicts)]

        # 4. Teacher scores the same completion tokens: t = log pi_T(y_t | x, c, y_<t).
        t1 = time.perf_counter()
        teacher = score_teacher(run, args, batch, blocks, gather_index=old.get("topk_index"))
        t_teacher = time.perf_counter() - t1

        # 5. Credit u = t - s_old; token advantage A_t = A_i + lam * u (token mode) or a distillation loss.
        credit = token_credit(teacher["logprobs"], old["logprobs"], mask)
        distilled = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        extra = None
        if args.sd_loss == "token":
            token_advantages = advantages[:, None] + args.lam * credit
        else:
            token_advantages = advantages[:, None].expand_as(mask).contiguous()
            extra = distillation_loss(args, old, teacher, distilled.float(), mask)

        # 6. Clipped-surrogate update (+ distillation), then the EMA teacher follows.
        metrics |= grpo.ppo_update(run, args, batch, token_advantages, old["logprobs"], None, step, extra)
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)

        metrics |= sd_metrics(credit, teacher, mask, distilled, t_teacher)
        grpo.finish_step(run, args, step, t0, metrics, batch, advantages, old)
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
