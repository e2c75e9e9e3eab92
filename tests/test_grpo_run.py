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


def test_crash_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, monkeypatch, capsys):
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
    # A kill mid-write also leaves a torn last line: resuming drops it (and says so).
    for name in ("metrics.jsonl", "samples.jsonl", "eval_scores.jsonl"):
        with open(tmp_path / "resumed" / name, "a") as f:
            f.write('{"step": 3, "reward/me')
    # The crash left a logged step 2 beyond the step-2 checkpoint; resuming rewrites it identically.
    resumed = run(tiny_model_dir, tmp_path / "resumed", "--save-every", "2", "--resume")
    assert strip_perf(resumed) == strip_perf(full)
    assert "dropped a torn last line" in capsys.readouterr().out
    for name in ("samples.jsonl", "eval_scores.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text()


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


ONE_STEP = ["--total-steps", "1", "--eval-every", "0"]


def test_existing_run_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from common import args as common_args
    from common import run as common_run

    out = tmp_path / "r"
    run(tiny_model_dir, out, *ONE_STEP)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the run directory was checked")

    monkeypatch.setattr(common_run, "load_tokenizer", no_load)
    monkeypatch.setattr(common_run, "load_policy", no_load)
    with pytest.raises(common_args.ArgError, match=f"--output-dir {out} already holds a run .*metrics.jsonl.*"
                                                   "checkpoint/.*--resume.*--overwrite"):
        run(tiny_model_dir, out, *ONE_STEP)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # the command line: one line, exit code 2
        common_args.cli(grpo.Args, args=["--model", str(tiny_model_dir), "--output-dir", str(out)])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(f"error: --output-dir {out} already holds a run")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_overwrite_replaces_a_run_and_a_dir_without_one_may_be_used(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_text("an older run's checkpoint")
    (out / "metrics.jsonl").write_text('{"step": 0, "old": 1.0}\n{"step": 1, "old": 1.0}\n')
    rows = run(tiny_model_dir, out, *ONE_STEP, "--overwrite")
    assert [r["step"] for r in rows] == [0] and "old" not in rows[0]
    import torch

    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 1
    # An existing directory that holds no run (empty, or unrelated files) is used as is.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    assert [r["step"] for r in run(tiny_model_dir, tmp_path / "notes", *ONE_STEP)] == [0]
    assert (tmp_path / "notes" / "README").read_text() == "mine"


def test_resume_without_a_checkpoint_says_so(tiny_model_dir, tmp_path, capsys):
    rows = run(tiny_model_dir, tmp_path / "typo", *ONE_STEP, "--resume")
    assert [r["step"] for r in rows] == [0]
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {tmp_path / 'typo'} (the directory does not exist); starting a fresh run" in err


def test_a_run_whose_updates_are_all_skipped_fails(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(grpo, "group_advantages", lambda rewards, g, scale: torch.full_like(rewards, float("nan")))
    with pytest.raises(SystemExit) as exc:
        run(tiny_model_dir, tmp_path / "nan", "--total-steps", "2", "--eval-every", "0")
    assert exc.value.code not in (0, None) and "every update of this run was skipped" in str(exc.value.code)
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_updates"] for r in rows] == [1.0, 1.0]
