"""GRPO, Dr. GRPO and DAPO: group-relative policy optimisation with verifiable rewards.

Papers: Shao et al. 2024, DeepSeekMath (GRPO); Liu et al. 2025, arXiv 2503.20783 (Dr. GRPO);
Yu et al. 2025, arXiv 2503.14476 (DAPO). See docs/grpo.md.

Idea: sample G completions per prompt, score them with a verifier, and use each completion's reward
relative to its group as the advantage of every one of its tokens in a PPO clipped surrogate:

    A_i   = (r_i - mean_g r) / (std_g r + 1e-4)                                     (group advantage)
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),  rho_t = pi/pi_old (surrogate)
    l_t  += beta * (exp(ref_t - s_t) - (ref_t - s_t) - 1)                            (k3 KL, optional)

aggregated per `--loss-agg`: `sequence` (GRPO: token mean per row, then row mean), `token` (DAPO:
sum over all tokens / their count) or `constant` (Dr. GRPO: sum / (rows * max_new_tokens)).
`--preset grpo|dr-grpo|dapo` sets the paper's values of these fields where the command line leaves
them at their defaults (PRESETS below); the default is DAPO-style token aggregation, eps 0.2/0.28.

Run:
    python grpo.py                                   # the embedded toy task, CPU, about 20 seconds
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen3-1.7B --dataset gsm8k --preset dapo \\
        --overlong-cache 256 --num-prompts 64 --group-size 8 --max-new-tokens 1024 --learning-rate 1e-6
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from common.args import TrainArgs, apply_preset, check, cli
from common.batch import collect_batch, score_rollout
from common.run import setup
from common.update import MicroBatch, Update

PRESETS = {
    "grpo": dict(adv_scale="group", loss_agg="sequence", eps_low=0.2, eps_high=0.2, beta=0.04),
    "dr-grpo": dict(adv_scale="none", loss_agg="constant", eps_low=0.2, eps_high=0.2, beta=0.0),
    "dapo": dict(adv_scale="group", loss_agg="token", eps_low=0.2, eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_cache=4),
}


@dataclass
class Args(TrainArgs):
    """GRPO / Dr. GRPO / DAPO: group-relative advantages in a PPO clipped surrogate (the toy task by default)."""

    preset: Literal["none", "grpo", "dr-grpo", "dapo"] = "none"
    """Named loss preset: sets the policy-loss fields (adv_scale, loss_agg, eps_low, eps_high, beta: common/args.py)
    that the command line leaves at their defaults."""
    overlong_cache: int = 0
    """DAPO overlong shaping: penalty ramp over the last N tokens of the budget (0 disables)."""

    def validate(self) -> None:
        super().validate()
        check(self.overlong_cache, "overlong_cache", 0, self.max_new_tokens)


# ---------------------------------------------------------------------------------------------------
# The algorithm: advantages, surrogate, KL, aggregation (pure functions of tensors).


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """A_i = r_i - mean_g(r), divided by std_g(r) + 1e-4 (`group`), the batch std (`batch`) or 1 (`none`)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)  # unbiased std, as TRL
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4)
    return centred.reshape(-1)


def overlong_penalty(lengths: torch.Tensor, truncated: torch.Tensor, max_new_tokens: int, cache: int) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to L_max - L_cache, then a ramp to -1 at the budget."""
    start = max_new_tokens - cache
    ramp = ((start - lengths.float()) / cache).clamp(min=-1.0, max=0.0)
    return torch.where(truncated, torch.full_like(ramp, -1.0), ramp)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and the ratio rho."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), ratio


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - s) - (ref - s) - 1 >= 0."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


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


def main(args: Args) -> None:
    args = apply_preset(args, PRESETS)
    run = setup(args, "grpo", reference=args.beta > 0)

    def shape_rewards(rollout, rewards):  # DAPO's soft overlong punishment, added to the verifier's reward
        return rewards + overlong_penalty(rollout.lengths.cpu(), rollout.truncated.cpu(), args.max_new_tokens,
                                          args.overlong_cache)

    for step in range(run.start_step, args.total_steps):
        metrics = run.evaluate_before(step)  # timed apart from the step: perf/eval_s
        t0 = time.perf_counter()

        # 1. Rollout: G completions per prompt, verified (DAPO: informative groups only).
        batch = collect_batch(run, args, shape_rewards if args.overlong_cache > 0 else None)
        mask = batch.rollout.completion_mask
        t_gen = time.perf_counter()

        # 2. Group advantage, constant over the tokens of a row.
        advantages = group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        token_advantages = advantages[:, None].expand_as(mask).contiguous()

        # 3. Old-policy (and reference) log-probs of the sampled tokens. With one epoch and one
        # minibatch the update's forward is the rollout policy itself: its detached log-probs are
        # pi_old (rho == 1, as in TRL), which saves a whole forward pass (Update takes them from it).
        on_policy = args.ppo_epochs == 1 and args.num_minibatches == 1
        old = {} if on_policy else score_rollout(run, args, batch, with_entropy=True)
        ref_logprobs = score_rollout(run, args, batch, run.reference)["logprobs"] if run.reference is not None else None
        t_score = time.perf_counter()

        # 4. Clipped-surrogate update (+ KL to the reference): an optimizer step per minibatch.
        update = Update(run, args, batch, step, old.get("logprobs"))
        for minibatch in update.minibatches():
            for rows in minibatch.split(args.micro_batch_rows):
                mb = update.forward(rows)
                loss, sums = policy_loss(mb, args, token_advantages, update.old_logprobs, ref_logprobs)
                loss.backward()
                update.log(sums)
            update.step()
        metrics |= update.metrics()
        t_update = time.perf_counter()

        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_score}
        run.end_step(step, t0, metrics, batch, advantages, old.get("entropy", update.entropy))
    run.close()


if __name__ == "__main__":
    main(cli(Args))
