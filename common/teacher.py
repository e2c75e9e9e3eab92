"""The self-distillation teacher prompt (ALGORITHMS.md §2): one user turn, problem + privileged block.

The teacher is the same network scoring the same completion tokens after this prompt, rendered with
the same chat template and settings as the student's. A block that makes the prompt too long is
shortened from its middle; the problem and the instruction are never cut.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from common.rollout import render_prompts, tokenize_left

TEACHER_INSTRUCTION = "Now solve the original problem step by step."
CUT_MARK = "\n[...]\n"


def teacher_prompt(problem: str, privileged: str) -> str:
    """The teacher's user message: `{problem}\\n\\n{privileged block}\\n\\n{instruction}`."""
    return f"{problem}\n\n{privileged}\n\n{TEACHER_INSTRUCTION}"


def shorten_middle(tokenizer: PreTrainedTokenizerBase, text: str, drop_tokens: int) -> str:
    """`text` without about `drop_tokens` tokens from its middle (both ends kept, a cut mark between)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = max(len(ids) - drop_tokens, 0)
    head, tail = ids[: keep - keep // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
    return tokenizer.decode(head) + CUT_MARK + tokenizer.decode(tail)


def teacher_inputs(tokenizer: PreTrainedTokenizerBase, problems: list[str], blocks: list[str], max_tokens: int,
                   device: torch.device, enable_thinking: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded teacher prompt ids and mask, one row per (problem, block); also which rows were shortened."""
    rendered, shortened = [], []
    for problem, block in zip(problems, blocks):
        text = render_prompts(tokenizer, [teacher_prompt(problem, block)], enable_thinking)[0]
        excess = len(tokenizer(text, add_special_tokens=False).input_ids) - max_tokens
        if excess > 0 and block:
            mark = len(tokenizer(CUT_MARK, add_special_tokens=False).input_ids)
            block = shorten_middle(tokenizer, block, excess + mark + 2)  # +2: merges at the cut may re-add a token
            text = render_prompts(tokenizer, [teacher_prompt(problem, block)], enable_thinking)[0]
        shortened.append(excess > 0 and bool(block))
        rendered.append(text)
    ids, mask = tokenize_left(tokenizer, rendered, device)
    return ids, mask, torch.tensor(shortened, device=device)
