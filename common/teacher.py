"""The self-distillation teacher: its prompt (a script's template), its scoring pass, its EMA weights, its statistics.

The teacher is the same network (or a copy of it: EMA, initial) scoring the same completion tokens
after a teacher prompt, one user turn rendered with the same chat template and settings as the
student's. Each script writes its paper's template as a `TeacherMessage`: the text before the
privileged block, the block, the text after it. Only the block is ever shortened (from its middle),
so the problem and the instruction are never cut.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from common.dist import all_reduce
from common.logprobs import score_completions
from common.prompts import render_prompts, tokenize_left

if TYPE_CHECKING:  # imported where used: a command line parses before transformers loads
    from transformers import PreTrainedTokenizerBase

CUT_MARK = "\n[...]\n"


class TeacherMessage(NamedTuple):
    """The teacher's user message `head + block + tail`; `block` (the privileged context) may be shortened."""

    head: str
    block: str = ""
    tail: str = ""

    @property
    def text(self) -> str:
        return self.head + self.block + self.tail


def shorten_middle(tokenizer: PreTrainedTokenizerBase, text: str, drop_tokens: int) -> str:
    """`text` without about `drop_tokens` tokens from its middle (both ends kept, a cut mark between)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = max(len(ids) - drop_tokens, 0)
    head, tail = ids[: keep - keep // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
    return tokenizer.decode(head) + CUT_MARK + tokenizer.decode(tail)


def teacher_inputs(tokenizer: PreTrainedTokenizerBase, messages: list[TeacherMessage], max_tokens: int,
                   device: torch.device,
                   enable_thinking: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded teacher prompt ids and mask, one row per message; also which rows were shortened."""
    rendered, shortened = [], []
    for message in messages:
        text = render_prompts(tokenizer, [message.text], enable_thinking)[0]
        excess = len(tokenizer(text, add_special_tokens=False).input_ids) - max_tokens
        if excess > 0 and message.block:
            mark = len(tokenizer(CUT_MARK, add_special_tokens=False).input_ids)
            block = shorten_middle(tokenizer, message.block, excess + mark + 2)  # +2: merges at the cut may add a token
            text = render_prompts(tokenizer, [message._replace(block=block).text], enable_thinking)[0]
        shortened.append(excess > 0 and bool(message.block))
        rendered.append(text)
    ids, mask = tokenize_left(tokenizer, rendered, device)
    return ids, mask, torch.tensor(shortened, device=device)


def score_teacher(run, batch, messages: list[TeacherMessage], max_prompt_tokens: int,
                  gather_index: torch.Tensor | None = None, model: torch.nn.Module | None = None, **stats) -> dict:
    """Teacher log-probs of the batch's own completion tokens after per-row teacher messages.

    `model` defaults to the run's teacher weights. Rows whose teacher prompts are identical (a plain
    prompt, the same peer) run that prompt once. Also returns `shortened` (rows whose block was cut)
    and `prompt_len` (teacher prompt tokens) per row.
    """
    a, r = run.args, batch.rollout
    ids, mask, shortened = teacher_inputs(run.tokenizer, messages, max_prompt_tokens, run.d.device, a.enable_thinking)
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


def distillation_coverage(distilled: torch.Tensor, successful: torch.Tensor, group_size: int, step: int,
                          is_main: bool = True) -> dict[str, float]:
    """Fractions of rows distilled and of groups with a success (all ranks); warns when a step distils nothing.

    The warning is printed at the first silent step, then at most once every 10 steps while none distils.
    """
    n_rows, n_distilled, n_groups, n_success = all_reduce(torch.tensor(
        [distilled.numel(), distilled.sum().item(), successful.numel() // group_size,
         successful.view(-1, group_size).any(-1).sum().item()], dtype=torch.float64, device=distilled.device)).tolist()
    if n_distilled:
        _silent_warning["step"] = None
    elif _silent_warning["step"] is None or step - _silent_warning["step"] >= 10:
        _silent_warning["step"] = step
        if is_main:
            print(f"warning: step {step} distils no row (no group has a successful rollout and no environment "
                  f"feedback was used): its self-distillation loss is zero", flush=True)
    return {"sd/frac_rows_distilled": n_distilled / n_rows, "sd/frac_groups_with_success": n_success / n_groups}


_silent_warning: dict[str, int | None] = {"step": None}
"""The step of the last 'distils no row' warning, while no step since has distilled a row."""


def teacher_metrics(credit: torch.Tensor, teacher: dict, mask: torch.Tensor, t_teacher: float) -> dict:
    """The `sd/` statistics of a teacher pass: the credit u = t - s_old per token and per row (pMI), the teacher's
    log-probs and prompt lengths, over completion tokens and rows of all ranks."""
    n_tokens, n_rows = all_reduce(mask.sum()), all_reduce(torch.tensor(float(mask.shape[0])))
    return {"sd/credit_mean": (all_reduce(credit.sum()) / n_tokens).item(),
            "sd/credit_abs_mean": (all_reduce(credit.abs().sum()) / n_tokens).item(),
            "sd/pmi_seq_mean": (all_reduce(credit.sum()) / n_rows).item(),
            "sd/teacher_logp_mean": (all_reduce((teacher["logprobs"] * mask).sum()) / n_tokens).item(),
            "sd/teacher_prompt_len": (all_reduce(teacher["prompt_len"].sum()) / n_rows).item(),
            "sd/frac_shortened": (all_reduce(teacher["shortened"].sum()) / n_rows).item(),
            "perf/teacher_s": t_teacher}
