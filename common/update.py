"""The mechanics around a script's own loss: minibatches, the policy's forward, the optimizer step.

A script's update reads, in its `main()`:

    update = Update(run, args, batch, step, old_logprobs)   # old_logprobs None: from the update's forward
    for minibatch in update.minibatches():              # --ppo-epochs x --num-minibatches
        for rows in minibatch.split(args.micro_batch_rows):
            mb = update.forward(rows)                   # the policy on these rows, with grad
            loss, sums = my_loss(mb, update.old_logprobs[mb.rows], ...)
            loss.backward()
            update.log(sums)
        update.step()                                   # clip, skip a non-finite gradient, AdamW step
    metrics |= update.metrics()

This module owns the denominators taken over the whole minibatch and all ranks (so micro-batching and
sharding change nothing), the learning-rate schedule, gradient clipping, the skip of a non-finite
update and the averaging of logged sums. With one update per batch the update's forward is the rollout
policy itself, so its detached log-probs are pi_old: no separate old-policy pass is needed (TRL, SDPO).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.dist import all_reduce


@dataclass
class MicroBatch:
    """What a script's loss sees of one micro-batch."""

    rows: torch.Tensor
    """[b] indices of its rows in the step's batch (on the device)."""
    out: dict[str, torch.Tensor]
    """The policy's forward on them: `logprobs` [b, T] with grad, and `entropy` / `gathered` / `paired` when asked."""
    mask: torch.Tensor
    """[b, T] completion mask (float)."""
    num_rows: int
    """Rows in the whole minibatch (this rank)."""
    tokens: dict[str, torch.Tensor]
    """Per token mask name (`completion` and the script's own): tokens in the whole minibatch, mean over ranks."""


class Update:
    """One batch's `--ppo-epochs` x `--num-minibatches` optimizer steps around a loss the script computes."""

    def __init__(self, run, args, batch, step: int, old_logprobs: torch.Tensor | None = None,
                 token_masks: dict[str, torch.Tensor] | None = None):
        """old_logprobs: s_old [B, T] from a separate old-policy pass; None (one update per batch): each forward fills
        `self.old_logprobs` rows with its own detached log-probs and `self.entropy` with its entropies, before
        the script's loss reads them. token_masks: extra [B, T] masks (name -> mask) whose minibatch token
        counts `MicroBatch.tokens` carries."""
        self.run, self.args, self.rollout = run, args, batch.rollout
        self.mask = batch.rollout.completion_mask.float()
        self.masks = {"completion": self.mask, **(token_masks or {})}
        on_policy = old_logprobs is None
        if on_policy and self.args.ppo_epochs * self.args.num_minibatches > 1:
            raise ValueError("s_old from the update's own forward needs one update per batch")
        self.old_logprobs = torch.zeros_like(self.mask) if on_policy else old_logprobs
        self.entropy = torch.zeros_like(self.mask) if on_policy else None
        self.step_index, self.optimizer_step = step, step * self.args.ppo_epochs * self.args.num_minibatches
        self.sums: dict[str, float] = {}
        self.num_rows, self.tokens, self.lr = 0, {}, 0.0

    def minibatches(self) -> Iterator[torch.Tensor]:
        """Each minibatch's rows (shuffled when there are several), with its learning rate set and gradients zeroed."""
        a, B = self.args, self.mask.shape[0]
        for _ in range(a.ppo_epochs):
            order = torch.randperm(B) if a.num_minibatches > 1 else torch.arange(B)
            for rows in order.chunk(a.num_minibatches):
                self.lr = self.run.set_lr(self.optimizer_step)
                self.run.optimizer.zero_grad(set_to_none=True)
                self.num_rows = len(rows)
                # Denominators over the whole minibatch and all ranks, so micro-batching changes nothing.
                self.tokens = {name: all_reduce(m[rows].sum()).clamp(min=1) / self.run.d.world_size
                               for name, m in self.masks.items()}
                yield rows

    def forward(self, rows: torch.Tensor, gather_index: torch.Tensor | None = None,
                paired_hidden: torch.Tensor | None = None, **kwargs) -> MicroBatch:
        """The policy's forward on a micro-batch's rows, with grad.

        gather_index [B, T, k] / paired_hidden [B, T, H]: the whole batch's, sliced to the rows here (the
        vocabulary indices whose log-probs to return as `gathered`; a second model's final hidden states for
        kwargs' `paired_head` / `paired_fn`, which yield `paired`).
        """
        a, r, run = self.args, self.rollout, self.run
        rows = rows.to(run.d.device)
        sliced = {k: v[rows] for k, v in (("gather_index", gather_index), ("paired_hidden", paired_hidden))
                  if v is not None}
        with run.d.autocast():
            out = run.policy(r.input_ids[rows], r.attention_mask[rows], self.mask.shape[1], a.temperature,
                             a.logprob_chunk, with_entropy=self.entropy is not None, share_prompts=True, **sliced,
                             **kwargs)
        if self.entropy is not None:  # the rollout policy itself: s_old and its entropy
            self.old_logprobs[rows] = out["logprobs"].detach()
            self.entropy[rows] = out["entropy"].detach() * self.mask[rows]
        return MicroBatch(rows, out, self.mask[rows], self.num_rows, self.tokens)

    def log(self, sums: dict[str, torch.Tensor]) -> None:
        """Add a micro-batch's logged sums (key -> sum over its tokens)."""
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())

    def step(self) -> None:
        """Clip the gradient and step the optimizer, unless its norm is not finite (then the update is skipped)."""
        run = self.run
        grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), self.args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(grad_norm):
            run.optimizer.step()
        else:  # a NaN/inf loss never reaches the weights; the step is counted and reported
            self.sums["train/skipped_updates"] = self.sums.get("train/skipped_updates", 0.0) + 1
            print(f"warning: non-finite gradient norm at step {self.step_index}; update skipped", flush=True)
        self.sums["train/grad_norm"] = self.sums.get("train/grad_norm", 0.0) + float(grad_norm)
        self.optimizer_step += 1

    def metrics(self, stat_masks: dict[str, str] | None = None) -> dict[str, float]:
        """Logged sums as means per token (of `stat_masks[key]`'s mask, default `completion`) and epoch; train/..."""
        a, stat_masks = self.args, stat_masks or {}
        out = {k: v / max(float(self.masks[stat_masks.get(k, "completion")].sum()) * a.ppo_epochs, 1.0)
               for k, v in self.sums.items() if not k.startswith("train/")}
        out["train/grad_norm"] = self.sums["train/grad_norm"] / (a.ppo_epochs * a.num_minibatches)
        out["train/skipped_updates"] = self.sums.get("train/skipped_updates", 0.0)
        out["train/lr"] = self.lr
        return out
