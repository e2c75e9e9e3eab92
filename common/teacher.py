"""The self-distillation teacher prompt (ALGORITHMS.md §2): one user turn, problem + privileged block."""
from __future__ import annotations

TEACHER_INSTRUCTION = "Now solve the original problem step by step."
ELLIPSIS = "\n[...]\n"


def teacher_prompt(problem: str, privileged: str) -> str:
    """The teacher's user message: `{problem}\\n\\n{privileged block}\\n\\n{instruction}`."""
    return f"{problem}\n\n{privileged}\n\n{TEACHER_INSTRUCTION}"


def shorten_middle(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` characters by removing its middle (keeps both ends)."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - len(ELLIPSIS), 0)
    head = keep - keep // 2
    return text[:head] + ELLIPSIS + text[len(text) - keep // 2:] if keep else text[:max_chars]
