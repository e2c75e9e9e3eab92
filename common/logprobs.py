"""Chunked per-token log-probs, entropies and top-k gathers, so no [B, T, V] fp32 tensor exists at once.

log p(y_t) = z_y - logsumexp(z) with z = logits / tau, and the entropy
H = logsumexp(z) - sum softmax(z) * z, each computed one chunk of token positions at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PairedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(this model's logits [N, V] / tau, a second model's logits [N, V] / tau, detached) -> a value per position [N]."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on for x's device, else x's own."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class LinearLogProb(torch.autograd.Function):
    """log softmax(h W^T / tau)[y] per row, and the entropy as a detached statistic, for one chunk of positions.

    What autograd would keep for the backward of `log_softmax` and `gather` (a full [N, V] softmax, a zero-filled
    [N, V] gradient to scatter into) is never made: forward keeps only h, W, y and logsumexp; backward recomputes
    the logits once, turns them into softmax in place and forms d/dlogits = g (onehot(y) - softmax) / tau in the
    same buffer, then the two products for dh and dW.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = _compute_dtype(hidden)
        logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
        if temperature != 1.0:
            logits.div_(temperature)
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        entropy = None
        if with_entropy:  # H = lse - sum softmax(z) z, as _chunk_stats computes it
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
        grad = F.linear(h, w).float()
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        scale = grad_logprobs.float() / ctx.temperature
        grad.sub_(lse[:, None]).exp_().mul_(-scale[:, None])  # -g p / tau
        grad.scatter_add_(-1, targets[:, None], scale[:, None])  # + g onehot(y) / tau
        grad = grad.to(ctx.dtype)
        grad_hidden = (grad @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def _chunk_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                 with_entropy: bool, topk: int, gather_index: torch.Tensor | None, gather_topk: bool,
                 paired_hidden: torch.Tensor | None, paired_head: torch.nn.Module | None, paired_fn: PairedFn | None):
    """Stats of one chunk of positions: hidden [N, H] -> logits [N, V] (fp32) -> per-token values."""
    logits = head(hidden).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - lse]
    if with_entropy:
        out.append(lse - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    if topk:
        top = logits.detach().topk(topk, dim=-1).indices
        out.append(top)
        gather_index = top if gather_topk else gather_index
    if gather_index is not None:
        picked = logits.gather(-1, gather_index) - lse[:, None]
        tail = log1mexp(torch.logsumexp(picked, dim=-1))  # log(1 - sum_topk p): the tail bucket
        out.append(torch.cat([picked, tail[:, None]], dim=-1))
    if paired_fn is not None:
        with torch.no_grad():  # the second model (a teacher) never receives gradients
            other = paired_head(paired_hidden).float() / temperature
        out.append(paired_fn(logits, other))
    return tuple(out)


def token_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                chunk_size: int = 1024, with_entropy: bool = False, topk: int = 0,
                gather_index: torch.Tensor | None = None, gather_topk: bool = False,
                paired_hidden: torch.Tensor | None = None, paired_head: torch.nn.Module | None = None,
                paired_fn: PairedFn | None = None) -> dict[str, torch.Tensor]:
    """Per-position log-prob of `targets`, optional entropy / top-k indices / log-probs at `gather_index`.

    hidden [B, T, H] are the states that predict targets [B, T]; `gather_index` [B, T, k] (or, with
    `gather_topk`, each position's own top-k) yields `gathered` [B, T, k+1] (k log-probs and the tail
    log(1 - sum p)). `paired_fn` gets this model's full-vocabulary logits and a second model's,
    `paired_head(paired_hidden)` [B, T, H] (no grad), one chunk at a time, and yields `paired` [B, T].
    Under grad, each chunk's logits are recomputed in backward so only one chunk of logits is alive (by
    `LinearLogProb` when only log-probs and entropies are asked of a plain linear head, the entropy then
    detached: a statistic; otherwise by activation checkpointing).
    """
    B, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(B * T, H), targets.reshape(B * T)
    flat_g = gather_index.reshape(B * T, -1) if gather_index is not None else None
    flat_p = paired_hidden.reshape(B * T, -1) if paired_hidden is not None else None
    pieces = []
    fused = torch.is_grad_enabled() and flat_h.requires_grad and not topk and gather_index is None and \
        paired_fn is None and type(head) is torch.nn.Linear and head.bias is None
    for i in range(0, B * T, chunk_size):
        if fused:  # the common case under grad (an update's log-probs): LinearLogProb's lean backward
            logprobs, entropy = LinearLogProb.apply(flat_h[i:i + chunk_size], head.weight, flat_t[i:i + chunk_size],
                                                    temperature, with_entropy)
            pieces.append((logprobs, entropy) if with_entropy else (logprobs,))
            continue
        args = (flat_h[i:i + chunk_size], head, flat_t[i:i + chunk_size], temperature, with_entropy, topk,
                flat_g[i:i + chunk_size] if flat_g is not None else None, gather_topk,
                flat_p[i:i + chunk_size] if flat_p is not None else None, paired_head, paired_fn)
        if torch.is_grad_enabled() and flat_h.requires_grad:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))
    cols = [torch.cat(p, dim=0) for p in zip(*pieces)]
    names = ["logprobs"] + ["entropy"] * with_entropy + ["topk_index"] * bool(topk) + \
        ["gathered"] * (gather_index is not None or (gather_topk and bool(topk))) + ["paired"] * (paired_fn is not None)
    return {n: c.reshape(B, T, *c.shape[1:]) for n, c in zip(names, cols)}


def naive_token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Reference implementation on full [B, T, V] logits (tests and benchmarks only)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return {"logprobs": logp.gather(-1, targets[..., None]).squeeze(-1), "entropy": -(logp.exp() * logp).sum(-1)}


@torch.no_grad()
def score_completions(policy: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float,
                      chunk_size: int, micro_rows: int, gather_index: torch.Tensor | None = None,
                      **stats) -> dict[str, torch.Tensor]:
    """Score fixed completion tokens after the given (left-padded) prompts, without grad.

    This is both the old-policy pass (the student's own prompts) and the teacher path (teacher
    prompts + the same completion ids): completion positions line up with the student's exactly.
    Values at padding positions are zeroed.
    """
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    T, parts = completion_ids.shape[1], []
    for i in range(0, ids.shape[0], micro_rows):
        g = gather_index[i:i + micro_rows] if gather_index is not None else None
        parts.append(policy(ids[i:i + micro_rows], mask[i:i + micro_rows], T, temperature, chunk_size,
                            gather_index=g, **stats))
    if hasattr(policy, "reshard"):  # FSDP2 keeps the root unsharded after forward; free it between passes
        policy.reshard()
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    for k, v in out.items():
        if v.is_floating_point():
            out[k] = v * completion_mask.view(*completion_mask.shape, *([1] * (v.dim() - 2)))
    return out
