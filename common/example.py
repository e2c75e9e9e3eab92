"""The `Example` record every task is turned into (prompt, answer, optional solution and tests, task)."""
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
