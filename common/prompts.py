"""Chat-template rendering and left-padded tokenisation of prompts (student and teacher alike)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where used: a command line parses before transformers loads
    from transformers import PreTrainedTokenizerBase


def render_prompts(tokenizer: PreTrainedTokenizerBase, messages: list[str], enable_thinking: bool = False) -> list[str]:
    """Each user message through the tokenizer's chat template, ending with the assistant header."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=enable_thinking) for m in messages]


def tokenize_left(tokenizer: PreTrainedTokenizerBase, texts: list[str],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of already rendered texts (no extra special tokens)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)
