"""Tasks as a common `Example` record: the embedded toy task, local JSONL/parquet files, hub datasets and
reasoning-gym's procedural tasks (`rg:<task>?key=value&...`)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from common.errors import UserError
from common.example import Example
from common.tracking import warn_once


class DataError(UserError):
    """A dataset problem the user can fix (bad path, unknown name, malformed row)."""


LOCAL_FIELDS = {"prompt": str, "answer": (str, int, float), "solution": (str, type(None)), "tests": (list, type(None)),
                "task": str}


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


MATH_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_TEMPLATE = ("{task}\n\nYour code should pass this test:\n{test}\n\n"
                 "Write the Python function in a single fenced ```python code block.")
DATA_DIR_ENV = "CLEANSD_DATA_DIR"
"""If set, registered datasets load from $CLEANSD_DATA_DIR/{name}/{split}.parquet|.jsonl|.json, not the hub."""
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# DAPO-Math-17k wraps every problem in this instruction (verl format); ours replaces it.
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


class Row:
    """One dataset row and where it came from, so that a missing field names the dataset, row and field."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def __getitem__(self, path: str) -> Any:
        """The value at a dotted `path` (e.g. `reward_model.ground_truth`); absent, null or empty is an error."""
        value: Any = self.data
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
            if value in (None, "", []):
                raise DataError(f"{self.where}: missing field '{path}' (fields present: {sorted(self.data)})")
        return value

    def get(self, name: str) -> Any:
        """An optional top-level field (None if absent)."""
        return self.data.get(name)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth = 1
    for i in range(starts[-1], len(text)):
        if text[i - 1] == "\\":  # \{ and \} are literal braces of the answer (a set), not grouping
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[starts[-1]:i].strip() or None
    return None


def gsm8k_row(row: Row) -> Example | None:
    """openai/gsm8k: `question`; `answer` is the reasoning with <<calculator>> annotations, then `#### N`."""
    reasoning, hashes, final = row["answer"].rpartition("####")
    if not hashes:
        return None
    return Example(MATH_TEMPLATE.format(problem=row["question"].strip()), final.strip().replace(",", ""),
                   solution=re.sub(r"<<.*?>>", "", reasoning).strip(), task="math")


def math_row(row: Row) -> Example | None:
    """MATH-style rows: `problem`, `solution`; the answer is the `answer` field, else the solution's last box."""
    answer = row.get("answer")
    answer = last_boxed(row["solution"]) if answer in (None, "") else str(answer).strip()
    if answer is None:
        return None
    return Example(MATH_TEMPLATE.format(problem=row["problem"].strip()), answer, solution=row.get("solution"),
                   task="math")


def dapo_row(row: Row) -> Example:
    """DAPO-Math-17k: `prompt` is a chat list whose user turn wraps the problem; `reward_model.ground_truth`."""
    user = next((turn.get("content") for turn in row["prompt"] if turn.get("role") == "user"), None)
    if not user:
        raise DataError(f"{row.where}: field 'prompt' has no user message")
    # Strip only the exact known wrapper; any other text is kept whole as the problem.
    problem = user.removeprefix(DAPO_PREFIX).removesuffix(DAPO_SUFFIX).strip()
    return Example(MATH_TEMPLATE.format(problem=problem), str(row["reward_model.ground_truth"]).strip(), task="math")


def mbpp_row(row: Row) -> Example:
    """MBPP (config full): `text`, reference `code`, `test_list` asserts, optional `test_setup_code`."""
    asserts, setup = list(row["test_list"]), (row.get("test_setup_code") or "").strip()
    code = row["code"].replace("\r\n", "\n").strip()
    # The first assert shows the function's name and signature; setup (imports) goes before every assert.
    return Example(CODE_TEMPLATE.format(task=row["text"].strip(), test=asserts[0]), "\n".join(asserts),
                   solution=f"```python\n{code}\n```", tests=[f"{setup}\n{t}" if setup else t for t in asserts],
                   task="code")


@dataclass(frozen=True)
class HubDataset:
    """A registered dataset: where each split lives on the hub and how one of its rows becomes an Example."""

    name: str
    splits: dict[str, tuple[str, str | None, str]]
    """Our split (train/test) -> (hub id, config, hub split)."""
    row: Callable[[Row], Example | None]
    """Maps one row; None for a row without a usable final answer (skipped and counted)."""

    def __call__(self, split: str) -> list[Example]:
        """The split's Examples, from the hub or from $CLEANSD_DATA_DIR; duplicate prompts are dropped."""
        if split not in self.splits:
            fix = (f"'{self.name}' is eval-only: train on another dataset and pass --eval-dataset {self.name}"
                   if split == "train" else "pass --eval-dataset with a dataset that has one (e.g. math or aime)")
            raise DataError(f"dataset '{self.name}' has no {split} split: {fix}")
        rows, source = self._rows(split)
        examples, seen, skipped = [], set(), 0
        for i, data in enumerate(rows):
            row = Row(data, f"{self.name} {split} row {i} ({source})")
            example = self.row(row)
            if example is None:
                skipped += 1
            elif example.prompt not in seen:  # DAPO-Math-17k lists each problem about 100 times
                seen.add(example.prompt)
                example.meta["row"] = row.where
                examples.append(example)
        if skipped:
            print(f"note: {self.name} {split}: skipped {skipped} row(s) without a final answer", flush=True)
        if not examples:
            raise DataError(f"{self.name} {split}: no usable rows in {source}")
        return examples

    def _rows(self, split: str) -> tuple[Iterable[dict], str]:
        """The split's raw rows (a `datasets.Dataset`) and a description of their source."""
        import datasets

        hub_id, config, hub_split = self.splits[split]
        root = os.environ.get(DATA_DIR_ENV)
        if root:
            files = sorted(p for p in Path(root, self.name).glob(f"{split}[.-]*") if p.suffix in LOCAL_BUILDERS)
            builders = {LOCAL_BUILDERS[p.suffix] for p in files}
            if len(builders) != 1:
                raise DataError(f"{DATA_DIR_ENV}={root}: need {self.name}/{split}.parquet, .jsonl or .json (one "
                                f"format, fields as on the hub in {hub_id}), found {[p.name for p in files]}; or "
                                f"unset {DATA_DIR_ENV} to load from the hub")
            source = ", ".join(map(str, files))
            try:
                return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train"), source
            except Exception as e:
                raise DataError(f"cannot read {source}: {_first_line(e)}") from e
        try:
            return datasets.load_dataset(hub_id, config, split=hub_split), hub_id
        except Exception as e:  # offline, unknown repo, auth...: all need the same fix
            raise DataError(
                f"cannot load '{self.name}' ({hub_id}, config {config}, split {hub_split}) from the Hugging Face hub: "
                f"{_first_line(e)}. With no network, put the split's file(s) in the hub's schema at "
                f"$CLEANSD_DATA_DIR/{self.name}/{split}.parquet (or .jsonl), or pass --dataset a local .jsonl/.parquet "
                f"file with fields prompt, answer[, solution, tests, task]") from e


def _first_line(error: Exception) -> str:
    """`Type: first line of the message` of a library error, to quote in ours."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def toy_split(split: str) -> list[Example]:
    from common import toy

    return toy.examples(split)


HUB_DATASETS = [
    HubDataset("gsm8k", {"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")},
               gsm8k_row),
    # MATH-lighteval holds the full 7.5k MATH train set in one config (hendrycks_math splits it by subject).
    HubDataset("math", {"train": ("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
                        "test": ("HuggingFaceH4/MATH-500", None, "test")}, math_row),
    HubDataset("dapo-math", {"train": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")}, dapo_row),
    HubDataset("aime", {"test": ("HuggingFaceH4/aime_2024", None, "train")}, math_row),  # its only hub split
    HubDataset("mbpp", {"train": ("google-research-datasets/mbpp", "full", "train"),
                        "test": ("google-research-datasets/mbpp", "full", "test")}, mbpp_row),
]
REGISTRY: dict[str, Callable[[str], list[Example]]] = {"toy": toy_split, **{d.name: d for d in HUB_DATASETS}}
"""Registered dataset names -> loader(split) returning Examples."""


RG_PREFIX = "rg:"
RG_SUFFIX = "\n\nPut your final answer within \\boxed{}."
RG_OPTIONS = {"seed": 0, "train_size": 5000, "test_size": 500, "reward": "binary"}
"""Keys of an `rg:` spec that are ours, not the task's config, with their defaults."""
RG_TRAIN_SEED_OFFSET = 10**6
"""reasoning-gym seeds entry i with `seed + i`: the train split starts this far from the test split's seed."""


def _rg_value(text: str) -> Any:
    """A query-string value as the int, float or bool it spells, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_rg_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`rg:chain_sum?min_terms=2&seed=3` -> ("chain_sum", the task's config, our options with defaults)."""
    name, _, query = spec.removeprefix(RG_PREFIX).partition("?")
    config, options = {}, dict(RG_OPTIONS)
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DataError(f"{spec}: '{pair}' is not key=value (write rg:<task>?key=value&key=value)")
        (options if key in RG_OPTIONS else config)[key] = _rg_value(value)
    for key in ("seed", "train_size", "test_size"):
        if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < (key != "seed"):
            raise DataError(f"{spec}: {key} must be an integer >= {int(key != 'seed')}, got {options[key]!r}")
    if options["reward"] not in ("binary", "task"):
        raise DataError(f"{spec}: reward must be binary (1 when the task's checker gives full marks, else 0) or "
                        f"task (the checker's own score), got {options['reward']!r}")
    return name, config, options


def rg_examples(spec: str, split: str) -> list[Example]:
    """A reasoning-gym task's train or test split: seeded, duplicates dropped, no test question in train."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError(f"{spec}: reasoning-gym is not installed: pip install reasoning-gym") from None
    name, config, options = parse_rg_spec(spec)
    if name not in DATASETS:
        raise DataError(f"{spec}: unknown reasoning-gym task '{name}' (some: {', '.join(sorted(DATASETS)[:12])}, ...; "
                        f"all: python -c 'import reasoning_gym.factory as f; print(sorted(f.DATASETS))')")

    def entries(seed: int, size: int) -> list[dict]:
        try:
            return list(reasoning_gym.create_dataset(name, seed=seed, size=size, **config))
        except Exception as e:  # an unknown key (TypeError) or a value its config rejects (AssertionError...)
            fields = sorted(getattr(DATASETS[name][1], "__dataclass_fields__", {}))
            raise DataError(f"{spec}: reasoning-gym rejected the config {config}: {_first_line(e)} (the task's "
                            f"fields: {', '.join(fields)}; ours: {', '.join(RG_OPTIONS)})") from None

    test = entries(options["seed"], options["test_size"])
    held = {e["question"] for e in test}
    rows = test if split == "test" else [e for e in entries(options["seed"] + RG_TRAIN_SEED_OFFSET,
                                                          options["train_size"]) if e["question"] not in held]
    examples, seen = [], set()
    for i, entry in enumerate(rows):
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        entry = json.loads(json.dumps(entry, default=list))  # what the verifier's worker receives (tuples -> lists)
        solution = entry["metadata"].get("answer_cot") if isinstance(entry.get("metadata"), dict) else None
        examples.append(Example(entry["question"].strip() + RG_SUFFIX, str(entry["answer"]).strip(),
                                solution=solution if isinstance(solution, str) else None, task="rg",
                                meta={"row": f"{spec} {split} entry {i}", "rg": {
                                    "task": name, "config": config, "entry": entry, "reward": options["reward"]}}))
    if not examples:
        raise DataError(f"{spec} {split}: no questions left (every train question is also a test question: "
                        f"raise train_size or widen the task's config)")
    if split == "train" and len(examples) < len(held):  # a small problem space: the test split took most of it
        warn_once(f"rg-small-train {spec}", f"warning: {spec}: the train split holds {len(examples)} distinct "
                  f"questions, fewer than the test split's {len(held)} (the task's config has few distinct problems "
                  f"and test questions never train): lower test_size or widen the config")
    return examples


def is_local_file(name: str) -> bool:
    """Whether `name` is a local data file (by its suffix) rather than a registered dataset."""
    return name not in REGISTRY and Path(name).suffix in (".jsonl", ".json", ".parquet")


HOLDOUT_FRACTION = 0.1
"""Share of a local file's rows held out for evaluation when no --eval-dataset is given."""


def holdout_split(examples: list[Example], max_rows: int) -> tuple[list[Example], list[Example]]:
    """Split one local file into (train, held-out) deterministically: no seed, no dependence on row order.

    The held-out rows are the `min(max_rows, max(1, 10% of rows))` rows whose prompts have the smallest
    SHA-256 digests (so a smaller `max_rows` holds out a subset of a larger one's), and every row whose prompt
    is one of theirs leaves the training set too: a duplicated prompt is never on both sides. At least one
    prompt stays for training: a file with a single distinct prompt holds nothing out (all rows, []).
    """
    digest = {e.prompt: hashlib.sha256(e.prompt.encode()).hexdigest() for e in examples}
    k = min(max_rows, max(1, int(len(examples) * HOLDOUT_FRACTION)), len(digest) - 1)
    if k < 1:
        return list(examples), []
    prompts = sorted(digest, key=digest.get)[:k]
    held = set(prompts)
    first = {}
    for e in examples:
        first.setdefault(e.prompt, e)
    return [e for e in examples if e.prompt not in held], [first[p] for p in prompts]


def load_examples(name: str, split: str = "train") -> list[Example]:
    """Examples of a registered dataset name or a local file path, for `split` (train or test)."""
    if name in REGISTRY:
        return REGISTRY[name](split)
    if name.startswith(RG_PREFIX):
        return rg_examples(name, split)
    if Path(name).suffix in (".jsonl", ".json", ".parquet"):
        return load_local(name)
    raise DataError(f"unknown dataset '{name}': use one of {sorted(REGISTRY)}, rg:<reasoning-gym task>[?key=value&...] "
                    f"or a .jsonl/.parquet path")


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
