"""The self-distillation teacher: its prompt (problem + privileged block), its scoring pass, its EMA weights.

The teacher is the same network (or a copy of it: EMA, initial) scoring the same completion tokens
after a teacher prompt, one user turn rendered with the same chat template and settings as the
student's. A block that makes the prompt too long is shortened from its middle; the problem and the
instruction are never cut.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.logprobs import score_completions
from common.prompts import render_prompts, tokenize_left

if TYPE_CHECKING:  # imported where used: a command line parses before transformers loads
    from transformers import PreTrainedTokenizerBase

TEACHER_INSTRUCTION = "Now solve the original problem step by step."
CUT_MARK = "\n[...]\n"


def teacher_prompt(problem: str, privileged: str, instruction: str = TEACHER_INSTRUCTION) -> str:
    """The teacher's user message: `{problem}\\n\\n{privileged block}\\n\\n{instruction}` (no last line if it is "")."""
    return "\n\n".join([problem, privileged, *([instruction] if instruction else [])])


def shorten_middle(tokenizer: PreTrainedTokenizerBase, text: str, drop_tokens: int) -> str:
    """`text` without about `drop_tokens` tokens from its middle (both ends kept, a cut mark between)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = max(len(ids) - drop_tokens, 0)
    head, tail = ids[: keep - keep // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
    return tokenizer.decode(head) + CUT_MARK + tokenizer.decode(tail)


def teacher_inputs(tokenizer: PreTrainedTokenizerBase, problems: list[str], blocks: list[str], max_tokens: int,
                   device: torch.device, enable_thinking: bool = False,
                   instruction: str = TEACHER_INSTRUCTION) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded teacher prompt ids and mask, one row per (problem, block); also which rows were shortened."""
    rendered, shortened = [], []
    for problem, block in zip(problems, blocks):
        text = render_prompts(tokenizer, [teacher_prompt(problem, block, instruction)], enable_thinking)[0]
        excess = len(tokenizer(text, add_special_tokens=False).input_ids) - max_tokens
        if excess > 0 and block:
            mark = len(tokenizer(CUT_MARK, add_special_tokens=False).input_ids)
            block = shorten_middle(tokenizer, block, excess + mark + 2)  # +2: merges at the cut may re-add a token
            text = render_prompts(tokenizer, [teacher_prompt(problem, block, instruction)], enable_thinking)[0]
        shortened.append(excess > 0 and bool(block))
        rendered.append(text)
    ids, mask = tokenize_left(tokenizer, rendered, device)
    return ids, mask, torch.tensor(shortened, device=device)


def score_teacher(run, batch, blocks: list[str], max_prompt_tokens: int, problems: list[str] | None = None,
                  gather_index: torch.Tensor | None = None, model: torch.nn.Module | None = None,
                  instruction: str = TEACHER_INSTRUCTION, **stats) -> dict:
    """Teacher log-probs of the batch's own completion tokens after per-row teacher prompts (problem + block).

    `problems` defaults to each row's own prompt; `model` to the run's teacher weights; `instruction` is the
    prompt's last line (`teacher_prompt`). Rows whose teacher
    prompts are identical (an answer-only block, the same feedback, a repeated peer) run that prompt once.
    Also returns `shortened` (rows whose block was cut) and `prompt_len` (teacher prompt tokens) per row.
    """
    a, r = run.args, batch.rollout
    problems = problems if problems is not None else [e.prompt for e in batch.examples]
    ids, mask, shortened = teacher_inputs(run.tokenizer, problems, blocks, max_prompt_tokens, run.d.device,
                                          a.enable_thinking, instruction)
    with run.d.autocast():
        out = score_completions(model if model is not None else run.teacher_model, ids, mask, r.completion_ids,
                                r.completion_mask, a.temperature, a.logprob_chunk, a.micro_batch_rows,
                                gather_index=gather_index, share_prompts=True, **stats)
    out["shortened"] = shortened.float()
    out["prompt_len"] = mask.sum(-1).float()
    return out


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """phi <- (1 - rate) phi + rate theta, parameter by parameter (shard by shard under FSDP2)."""
    for phi, theta in zip(teacher.parameters(), student.parameters()):
        phi.lerp_(theta.detach(), rate)
