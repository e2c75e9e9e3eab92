"""grpo.py end to end: metrics interface, determinism, crash + resume, wandb offline, over-long prompts."""
import json

import pytest

import grpo
from common import tracking

FAST = ["--total-steps", "4", "--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "24",
        "--eval-every", "2", "--eval-size", "16"]


def run(tmp_model, out, *extra):
    import tyro

    args = tyro.cli(grpo.Args, args=["--model", str(tmp_model), "--output-dir", str(out), *FAST, *extra])
    grpo.main(args)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_metrics_interface_and_determinism(tiny_model_dir, tmp_path):
    a = run(tiny_model_dir, tmp_path / "a")
    b = run(tiny_model_dir, tmp_path / "b")
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    assert all("reward/mean" in r for r in a)
    assert [("eval/accuracy" in r) for r in a] == [True, False, True, True]
    assert strip_perf(a) == strip_perf(b)
    args = json.loads((tmp_path / "a" / "args.json").read_text())
    assert args["total_steps"] == 4 and args["model"] == str(tiny_model_dir)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint" / "model")


def test_evaluation_leaves_training_unchanged(tiny_model_dir, tmp_path):
    """Evaluation draws from its own seeded stream: --eval-every changes no training metric."""
    often = run(tiny_model_dir, tmp_path / "often", "--eval-every", "1", "--eval-samples", "2")
    never = run(tiny_model_dir, tmp_path / "never", "--eval-every", "0")
    assert all("eval/accuracy" in r for r in often) and not any("eval/accuracy" in r for r in never)
    train = [{k: v for k, v in r.items() if not k.startswith(("perf/", "eval/"))} for r in often]
    assert train == strip_perf(never)


def test_crash_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    full = run(tiny_model_dir, tmp_path / "full", "--save-every", "2")
    original = tracking.Tracker.log

    def crash_after_step_2(self, step, metrics):
        original(self, step, metrics)
        if step == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(tracking.Tracker, "log", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "resumed", "--save-every", "2")
    monkeypatch.setattr(tracking.Tracker, "log", original)
    # The crash left a logged step 2 beyond the step-2 checkpoint; resuming rewrites it identically.
    resumed = run(tiny_model_dir, tmp_path / "resumed", "--save-every", "2", "--resume")
    assert strip_perf(resumed) == strip_perf(full)


def test_track_offline_writes_wandb_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tiny_model_dir, tmp_path / "w", "--track", "--total-steps", "1")
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_over_long_prompts_are_skipped(tiny_model_dir, tmp_path, capsys):
    rows = run(tiny_model_dir, tmp_path / "s", "--max-prompt-tokens", "36", "--total-steps", "1")
    assert rows and "over-long skipped" in capsys.readouterr().out
    from common.data import DataError

    with pytest.raises(DataError, match="every training prompt is longer"):
        run(tiny_model_dir, tmp_path / "t", "--max-prompt-tokens", "5", "--total-steps", "1")
