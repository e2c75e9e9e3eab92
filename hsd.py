"""Hindsight Self-Distillation (HSD): the self-teacher reads a successful peer rollout of the same group.

Paper: Li, Hong, Lan 2026, "Localizing Credit at the Divergence: Path-Conditioned Self-Distillation
for LLM Reasoning" (arXiv 2606.15576). Sources: SECONDARY (the paper's text and code could not be
read here; six summaries of its v1 PDF agree). See docs/hsd.md.

Idea: an answer-only self-teacher knows where a failed attempt should end, not where it went wrong.
Shown a successful attempt of the same group (and the answer), the teacher disagrees with the failed
attempt from the token where it left the successful path: the credit concentrates at that divergence.

    S_i = the other successful rows of row i's group;  o+ ~ Uniform(S_i)                  (peer, seeded)
    c_i = "A correct solution:\n\n{o+}\n\nThe correct final answer is: {answer}"   (answer alone if S_i is empty)
    J   = (1/G) sum_i (1/|o_i|) sum_t KL(S_t || T_t) + beta * KL(pi_theta || pi_0)      (Eq. 10, OPSD's loss)
          S_t = pi_theta(. | x, o_<t), T_t = pi_theta(. | x, c_i, o_<t) stop-gradient, over the full vocabulary

Defaults [secondary]: no GRPO term (`--grpo-coef 0`; 1 adds grpo.py's surrogate against drift), beta
0.001, the current weights as teacher, a uniformly drawn peer. The teacher prompt's wording and the KL
direction are the project's choices (docs/hsd.md). `hsd/...` metrics test the paper's localisation claim.

Run:
    python hsd.py                                  # the paper's recipe on the toy task
    torchrun --nproc_per_node 8 hsd.py --model Qwen/Qwen3-8B --dataset math --num-prompts 16 --group-size 8 \\
        --max-new-tokens 4096 --max-teacher-prompt-tokens 8192 --learning-rate 1e-6 --total-steps 1500
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.args import ArgError, TrainArgs, check, cli
from common.batch import Batch, collect_batch, score_rollout
from common.dist import all_reduce, unsharded
from common.example import Example
from common.run import Run, setup
from common.teacher import TeacherMessage, choose_peers, coverage_metrics, ema_update, score_teacher, teacher_metrics
from common.update import MicroBatch, Update


@dataclass
class Args(TrainArgs):
    """Hindsight Self-Distillation: the self-teacher reads a successful peer rollout of the group and the answer."""

    beta: float = 0.001
    """Weight of the k3 KL penalty to the frozen initial model (HSD: 0.001; 0 disables the reference model)."""
    grpo_coef: float = 0.0
    """Scale of a GRPO term added to the distillation (HSD has none; 1: a reward term against drift)."""

    # Self-distillation (sd.py)
    teacher: Literal["current", "ema", "initial"] = "current"
    """Teacher weights: the current policy, an EMA of it (SDPO), or the frozen initial model (OPSD)."""
    ema_rate: float = 0.05
    """EMA teacher update rate: phi <- (1 - rate) phi + rate theta after each step."""
    max_teacher_prompt_tokens: int = 1024
    """Teacher prompts longer than this have their privileged block shortened in the middle."""
    teacher_instruction: str = "Now solve the original problem step by step."
    """The teacher prompt's last line, after the privileged block ("" for none; the wording is a choice)."""
    kl_direction: Literal["reverse", "forward"] = "reverse"
    """Reverse KL(student || teacher) or forward KL(teacher || student) per token (Eq. 10 leaves it open)."""
    lam_sd: float = 1.0
    """Weight of the distillation loss."""

    # HSD
    peer: Literal["random", "first", "shortest"] = "random"
    """Which successful peer of the group conditions the teacher: uniform at random, the first, the shortest."""
    on_success: Literal["peer", "answer", "skip"] = "peer"
    """Successful rows: distil toward another success (answer-only without one), the answer only, or not at all."""
    diagnostics_every: int = 10
    """Score with the answer-only teacher too every N steps, for the `_answer_only` diagnostics (0: never)."""
    div_window: int = 8
    """Diagnostic: credit mass counts as near the divergence index d within +- this many tokens."""

    def validate(self) -> None:
        super().validate()
        check(self.grpo_coef, "grpo_coef", low=0)
        check(self.ema_rate, "ema_rate", 0, 1, low_open=True)
        check(self.max_teacher_prompt_tokens, "max_teacher_prompt_tokens", low=1)
        check(self.lam_sd, "lam_sd", low=0)
        check(self.diagnostics_every, "diagnostics_every", low=0)
        if self.teacher == "current" and self.ppo_epochs * self.num_minibatches > 1:
            raise ArgError("--teacher current: the KL reads the teacher's LM head inside the update, so it needs one "
                           "update per batch: drop --ppo-epochs/--num-minibatches, or use --teacher ema/initial")
        check(self.div_window, "div_window", low=0)


def answer_block(example: Example) -> str:
    """The endpoint cue: only the final answer (the fallback without a successful peer)."""
    return f"The correct final answer is: {example.answer}"


def hindsight_block(peer_text: str, answer: str) -> str:
    """The privileged block of HSD: a successful peer's full completion, then the ground-truth answer."""
    return f"A correct solution:\n\n{peer_text}\n\nThe correct final answer is: {answer}"


def privileged_block(example: Example, peer_text: str | None) -> str:
    """c_i: the hindsight block, or the answer alone without a peer."""
    return hindsight_block(peer_text, example.answer) if peer_text is not None else answer_block(example)


def hsd_message(example: Example, block: str, instruction: str) -> TeacherMessage:
    """The teacher's user message (wording a choice): `{problem}\n\n{block}\n\n{instruction}` (no last line if "")."""
    return TeacherMessage(f"{example.prompt}\n\n", block, f"\n\n{instruction}" if instruction else "")


def divergence_index(a_ids: torch.Tensor, b_ids: torch.Tensor, a_len: torch.Tensor,
                     b_len: torch.Tensor) -> torch.Tensor:
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


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "reverse") -> torch.Tensor:
    """Per-position full-vocabulary KL from logits / tau: reverse KL(S || T) or forward KL(T || S) (Eq. 10)."""
    s, t = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    if direction == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    return (t.exp() * (t - s)).sum(-1)


def kl_loss(mb: MicroBatch, args: Args, distill_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam_sd * (1/B) sum_i (1/|o_i|) sum_t KL_t over distilled rows (Eq. 10's first term); and its token sum."""
    per_token = mb.out["paired"] * distill_mask[mb.rows]
    per_row = per_token.sum(-1) / mb.mask.sum(-1).clamp(min=1)
    return args.lam_sd * per_row.sum() / mb.num_rows, per_token.sum()


def abs_credit_near(delta: torch.Tensor, mask: torch.Tensor, d: torch.Tensor, window: int) -> torch.Tensor:
    """Share of the credit magnitude within +-window of d: sum_{|t-d|<=w} |delta_t| / sum_t |delta_t|; 0 if none."""
    magnitude = delta.abs() * mask
    near = (torch.arange(delta.shape[-1], device=delta.device) - d[..., None]).abs() <= window
    total = magnitude.sum(-1)
    return torch.where(total > 0, (magnitude * near).sum(-1) / total, 0.0)


def hsd_metrics(correct: torch.Tensor, peers: torch.Tensor, group_size: int, ids: torch.Tensor, mask: torch.Tensor,
                credits: dict[str, torch.Tensor | None], window: int) -> dict[str, float]:
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
        if credit is None:  # a teacher not scored at this step
            continue
        offset = argmin_offset(credit, mask, d)
        out[f"hsd/credit_mass_near_div{suffix}"] = mean(credit_mass_near(credit, mask, d, window))
        out[f"hsd/abs_credit_near_div{suffix}"] = mean(abs_credit_near(credit, mask, d, window))
        out[f"hsd/argmin_offset_mean{suffix}"] = mean(offset)
        out[f"hsd/argmin_abs_offset_mean{suffix}"] = mean(offset.abs())
    return out


def answer_only_logprobs(run: Run, args: Args, batch: Batch) -> torch.Tensor:
    """The answer-only teacher's log-probs of the same rows (the `_answer_only` diagnostics' baseline)."""
    messages = [hsd_message(e, answer_block(e), args.teacher_instruction) for e in batch.examples]
    return score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens)["logprobs"]


def teacher_messages(batch: Batch, correct: torch.Tensor, args: Args,
                     generator: torch.Generator) -> tuple[list[TeacherMessage], torch.Tensor]:
    """Each row's teacher message: a successful peer of its group chosen by --peer (a correct row: none unless
    --on-success peer) and the answer, or the answer alone; also each row's peer (-1: none)."""
    peers = choose_peers(correct, args.group_size, args.peer, generator, batch.rollout.lengths.cpu())
    if args.on_success != "peer":
        peers[correct] = -1
    texts = batch.rollout.texts
    return [hsd_message(e, privileged_block(e, texts[p] if p >= 0 else None), args.teacher_instruction)
            for e, p in zip(batch.examples, peers.tolist())], peers


def main(args: Args) -> None:
    run = setup(args, "hsd", teacher_weights=args.teacher, reference=args.beta > 0)
    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout and verify; GRPO group advantage A_i (0 at the paper's --grpo-coef 0).
        batch = collect_batch(run, args)
        t_gen = time.perf_counter()
        advantages = args.grpo_coef * group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        mask = batch.rollout.completion_mask.float()

        # 2. Old-policy log-probs s_old (one update per batch: from the update's own forward), reference log-probs.
        old = {} if args.ppo_epochs * args.num_minibatches == 1 else score_rollout(run, args, batch, with_entropy=True)
        ref_logprobs = score_rollout(run, args, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 3. Teacher context c_i: a successful peer of the group + the answer (else the answer alone); who is distilled.
        correct = torch.tensor([v.correct for v in batch.verdicts])
        generator = torch.Generator().manual_seed((args.seed + run.d.rank) * 1_000_003 + step)  # not the global RNG
        messages, peers = teacher_messages(batch, correct, args, generator)
        distilled = (~correct if args.on_success == "skip" else torch.ones_like(correct)).to(run.d.device)

        # 4. The teacher scores the same tokens: t = log pi_T(y_t | x, c, y_<t); its hidden states go to the update.
        teacher = score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens, return_hidden=True)
        t_teach = time.perf_counter()

        # 5. Diagnostics every --diagnostics-every steps: the answer-only teacher, before the update moves the weights.
        diagnose = args.diagnostics_every > 0 and step % args.diagnostics_every == 0
        answer_only = answer_only_logprobs(run, args, batch) if diagnose else None
        t_diag = time.perf_counter()

        # 6. Update: lam_sd * Eq. 10's per-token KL (the teacher's LM head inside the student's chunks) + beta *
        #    KL(pi || pi_0) (+ the surrogate if --grpo-coef > 0); then the EMA teacher follows.
        distill_mask = mask * distilled[:, None].float()
        token_advantages = advantages[:, None].expand_as(mask).contiguous()
        kl = functools.partial(token_kl, direction=args.kl_direction)
        update = Update(run, args, batch, step, old.get("logprobs"), token_masks={"distill": distill_mask})
        with unsharded(run.teacher):  # a separate teacher's head is used inside the policy's forward
            for minibatch in update.minibatches():
                for rows in minibatch.split(args.micro_batch_rows):
                    mb = update.forward(rows, paired_hidden=teacher["hidden"], paired_head=run.teacher_model.lm.lm_head,
                                        paired_fn=kl)
                    policy, sums = policy_loss(mb, args, token_advantages, update.old_logprobs, ref_logprobs)
                    distill, sums["loss/distill"] = kl_loss(mb, args, distill_mask)
                    loss = policy + distill
                    loss.backward()
                    update.log(sums)
                update.step()
        metrics |= update.metrics({"loss/distill": "distill"})
        if args.teacher == "ema":
            ema_update(run.teacher, run.policy, args.ema_rate)
        t_update = time.perf_counter()

        # 7. Credit u = t - s_old (0 on rows left out) for the diagnostics, under each teacher scored.
        s_old = update.old_logprobs
        credit = token_credit(teacher["logprobs"], s_old, distill_mask)
        credits = {"": credit, "_answer_only": token_credit(answer_only, s_old, mask) if diagnose else None}
        metrics |= teacher_metrics(credit, teacher, mask, t_teach - t_score)
        metrics |= coverage_metrics(distilled, correct, args.group_size, step, run.d.is_main)
        metrics |= hsd_metrics(correct.to(run.d.device), peers.to(run.d.device), args.group_size,
                               batch.rollout.completion_ids, mask, credits, args.div_window)
        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_diag}
        metrics |= {"perf/diagnostics_s": t_diag - t_teach} if diagnose else {}
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


# Same as sd.py: token_credit
def token_credit(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = t - s_old on completion tokens, 0 on padding (all detached)."""
    return (teacher_logprobs - old_logprobs).detach() * mask



if __name__ == "__main__":
    main(cli(Args))
