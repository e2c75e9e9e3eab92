"""Tasks as a common `Example` record: the embedded toy task, local JSONL/parquet files, hub datasets."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


class DataError(ValueError):
    """A dataset problem the user can fix (bad path, unknown name, malformed row)."""


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
    """Which verifier checks it: `toy`, `math` or `code`."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (source row index, id)."""


LOCAL_FIELDS = {"prompt": str, "answer": str, "solution": (str, type(None)), "tests": (list, type(None)), "task": str}


def example_from_row(row: dict, where: str, default_task: str = "math") -> Example:
    """Validate one local-file row (`prompt`, `answer`, optional `solution`/`tests`/`task`) into an Example."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("prompt", "answer"):
        if name not in row or row[name] is None:
            raise DataError(f"{where}: missing required field '{name}' (fields present: {sorted(row)})")
    for name, kind in LOCAL_FIELDS.items():
        if name in row and not isinstance(row[name], kind):
            raise DataError(f"{where}: field '{name}' has type {type(row[name]).__name__}")
    prompt, answer = row["prompt"].strip(), str(row["answer"]).strip()
    if not prompt:
        raise DataError(f"{where}: field 'prompt' is empty")
    task = row.get("task", default_task)
    if task not in ("toy", "math", "code"):
        raise DataError(f"{where}: field 'task' must be toy, math or code, got {task!r}")
    tests = row.get("tests")
    if task == "code" and not tests:
        raise DataError(f"{where}: a code row needs a non-empty 'tests' list")
    if tests is not None and not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: field 'tests' must be a list of strings")
    return Example(prompt=prompt, answer=answer, solution=row.get("solution"), tests=tests, task=task,
                   meta={"row": where})


def read_rows(path: Path) -> Iterable[tuple[str, dict]]:
    """Yield (location, row) pairs from a .jsonl/.json/.parquet file, naming the line of a bad row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
    elif path.suffix in (".jsonl", ".json"):
        with open(path) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:line {i}: not valid JSON ({e.msg})") from None
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl or .parquet)")


def load_local(path: str | Path) -> list[Example]:
    """Load and validate a local JSONL/parquet file with fields prompt, answer[, solution, tests, task]."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    examples = [example_from_row(row, where) for where, row in read_rows(path)]
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def toy_split(split: str) -> list[Example]:
    from common import toy

    return toy.examples(split)


REGISTRY: dict[str, Callable[[str], list[Example]]] = {"toy": toy_split}
"""Registered dataset names -> loader(split) returning Examples."""


def load_examples(name: str, split: str = "train") -> list[Example]:
    """Examples of a registered dataset name or a local file path, for `split` (train or test)."""
    if name in REGISTRY:
        return REGISTRY[name](split)
    if Path(name).suffix in (".jsonl", ".json", ".parquet"):
        return load_local(name)
    raise DataError(f"unknown dataset '{name}': use one of {sorted(REGISTRY)} or a .jsonl/.parquet path")


class PromptSampler:
    """Endless seeded shuffle over examples; its position is saved in checkpoints."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed, self.epoch, self.index = examples, seed, 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        """The next `n` examples, reshuffling at each epoch boundary."""
        out = []
        while len(out) < n:
            if self.index == len(self.order):
                self.epoch, self.index = self.epoch + 1, 0
                self.order = self._order()
            out.append(self.examples[self.order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self.order = self._order()
