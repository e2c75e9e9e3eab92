"""Console progress, `metrics.jsonl`, optional wandb (`--track`), sample completions and per-problem eval scores."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

CONSOLE_KEYS = ("reward/mean", "eval/accuracy", "loss/policy", "policy/entropy", "completion/len_mean", "perf/step_s")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (a resumed run rewrites them identically).

    A kill mid-write can leave a torn last line: it is dropped with a note. A malformed line before
    the last is not a crash artefact and raises a `ValueError` naming it.
    """
    if not path.exists():
        return
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    kept = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"note: {path}: dropped a torn last line (a crash mid-write): {line[:60]!r}", flush=True)
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}); only a torn last line is "
                             f"dropped on resume") from None
        if not isinstance(row, dict) or row.get("step", -1) <= last_step:
            kept.append(line)
    path.write_text("".join(ln + "\n" for ln in kept))


class Tracker:
    """Writes one JSON object per step to `metrics.jsonl`, a console line, and wandb when tracking."""

    def __init__(self, output_dir: Path, args: Any, run_name: str, enabled: bool, resume_step: int | None = None):
        self.enabled, self.output_dir = enabled, output_dir
        self.metrics_path, self.samples_path = output_dir / "metrics.jsonl", output_dir / "samples.jsonl"
        self.eval_path = output_dir / "eval_scores.jsonl"
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(args)
        (output_dir / "args.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in (self.metrics_path, self.samples_path, self.eval_path):
            if resume_step is None:
                path.unlink(missing_ok=True)
            else:
                truncate_jsonl(path, resume_step - 1)
        self.wandb = None
        if getattr(args, "track", False):
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=run_name, config=config,
                                    dir=str(output_dir), id=run_name.replace("/", "_"), resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one step (rank 0 only)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = " ".join(f"{k}={row[k]:.4g}" for k in CONSOLE_KEYS if k in row and not math.isnan(row[k]))
        print(f"step {step:5d} | {shown}", flush=True)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def eval_scores(self, step: int, scores: list[float]) -> None:
        """Append one evaluation's per-problem scores (fraction of correct samples, eval-set order) to
        `eval_scores.jsonl`."""
        if not self.enabled:
            return
        with open(self.eval_path, "a") as f:
            f.write(json.dumps({"step": step, "scores": scores}) + "\n")

    def samples(self, step: int, rows: list[dict]) -> None:
        """Append completion samples (prompt, completion, reward) to `samples.jsonl` and wandb."""
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.wandb is not None:
            import wandb

            cols = list(rows[0])
            self.wandb.log({"samples": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}, step=step)

    def finish(self) -> None:
        if self.enabled and self.wandb is not None:
            self.wandb.finish()


warned: set[str] = set()
"""Keys of the one-time notes printed so far in this process."""


def warn_once(key: str, message: str) -> None:
    """Print `message` the first time `key` is seen in this process (a note, not an error)."""
    if key not in warned:
        warned.add(key)
        print(message, flush=True)
