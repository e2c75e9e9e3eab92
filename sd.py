"""On-policy self-distillation (SD): the policy, shown privileged context, is its own token-level teacher.

Papers: SDPO, Hübotter et al. 2026 (arXiv 2601.20802); OPSD, Zhao et al. 2026 (arXiv 2601.18734); the
token frame of AntiSD §2 (Shen et al. 2026, arXiv 2605.11609). Sources: their official code and
AntiSD's Appendix C. See docs/sd.md.

Idea: roll out and verify as in GRPO; the same network then scores the same completion tokens after a
teacher prompt holding privileged context c (a successful peer, a reference solution, feedback):

    u_t       = log pi_T(y_t | x, c, y_<t) - log pi_old(y_t | x, y_<t)            (token log-ratio)
    token:    A_t = A_i + lam * u_t                                            (AntiSD Eq. 2-3, default)
    logit:    L = grpo_coef * L_GRPO + lam_sd * mean_t w_t D_alpha(pS || pT)   (SDPO, OPSD)
              D_alpha = (1-alpha) KL(S || M) + alpha KL(T || M), M = (1-alpha) pS + alpha pT, over the
              student's top-k + a tail bucket or the full vocabulary (--topk 0); w_t = min(pi/pi_old, is_clip)

`--preset sdpo` (SDPO's context and masking, EMA teacher, top-100 JSD) and `--preset opsd` (the
reference solution, the initial model as teacher, full-vocabulary JSD) set the papers' values where
the command line leaves the defaults; `--preset none` is AntiSD's default self-distillation.

Run:
    python sd.py                                  # the token frame on the toy task
    python sd.py --preset sdpo                    # SDPO's official recipe
    torchrun --nproc_per_node 8 sd.py --preset sdpo --model Qwen/Qwen3-8B --dataset math --num-prompts 32 \\
        --max-new-tokens 8192 --max-teacher-prompt-tokens 10240 --learning-rate 1e-5 --warmup-steps 10
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.args import ArgError, TrainArgs, apply_preset, check, cli
from common.batch import Batch, collect_batch, score_rollout
from common.dist import unsharded
from common.example import Example, Verdict
from common.run import setup
from common.teacher import TeacherMessage, choose_peers, coverage_metrics, ema_update, teacher_metrics, teacher_scores
from common.tracking import warn_once
from common.update import MicroBatch, Update

PRESETS = {
    "sdpo": dict(context="sdpo", sd_loss="logit", grpo_coef=0.0, teacher="ema", ema_rate=0.05, topk=100,
                 jsd_alpha=0.5, is_clip=2.0),
    "opsd": dict(context="opsd", sd_loss="logit", grpo_coef=0.0, teacher="initial", topk=0, jsd_alpha=0.5),
}


@dataclass
class Args(TrainArgs):
    """On-policy self-distillation: the policy, shown a successful peer or a reference solution, is its own teacher."""

    preset: Literal["none", "sdpo", "opsd"] = "none"
    """Published recipe (SDPO's or OPSD's official code): sets the fields below that the command line leaves default."""

    grpo_coef: float = 1.0
    """Scale of the GRPO advantage (0 with --sd-loss logit: pure distillation)."""

    # Self-distillation
    context: Literal["antisd", "sdpo", "opsd"] = "antisd"
    """Teacher context: AntiSD's (a correct peer or the solution), SDPO's (a peer, else feedback), OPSD's (solution)."""
    env_feedback: bool = True
    """SDPO context: show the environment's feedback on a failed attempt (code: failing tests) if no peer succeeded."""
    teacher: Literal["current", "ema", "initial"] = "current"
    """Teacher weights: the current policy, an EMA of it (SDPO), or the frozen initial model (OPSD)."""
    ema_rate: float = 0.05
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    sd_loss: Literal["token", "logit"] = "token"
    """`token`: fold lam * u into the advantage; `logit`: add a generalized-JSD distillation loss."""
    lam: float = 0.5
    """Token mode: weight of the credit u in the token advantage (0 reproduces grpo.py)."""
    lam_sd: float = 1.0
    """Logit mode: weight of the distillation loss."""
    jsd_alpha: float = 0.5
    """Logit mode: generalized JSD mixture weight (0 forward KL(T||S), 1 reverse KL(S||T))."""
    topk: int = 100
    """Logit mode: distil over the student's k most likely tokens plus one tail bucket (0: the full vocabulary)."""
    is_clip: float = 2.0
    """Logit mode: clip of the detached importance weight exp(s - s_old)."""

    def validate(self) -> None:
        super().validate()
        check(self.grpo_coef, "grpo_coef", low=0)
        check(self.ema_rate, "ema_rate", 0, 1, low_open=True)
        check(self.max_teacher_prompt_tokens, "max_teacher_prompt_tokens", low=1)
        check(self.lam, "lam")
        check(self.lam_sd, "lam_sd", low=0)
        check(self.jsd_alpha, "jsd_alpha", 0, 1)
        check(self.topk, "topk", low=0)
        check(self.is_clip, "is_clip", low=0, low_open=True)
        full_vocab_current = self.sd_loss == "logit" and self.topk == 0 and self.teacher == "current"
        if full_vocab_current and self.ppo_epochs * self.num_minibatches > 1:  # its head is read inside the update
            raise ArgError("--topk 0 with --teacher current needs one update per batch, or --teacher ema/initial")


# ---------------------------------------------------------------------------------------------------
# The algorithm: teacher contexts as published, token credit, divergence (pure functions).


SDPO_SUCCESS = 0.5
"""SDPO's success_reward_threshold: a rollout with at least this reward is a demonstration for its group."""


def environment_feedback(example: Example, verdict: Verdict) -> str | None:
    """The environment's feedback on a failed attempt: a code task's test report; other tasks give none."""
    return verdict.feedback if example.task == "code" and not verdict.correct and verdict.feedback else None


def without_thinking(text: str) -> str:
    """A demonstration with its `<think>...</think>` blocks removed (SDPO's remove_thinking_from_demonstration)."""
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)


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


def sdpo_contexts(batch: Batch, group_size: int, env_feedback: bool) -> list[tuple[str | None, str | None]]:
    """Each row's (peer, feedback): the first successful other row of its group, thinking removed; else the
    environment's feedback on its attempt (if `env_feedback`); (None, None) rows are not distilled."""
    peers = choose_peers(batch.rewards >= SDPO_SUCCESS, group_size, "first").tolist()
    return [(without_thinking(batch.rollout.texts[p]), None) if p >= 0 else
            (None, environment_feedback(e, v) if env_feedback else None)
            for e, v, p in zip(batch.examples, batch.verdicts, peers)]


def reference_solution(example: Example) -> str:
    """The dataset's worked solution; its final answer when it has none (said once)."""
    if example.solution:
        return example.solution
    warn_once("no-solution", "note: examples without a reference solution show the teacher their final answer")
    return example.answer


def opsd_message(example: Example) -> TeacherMessage:
    """OPSD's teacher prompt (siyan-zhao/OPSD data_collator.py, reason_first=False) around the reference solution."""
    return TeacherMessage(
        f"{example.prompt}\n\nHere is a reference solution to this problem:\n", reference_solution(example),
        "\n\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your "
        "own step-by-step reasoning that derives the same final answer to the problem below:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.")


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


def full_vocab_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_alpha over the full vocabulary from logits / tau (OPSD's loss), one chunk of positions at a time."""
    return generalized_jsd(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), alpha)


def distillation_loss(mb: MicroBatch, args: Args, old_logprobs: torch.Tensor, divergence: torch.Tensor,
                      distill_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam_sd * the mean over distilled tokens of w_t * D_t (D: the micro-batch's divergence [b, T]); its sum.

    w_t = min(exp(s_t - s_old_t), is_clip), detached (the log-ratio clamped to +-20 first, as SDPO's code).
    """
    weight = torch.exp((mb.out["logprobs"] - old_logprobs[mb.rows]).clamp(-20, 20)).clamp(max=args.is_clip).detach()
    masked = weight * divergence * distill_mask[mb.rows]
    return args.lam_sd * masked.sum() / mb.tokens["distill"], masked.sum()


def teacher_messages(batch: Batch, args: Args, generator: torch.Generator) -> tuple[list[TeacherMessage], torch.Tensor]:
    """Each row's teacher message in `--context`'s template, and which rows are distilled (SDPO: not all)."""
    if args.context == "sdpo":
        contexts = sdpo_contexts(batch, args.group_size, args.env_feedback)
        return ([sdpo_message(e.prompt, *c) for e, c in zip(batch.examples, contexts)],
                torch.tensor([c != (None, None) for c in contexts]))
    everyone = torch.ones(len(batch.examples), dtype=torch.bool)
    if args.context == "opsd":
        return [opsd_message(e) for e in batch.examples], everyone
    correct = torch.tensor([v.correct for v in batch.verdicts])
    peers = choose_peers(correct, args.group_size, "random", generator).tolist()
    return [antisd_message(e, v, batch.rollout.texts[p] if p >= 0 else None)
            for e, v, p in zip(batch.examples, batch.verdicts, peers)], everyone


def main(args: Args) -> None:
    args = apply_preset(args, PRESETS)
    logit, full_vocab = args.sd_loss == "logit", args.sd_loss == "logit" and args.topk == 0
    one_update = args.ppo_epochs * args.num_minibatches == 1
    run = setup(args, "sd", teacher_weights=args.teacher, reference=args.beta > 0)
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i.
        batch = collect_batch(run, args)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (logit mode: and the student's top-k to distil over), reference log-probs.
        #    With one update per batch they come from the update's own forward: no separate pass.
        old = {} if one_update else score_rollout(run, args, batch, with_entropy=True, topk=args.topk if logit else 0)
        ref_logprobs = score_rollout(run, args, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context c_i in the chosen paper's template; who is distilled (SDPO: rows with a peer or feedback).
        generator = torch.Generator().manual_seed((args.seed + run.d.rank) * 1_000_003 + step)  # not the global RNG
        messages, distilled = teacher_messages(batch, args, generator)
        distill_mask = mask * distilled.to(mask.device)[:, None]

        # 4. The teacher scores the same tokens: t = log pi_T(y_t | x, c, y_<t) (logit mode: + the student's top-k and
        #    tail, or its hidden states); at the top-k with one update per batch, per micro-batch inside the update.
        teacher = teacher_scores(run, args, batch, messages, args.max_teacher_prompt_tokens)
        own_topk = args.topk if logit and one_update else 0
        if not own_topk:
            teacher(gather_index=old.get("topk_index"), return_hidden=full_vocab)

        # 5-6. Per micro-batch: u = t - s_old on distilled rows; A_t = A_i + lam * u (token mode); the clipped
        #    surrogate + lam_sd * D_alpha (logit mode; full vocabulary: the teacher's head in the student's chunks).
        paired = dict(paired_head=run.teacher_model.lm.lm_head, paired_hidden=teacher.values.pop("hidden"),
                      paired_fn=functools.partial(full_vocab_jsd, alpha=args.jsd_alpha)) if full_vocab else {}
        credit, token_advantages, lam = torch.zeros_like(mask), torch.zeros_like(mask), 0.0 if logit else args.lam
        update = Update(run, args, batch, step, old.get("logprobs"), token_masks={"distill": distill_mask})
        with unsharded(run.teacher if full_vocab else None):
            for minibatch in update.minibatches():
                for rows in minibatch.split(args.micro_batch_rows):
                    mb = update.forward(rows, gather_index=old.get("topk_index"), topk=own_topk,
                                        gather_topk=bool(own_topk), **paired)
                    t, s_old = teacher(mb.rows, gather_index=mb.out.get("topk_index")), update.old_logprobs
                    credit[mb.rows] = token_credit(t["logprobs"], s_old[mb.rows], distill_mask[mb.rows])
                    token_advantages[mb.rows] = advantages[mb.rows, None] + lam * credit[mb.rows]
                    loss, sums = policy_loss(mb, args, token_advantages, s_old, ref_logprobs)
                    if logit:  # D_alpha(S_t || T_t) per token
                        divergence = mb.out["paired"] if full_vocab else \
                            generalized_jsd(mb.out["gathered"], t["gathered"], args.jsd_alpha)
                        distill, sums["loss/distill"] = distillation_loss(mb, args, s_old, divergence, distill_mask)
                        loss = loss + distill
                    loss.backward()
                    update.log(sums)
                update.step()
        metrics |= update.metrics({"loss/distill": "distill"})
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        metrics |= teacher_metrics(credit, teacher.values, mask, teacher.seconds)
        metrics |= coverage_metrics(distilled, batch.rewards >= SDPO_SUCCESS, args.group_size, step, run.d.is_main)
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


# Same as antisd.py: correctness_sentence
def correctness_sentence(example: Example, verdict: Verdict) -> str:
    """AntiSD's assessment of the row's own attempt: binary for math, the tests passed for code (Appendix C)."""
    if example.task == "code":
        m = len(example.tests or [])
        return f"Your code passes {round(verdict.reward * m)} of {m} test cases."
    return "Your answer is correct." if verdict.correct else "Your answer is incorrect."


# Same as antisd.py: antisd_message
def antisd_message(example: Example, verdict: Verdict, peer: str | None) -> TeacherMessage:
    """AntiSD's teacher context (Appendix C): a verified solution (a correct peer, else the reference), assessed."""
    return TeacherMessage(f"{example.prompt}\n\nYour previous attempt:\n",
                          peer if peer is not None else reference_solution(example),
                          f"\n\nPrevious assessment: {correctness_sentence(example, verdict)}\n"
                          "Now solve this problem step by step.")


if __name__ == "__main__":
    main(cli(Args))
