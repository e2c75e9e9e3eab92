"""GRPO, Dr. GRPO and DAPO: group-relative policy optimisation with verifiable rewards.

Papers: Shao et al. 2024, DeepSeekMath (GRPO); Liu et al. 2025, arXiv 2503.20783 (Dr. GRPO);
Yu et al. 2025, arXiv 2503.14476 (DAPO).

Idea: sample G completions per prompt, score them with a verifier, and use each completion's reward
relative to its group as the advantage of every one of its tokens in a PPO clipped surrogate:

    A_i   = (r_i - mean_g r) / (std_g r + 1e-4)                                     (group advantage)
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i),  rho_t = pi/pi_old (surrogate)
    l_t  += beta * (exp(ref_t - s_t) - (ref_t - s_t) - 1)                            (k3 KL, optional)

aggregated per `--loss-agg`: `sequence` (GRPO: token mean per row, then row mean), `token` (DAPO:
sum over all tokens / their count) or `constant` (Dr. GRPO: sum / (rows * max_new_tokens)).

Presets (`--preset`, ALGORITHMS.md §1) set these fields:
    grpo     adv-scale group, loss-agg sequence, eps 0.2/0.2, beta 0.04
    dr-grpo  adv-scale none,  loss-agg constant, eps 0.2/0.2, beta 0
    dapo     adv-scale group, loss-agg token,    eps 0.2/0.28, beta 0, dynamic sampling, overlong shaping
The default (`--preset none`) is the project's choice: DAPO-style token aggregation with group scaling,
eps 0.2/0.28, beta 0, one optimizer step per rollout batch, temperature 1.0, no dynamic sampling.

Run:
    python grpo.py                                   # the embedded toy task, CPU, a few minutes
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen3-1.7B --dataset gsm8k --preset dapo \\
        --num-prompts 64 --group-size 8 --max-new-tokens 1024 --learning-rate 1e-6 --total-steps 200
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import tyro

from common.args import TrainArgs
from common.data import Example
from common.dist import all_reduce, shard
from common.logprobs import score_completions
from common.models import load_policy
from common.rollout import Rollout, concat_rollouts, generate, render_prompts, select_rows
from common.run import Run, setup
from common.verifiers import Verdict, verify

PRESETS = {
    "grpo": dict(adv_scale="group", loss_agg="sequence", eps_low=0.2, eps_high=0.2, beta=0.04),
    "dr-grpo": dict(adv_scale="none", loss_agg="constant", eps_low=0.2, eps_high=0.2, beta=0.0),
    "dapo": dict(adv_scale="group", loss_agg="token", eps_low=0.2, eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_cache=4),
}


@dataclass
class Args(TrainArgs):
    preset: Literal["none", "grpo", "dr-grpo", "dapo"] = "none"
    """Named loss preset; overrides the loss fields below (see the module docstring)."""
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
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and resample until P informative groups (bounded)."""
    max_sampling_rounds: int = 4
    """Rollout rounds allowed to fill the batch under dynamic sampling."""
    overlong_cache: int = 0
    """DAPO overlong shaping: penalty ramp over the last N tokens of the budget (0 disables)."""


def apply_preset(args: Args) -> Args:
    """Copy the named preset's values onto `args`."""
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)
    return args


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


# ---------------------------------------------------------------------------------------------------
# Rollout with DAPO's optional dynamic sampling, and the PPO update (shared by the SD scripts).


@dataclass
class Batch:
    """One step's verified rollout: rows of a prompt contiguous, P groups of G."""

    rollout: Rollout
    examples: list[Example]
    """The example of each row."""
    verdicts: list[Verdict]
    rewards: torch.Tensor
    """[B] rewards (after overlong shaping)."""
    sampled_groups: int
    """Groups generated to fill this batch (> P under dynamic sampling)."""


def collect_batch(run: Run, args: Args) -> Batch:
    """Roll out G completions for P prompts, verify, and (DAPO) keep informative groups."""
    G, P = args.group_size, run.local_prompts
    parts, examples, verdicts, rewards, informative, sampled = [], [], [], [], [], 0
    for _ in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        prompts = run.sampler.take(P)
        r = generate(run.policy, run.tokenizer, render_prompts(run.tokenizer, [e.prompt for e in prompts], args.enable_thinking),
                     G, args.max_new_tokens, args.temperature, args.top_p, autocast=run.d.autocast)
        v = [verify(e, text) for e, text in zip([e for e in prompts for _ in range(G)], r.texts)]
        rew = torch.tensor([x.reward for x in v], dtype=torch.float32)
        if args.overlong_cache > 0:
            rew = rew + overlong_penalty(r.lengths.cpu(), r.truncated.cpu(), args.max_new_tokens, args.overlong_cache)
        base = sum(p.completion_ids.shape[0] for p in parts)
        parts.append(r)
        examples += [e for e in prompts for _ in range(G)]
        verdicts += v
        rewards.append(rew)
        sampled += P
        informative += [base + g * G for g in range(P) if rew[g * G:(g + 1) * G].std() > 0]
        if not args.dynamic_sampling or len(informative) >= P:
            break
    rollout, rewards = concat_rollouts(parts, run.tokenizer.pad_token_id), torch.cat(rewards)
    # Informative groups first, then (if rounds ran out) uninformative ones, so every step has P groups.
    starts = informative[:P] + [s for s in range(0, len(examples), G) if s not in informative][: P - len(informative[:P])]
    rows = [s + j for s in sorted(starts) for j in range(G)] if args.dynamic_sampling else list(range(len(examples)))
    return Batch(select_rows(rollout, rows), [examples[i] for i in rows], [verdicts[i] for i in rows],
                 rewards[rows], sampled)


@dataclass
class ExtraLoss:
    """A per-token loss added to the surrogate with its own token mean over `mask` (sd.py's logit mode)."""

    fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    """(forward outputs of a micro-batch, its row indices) -> per-token loss [b, T]."""
    mask: torch.Tensor
    """[B, T] tokens the loss applies to."""
    coef: float
    gather_index: torch.Tensor | None = None
    """[B, T, k] vocabulary indices whose log-probs the forward must return (`gathered`)."""


def ppo_update(run: Run, args: Args, batch: Batch, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, step: int, extra: ExtraLoss | None = None,
               entropy_out: torch.Tensor | None = None) -> dict[str, float]:
    """PPO epochs x minibatches of the clipped surrogate on token advantages [B, T]; returns stats.

    `old_logprobs=None` (one epoch, one minibatch only): the update's own forward runs the rollout
    policy, so its detached log-probs are the old ones (ratio == 1) and no separate pass is needed;
    the forward then also writes the policy's per-token entropy into `entropy_out` [B, T].
    """
    r, device = batch.rollout, run.d.device
    ids, attn, mask = r.input_ids, r.attention_mask, r.completion_mask.float()
    B, T = mask.shape
    sums: dict[str, float] = {}

    def add(key: str, value: torch.Tensor | float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    if old_logprobs is None and (args.ppo_epochs, args.num_minibatches) != (1, 1):
        raise ValueError("old log-probs can only come from the update's forward with one epoch and one minibatch")
    optimizer_step = step * args.ppo_epochs * args.num_minibatches
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(B) if args.num_minibatches > 1 else torch.arange(B)
        for minibatch in order.chunk(args.num_minibatches):
            lr = run.set_lr(optimizer_step)
            run.optimizer.zero_grad(set_to_none=True)
            # Denominators over the whole minibatch and all ranks, so micro-batching changes nothing.
            tokens = all_reduce(mask[minibatch].sum()) / run.d.world_size
            extra_tokens = all_reduce(extra.mask[minibatch].sum()).clamp(min=1) / run.d.world_size if extra else None
            for rows in minibatch.split(args.micro_batch_rows):
                rows_d = rows.to(device)
                with run.d.autocast():
                    out = run.policy(ids[rows_d], attn[rows_d], T, args.temperature, args.logprob_chunk,
                                     with_entropy=entropy_out is not None, group_size=args.group_size,
                                     gather_index=extra.gather_index[rows_d] if extra and extra.gather_index is not None else None)
                m = mask[rows_d]
                old = out["logprobs"].detach() if old_logprobs is None else old_logprobs[rows_d]
                if entropy_out is not None:
                    entropy_out[rows_d] = out["entropy"].detach() * m
                per_token, ratio = clipped_surrogate(out["logprobs"], old, advantages[rows_d], args.eps_low, args.eps_high)
                loss = aggregate(per_token, m, args.loss_agg, len(minibatch), tokens, args.max_new_tokens)
                if ref_logprobs is not None:
                    kl = k3_kl(out["logprobs"], ref_logprobs[rows_d])
                    loss = loss + args.beta * aggregate(kl, m, args.loss_agg, len(minibatch), tokens, args.max_new_tokens)
                    add("loss/kl", (kl * m).sum().detach())
                if extra is not None:
                    distill = extra.fn(out, rows_d)
                    loss = loss + extra.coef * (distill * extra.mask[rows_d]).sum() / extra_tokens
                    add("loss/distill", (distill * extra.mask[rows_d]).sum().detach())
                loss.backward()
                adv = advantages[rows_d]
                add("loss/policy", (per_token * m).sum().detach())
                add("policy/clip_frac_low", ((ratio < 1 - args.eps_low) & (adv < 0)).float().mul(m).sum())
                add("policy/clip_frac_high", ((ratio > 1 + args.eps_high) & (adv > 0)).float().mul(m).sum())
                add("policy/ratio_mean", (ratio.detach() * m).sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm):
                run.optimizer.step()
            else:  # a NaN/inf loss never reaches the weights; the step is counted and reported
                add("train/skipped_updates", 1)
                print(f"warning: non-finite gradient norm at step {step}; update skipped", flush=True)
            add("train/grad_norm", grad_norm)
            optimizer_step += 1
    updates = args.ppo_epochs * args.num_minibatches
    total_tokens = mask.sum().clamp(min=1) * args.ppo_epochs
    stats = {k: v / float(total_tokens) for k, v in sums.items() if k.startswith(("loss/", "policy/"))}
    if extra is not None:
        stats["loss/distill"] = sums.get("loss/distill", 0.0) / max(float(extra.mask.sum()) * args.ppo_epochs, 1.0)
    stats["train/grad_norm"] = sums["train/grad_norm"] / updates
    stats["train/skipped_updates"] = sums.get("train/skipped_updates", 0.0)
    stats["train/lr"] = lr
    return stats


def rollout_metrics(run: Run, args: Args, batch: Batch, advantages: torch.Tensor) -> dict[str, float]:
    """Reward, accuracy, group, length and sampling statistics of a step, averaged over ranks."""
    G, r = args.group_size, batch.rollout
    rewards = batch.rewards
    correct = torch.tensor([float(v.correct) for v in batch.verdicts])
    zero_std = (rewards.view(-1, G).std(dim=1) == 0).float()
    lengths = r.lengths.float().cpu()
    local = torch.stack([rewards.mean(), (rewards ** 2).mean(), correct.mean(), zero_std.mean(), lengths.mean(),
                         r.truncated.float().mean().cpu(), advantages.abs().mean(), torch.tensor(batch.sampled_groups / run.local_prompts)])
    mean = all_reduce(local) / run.d.world_size
    return {"reward/mean": mean[0].item(), "reward/std": math.sqrt(max(mean[1].item() - mean[0].item() ** 2, 0.0)),
            "reward/accuracy": mean[2].item(), "reward/frac_zero_std": mean[3].item(),
            "completion/len_mean": mean[4].item(), "completion/len_max": all_reduce(lengths.max(), "max").item(),
            "completion/clipped_ratio": mean[5].item(), "adv/abs_mean": mean[6].item(),
            "sampling/groups_per_prompt_slot": mean[7].item()}


def score_old_and_ref(run: Run, args: Args, batch: Batch, reference=None, old_pass: bool = True,
                      **stats) -> tuple[dict, torch.Tensor | None]:
    """Log-probs of the sampled tokens under the rollout policy (with entropy) and the reference.

    `old_pass=False` skips the rollout-policy pass (the update's forward provides it, see `ppo_update`).
    """
    r = batch.rollout
    score = dict(temperature=args.temperature, chunk_size=args.logprob_chunk, micro_rows=args.micro_batch_rows,
                 group_size=args.group_size)  # a group's rows share their prompt: it runs once
    with run.d.autocast():
        old = score_completions(run.policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                with_entropy=True, **score, **stats) if old_pass else {}
        ref = score_completions(reference, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                **score)["logprobs"] if reference is not None else None
    return old, ref


def finish_step(run: Run, args: Args, step: int, t0: float, metrics: dict, batch: Batch, advantages: torch.Tensor,
                old: dict, state: dict | None = None) -> None:
    """The tail every loop shares: rollout statistics, final eval, samples, the metrics line, checkpoint."""
    mask = batch.rollout.completion_mask.float()
    metrics |= rollout_metrics(run, args, batch, advantages.cpu())
    metrics["policy/entropy"] = (all_reduce((old["entropy"] * mask).sum()) / all_reduce(mask.sum())).item()
    if step == args.total_steps - 1 and run.is_eval_step(step):
        metrics |= run.evaluate(step)  # the last step reports the final policy
    metrics["perf/step_s"] = time.perf_counter() - t0
    metrics["perf/tokens_per_s"] = float(all_reduce(mask.sum())) / metrics["perf/step_s"]
    if args.sample_every > 0 and step % args.sample_every == 0:
        run.tracker.samples(step, [{"split": "train", "prompt": e.prompt, "completion": t, "reward": float(r)}
                                   for e, t, r in list(zip(batch.examples, batch.rollout.texts, batch.rewards))[:4]])
    run.tracker.log(step, metrics)
    if run.should_save(step):
        run.save(step + 1, state)


def main(args: Args) -> None:
    args = apply_preset(args)
    run = setup(args, "grpo")
    reference = None
    if args.beta > 0:  # the frozen initial policy; shares nothing with the trained weights
        reference = shard(load_policy(args.model, run.d.device).requires_grad_(False).eval(), run.d)
    for step in range(run.start_step, args.total_steps):
        t0 = time.perf_counter()
        metrics = run.evaluate_before(step)

        # 1. Rollout: G completions per prompt, verified (DAPO: informative groups only).
        batch = collect_batch(run, args)
        t_gen = time.perf_counter()

        # 2. Group advantage, constant over the tokens of a row.
        advantages = group_advantages(batch.rewards, args.group_size, args.adv_scale).to(run.d.device)
        token_advantages = advantages[:, None].expand_as(batch.rollout.completion_mask).contiguous()

        # 3. Old-policy (and reference) log-probs of the sampled tokens. With one epoch and one
        # minibatch the update's forward is the rollout policy itself: its detached log-probs are
        # pi_old (rho == 1, as in TRL), which saves a whole forward pass.
        on_policy = args.ppo_epochs == 1 and args.num_minibatches == 1
        old, ref_logprobs = score_old_and_ref(run, args, batch, reference, old_pass=not on_policy)
        t_score = time.perf_counter()

        # 4. Clipped-surrogate update.
        if on_policy:
            old["entropy"] = torch.zeros_like(batch.rollout.completion_mask, dtype=torch.float32)
        metrics |= ppo_update(run, args, batch, token_advantages, old.get("logprobs"), ref_logprobs, step,
                              entropy_out=old["entropy"] if on_policy else None)
        t_update = time.perf_counter()

        metrics |= {"perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/update_s": t_update - t_score}
        finish_step(run, args, step, t0, metrics, batch, advantages, old)
    run.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
