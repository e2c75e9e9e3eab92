"""The self-distillation teacher: its prompt (a script's template), its peer, its scoring, its EMA weights, its stats.

The teacher is the same network (or a copy of it: EMA, initial) scoring the same completion tokens
after a teacher prompt, one user turn rendered with the same chat template and settings as the
student's. Each script writes its paper's template as a `TeacherMessage`: the text before the
privileged block, the block, the text after it. Only the block is ever shortened (from its middle),
so the problem and the instruction are never cut.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from common.dist import all_reduce
from common.logprobs import score_completions
from common.prompts import render_prompts, tokenize_left
from common.rollout import select_rows

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


def score_teacher(run, args, batch, messages: list[TeacherMessage], max_prompt_tokens: int,
                  rows: list[int] | None = None, gather_index: torch.Tensor | None = None,
                  model: torch.nn.Module | None = None, **stats) -> dict:
    """Teacher log-probs of the batch's own completion tokens (of `rows`, default all) after one message per row.

    `model` defaults to the run's teacher weights; `gather_index` is given for the rows scored. Rows whose
    teacher prompts are identical (a plain prompt, the same peer) run that prompt once. Also returns
    `shortened` (rows whose block was cut) and `prompt_len` (teacher prompt tokens) per row.
    """
    a, r = args, batch.rollout if rows is None else select_rows(batch.rollout, rows)
    ids, mask, shortened = teacher_inputs(run.tokenizer, messages, max_prompt_tokens, run.d.device, a.enable_thinking)
    with run.d.autocast():
        out = score_completions(model if model is not None else run.teacher_model, ids, mask, r.completion_ids,
                                r.completion_mask, a.temperature, a.logprob_chunk, a.micro_batch_rows,
                                gather_index=gather_index, share_prompts=True, **stats)
    out["shortened"] = shortened.float()
    out["prompt_len"] = mask.sum(-1).float()
    return out


class ScoredOnce:
    """A step's per-row scores, each row scored once: the whole batch before the update, or a micro-batch at a time
    inside it, once the student's forward has given the top-k to score at (SDPO's code). Kept by row for the step's
    statistics; `seconds` is the time spent scoring."""

    def __init__(self, num_rows: int, score: Callable[..., dict[str, torch.Tensor]]):
        """score(rows: list[int], gather_index [b, T, k] or None, **stats) -> those rows' values, rows first."""
        self.num_rows, self.score, self.seconds = num_rows, score, 0.0
        self.values: dict[str, torch.Tensor] = {}
        self.scored = torch.zeros(num_rows, dtype=torch.bool)

    def __call__(self, rows: torch.Tensor | None = None, gather_index: torch.Tensor | None = None,
                 **stats) -> dict[str, torch.Tensor]:
        """The values of `rows` (default all): scored now, unless they already were."""
        rows = torch.arange(self.num_rows) if rows is None else rows.cpu()
        if self.scored[rows].all():
            return {key: value[rows] for key, value in self.values.items()}
        start = time.perf_counter()
        out = self.score(rows.tolist(), gather_index, **stats)
        for key, value in out.items():
            if torch.equal(rows, torch.arange(self.num_rows)):  # the whole batch: kept as it is (no copy)
                self.values[key] = value
            else:
                self.values.setdefault(key, value.new_zeros(self.num_rows, *value.shape[1:]))[rows] = value
        self.scored[rows] = True
        self.seconds += time.perf_counter() - start
        return out


def teacher_scores(run, args, batch, messages: list[TeacherMessage], max_prompt_tokens: int) -> ScoredOnce:
    """`score_teacher` of a batch's rows with their messages, each row scored once (see `ScoredOnce`)."""
    return ScoredOnce(len(messages), lambda rows, gather_index, **stats: score_teacher(
        run, args, batch, [messages[i] for i in rows], max_prompt_tokens, rows, gather_index, **stats))


def choose_peers(correct: torch.Tensor, group_size: int, mode: str, generator: torch.Generator | None = None,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the batch index of a successful other row of its group, or -1 when there is none.

    correct [B] bool with groups contiguous; `random` draws uniformly (iid keys, argmax), `first` takes the
    lowest index, `shortest` the fewest `lengths` tokens (ties: lowest index). A row never picks itself.
    """
    G = group_size
    ok = correct.view(-1, G)
    candidates = ok[:, None, :] & ~torch.eye(G, dtype=torch.bool)  # [P, row, peer]
    if mode == "random":
        key = torch.rand(candidates.shape, generator=generator)
    elif mode == "first":
        key = torch.zeros(candidates.shape)  # argmax returns the first maximal index
    elif mode == "shortest":
        key = -lengths.view(-1, 1, G).float().expand(candidates.shape)
    else:
        raise ValueError(f"unknown peer choice {mode!r}")
    pick = key.masked_fill(~candidates, -math.inf).argmax(-1) + G * torch.arange(ok.shape[0])[:, None]
    return torch.where(candidates.any(-1), pick, -1).reshape(-1)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """phi <- (1 - rate) phi + rate theta, parameter by parameter (shard by shard under FSDP2)."""
    for phi, theta in zip(teacher.parameters(), student.parameters()):
        phi.lerp_(theta.detach(), rate)


def coverage_metrics(distilled: torch.Tensor, successful: torch.Tensor, group_size: int, step: int,
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
