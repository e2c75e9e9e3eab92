"""The records the pipeline passes around: an `Example` (prompt, answer, optional solution and tests, task) and the
`Verdict` a verifier returns on a completion (a record here, so the verifiers and the code sandbox both import it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One prompt with what the verifier and the SD teacher need."""

    prompt: str
    """The user message given to the policy (task instructions included)."""
    answer: str
    """The exact final answer (math/toy); for code, a short description of the expected behaviour."""
    solution: str | None = None
    """A worked reference solution, if the dataset has one (used as privileged context)."""
    tests: list[str] | None = None
    """Code tasks: Python statements (asserts) that a correct program passes."""
    task: str = "toy"
    """Which verifier checks it: `toy`, `math`, `code` or `rg` (a reasoning-gym task: `meta["rg"]`)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (source row index, id)."""


@dataclass
class Verdict:
    """A verifier's reward, correctness and one short line of feedback."""

    reward: float
    """1.0 correct / 0.0 wrong for toy and math; fraction of tests passed for code."""
    correct: bool
    """Toy/math: exact; code: all tests passed."""
    feedback: str
    """One short factual line for the self-distillation teacher."""


def one_line(text: str, limit: int = 60) -> str:
    """`text` on one line, cut to `limit` characters, for feedback."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
