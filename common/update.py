"""The optimizer loop every script shares: epochs x minibatches x micro-batches of a script's own loss.

The script supplies the loss of one micro-batch (`LossFn`); this module owns everything around it:
the minibatch split, micro-batching with denominators taken over the whole minibatch and all ranks
(so micro-batching and sharding change nothing), the policy forward, backward, gradient clipping,
the skip of a non-finite update, the learning-rate schedule and the averaging of logged sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.dist import all_reduce


@dataclass
class MicroBatch:
    """What a script's loss sees of one micro-batch."""

    rows: torch.Tensor
    """[b] indices of its rows in the step's batch (on the device)."""
    out: dict[str, torch.Tensor]
    """The policy's forward on them: `logprobs` [b, T] with grad, and `entropy` / `gathered` when asked."""
    mask: torch.Tensor
    """[b, T] completion mask (float)."""
    num_rows: int
    """Rows in the whole minibatch (this rank)."""
    tokens: dict[str, torch.Tensor]
    """Per token mask name (`completion` and the script's own): tokens in the whole minibatch, mean over ranks."""


LossFn = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""micro-batch -> (loss to back-propagate, sums to log: key -> sum over the micro-batch's tokens)."""


def optimize(run, batch, loss_fn: LossFn, step: int, token_masks: dict[str, torch.Tensor] | None = None,
             stat_masks: dict[str, str] | None = None, row_inputs: dict[str, torch.Tensor] | None = None,
             forward_kwargs: dict | None = None, entropy_out: torch.Tensor | None = None) -> dict[str, float]:
    """`--ppo-epochs` x `--num-minibatches` optimizer steps of `loss_fn` over the batch; returns averaged stats.

    token_masks: extra [B, T] masks (name -> mask) whose minibatch token counts `MicroBatch.tokens` carries.
    stat_masks: logged key -> the token mask whose token count averages it (default `completion`).
    row_inputs: [B, ...] tensors for the policy's forward, sliced to each micro-batch's rows (e.g.
        `gather_index` [B, T, k]: vocabulary indices whose log-probs it returns as `gathered`).
    forward_kwargs: further arguments of the policy's forward, the same for every micro-batch.
    entropy_out: a [B, T] buffer that receives the policy's per-token entropy (detached, masked).
    """
    a, r, device = run.args, batch.rollout, run.d.device
    ids, attn, mask = r.input_ids, r.attention_mask, r.completion_mask.float()
    masks = {"completion": mask, **(token_masks or {})}
    B, T = mask.shape
    sums: dict[str, float] = {}

    def add(key: str, value: torch.Tensor | float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    optimizer_step = step * a.ppo_epochs * a.num_minibatches
    for epoch in range(a.ppo_epochs):
        order = torch.randperm(B) if a.num_minibatches > 1 else torch.arange(B)
        for minibatch in order.chunk(a.num_minibatches):
            lr = run.set_lr(optimizer_step)
            run.optimizer.zero_grad(set_to_none=True)
            # Denominators over the whole minibatch and all ranks, so micro-batching changes nothing.
            tokens = {name: all_reduce(m[minibatch].sum()).clamp(min=1) / run.d.world_size for name, m in masks.items()}
            for rows in minibatch.split(a.micro_batch_rows):
                rows_d = rows.to(device)
                with run.d.autocast():
                    out = run.policy(ids[rows_d], attn[rows_d], T, a.temperature, a.logprob_chunk,
                                     with_entropy=entropy_out is not None, share_prompts=True,
                                     **{k: v[rows_d] for k, v in (row_inputs or {}).items()}, **(forward_kwargs or {}))
                if entropy_out is not None:
                    entropy_out[rows_d] = out["entropy"].detach() * mask[rows_d]
                loss, stats = loss_fn(MicroBatch(rows_d, out, mask[rows_d], len(minibatch), tokens))
                loss.backward()
                for key, value in stats.items():
                    add(key, value.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), a.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm):
                run.optimizer.step()
            else:  # a NaN/inf loss never reaches the weights; the step is counted and reported
                add("train/skipped_updates", 1)
                print(f"warning: non-finite gradient norm at step {step}; update skipped", flush=True)
            add("train/grad_norm", grad_norm)
            optimizer_step += 1
    updates = a.ppo_epochs * a.num_minibatches
    stat_masks = stat_masks or {}
    out = {k: v / max(float(masks[stat_masks.get(k, "completion")].sum()) * a.ppo_epochs, 1.0)
           for k, v in sums.items() if not k.startswith("train/")}
    out["train/grad_norm"] = sums["train/grad_norm"] / updates
    out["train/skipped_updates"] = sums.get("train/skipped_updates", 0.0)
    out["train/lr"] = lr
    return out
