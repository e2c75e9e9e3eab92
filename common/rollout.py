"""Sample G completions per prompt with HF `generate`: left-padded prompts, stop at EOS, masks, text."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.models import Policy
from common.prompts import tokenize_left

if TYPE_CHECKING:  # imported where used: a command line parses before transformers loads
    from transformers import PreTrainedTokenizerBase


@dataclass
class Rollout:
    """A batch of prompt + completion rows; rows of one prompt are contiguous (view(P, G))."""

    prompt_ids: torch.Tensor
    """[B, Lp] left-padded prompt token ids."""
    prompt_mask: torch.Tensor
    """[B, Lp] 1 on prompt tokens."""
    completion_ids: torch.Tensor
    """[B, T] completion ids, right-padded with pad after the first EOS."""
    completion_mask: torch.Tensor
    """[B, T] 1 on completion tokens up to and including EOS."""
    texts: list[str]
    """Decoded completions (special tokens skipped)."""
    truncated: torch.Tensor
    """[B] bool: no EOS within the token budget."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def completion_masks(ids: torch.Tensor, eos_ids: list[int],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row after its first EOS: (ids padded after EOS, mask incl. EOS, truncated flags)."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return ids.masked_fill(after_eos, pad_id), mask, ~is_eos.any(-1)


@contextlib.contextmanager
def unsharded_for_generation(policy: torch.nn.Module):
    """Under FSDP2, gather all parameters once for the whole rollout and reshard afterwards.

    Decoding runs one forward per token; resharding after each would all-gather every layer every
    token, and ranks finishing at different lengths would then deadlock on mismatched collectives.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(True)


@torch.no_grad()
def shared_prompt_cache(policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                        max_new_tokens: int):
    """KV cache of each prompt but its last token, computed once and repeated for the group's `group_size` rows.

    `generate` then runs only the last prompt token per row before sampling: the prefill, most of a rollout's
    compute when completions are short, costs 1/G of running every row's prompt. The cache is static (allocated
    for the prompt and `max_new_tokens` once): a growing cache copies every layer's keys and values at each
    token, which on a CPU took half of the decoding time.
    """
    from transformers import StaticCache

    from common.models import cache_kwarg

    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = policy.lm.model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                          position_ids=position_ids[:, :-1], use_cache=True)
    prefix = out[cache_kwarg(type(policy.lm.model))]
    cache = StaticCache(config=policy.lm.config, max_cache_len=prompt_ids.shape[1] + max_new_tokens)
    for layer, shared in zip(cache.layers, prefix.layers):
        layer.update(shared.keys.repeat_interleave(group_size, 0), shared.values.repeat_interleave(group_size, 0))
    return cache


@torch.no_grad()
def generate(policy: Policy, tokenizer: PreTrainedTokenizerBase, prompts: list[str], group_size: int,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, autocast=contextlib.nullcontext,
             share_prompts: bool = True) -> Rollout:
    """`group_size` samples of each rendered prompt (greedy when temperature == 0).

    `share_prompts`: prefill each prompt once for its group (`shared_prompt_cache`); False runs every row's
    prompt, as plain `generate` does (the benchmark's baseline; same tokens up to float rounding).
    """
    from transformers import GenerationConfig

    from common.models import cache_kwarg

    device = next(policy.parameters()).device
    unique_ids, unique_mask = tokenize_left(tokenizer, prompts, device)
    prompt_ids, prompt_mask = unique_ids.repeat_interleave(group_size, 0), unique_mask.repeat_interleave(group_size, 0)
    gen_eos = policy.lm.generation_config.eos_token_id
    eos_ids = sorted({tokenizer.eos_token_id,
                      *(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])})
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                              top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                              eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    was_training = policy.training
    policy.eval()  # also turns gradient checkpointing off while decoding
    with unsharded_for_generation(policy), autocast():
        cache = {}
        if share_prompts and group_size > 1 and unique_ids.shape[1] > 1:
            cache = {cache_kwarg(type(policy.lm)): shared_prompt_cache(policy, unique_ids, unique_mask, group_size,
                                                                        max_new_tokens)}
        out = policy.lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **cache)
    policy.train(was_training)
    ids, mask, truncated = completion_masks(out[:, prompt_ids.shape[1]:], eos_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, ids, mask, texts, truncated)


def _pad_to(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    pad = t.new_full((t.shape[0], width - t.shape[1]), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different prompt/completion widths (prompts stay left-, completions right-padded)."""
    lp, tc = max(p.prompt_ids.shape[1] for p in parts), max(p.completion_ids.shape[1] for p in parts)
    return Rollout(torch.cat([_pad_to(p.prompt_ids, lp, pad_id, True) for p in parts]),
                   torch.cat([_pad_to(p.prompt_mask, lp, 0, True) for p in parts]),
                   torch.cat([_pad_to(p.completion_ids, tc, pad_id, False) for p in parts]),
                   torch.cat([_pad_to(p.completion_mask, tc, 0, False) for p in parts]),
                   [t for p in parts for t in p.texts], torch.cat([p.truncated for p in parts]))


def select_rows(r: Rollout, rows: list[int]) -> Rollout:
    """The given rows of a rollout (keeps group order as listed)."""
    idx = torch.tensor(rows, dtype=torch.long, device=r.prompt_ids.device)
    return Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.completion_ids[idx], r.completion_mask[idx],
                   [r.texts[i] for i in rows], r.truncated[idx])
