"""Learning: every algorithm raises the training reward from the shipped toy base in a fixed budget.

Each test trains with the script's defaults (the embedded toy task, P=8 x G=8, lr 3e-4) for 50 steps
at seed 1 with one torch thread (so the run repeats the measured one bit for bit on the same build),
and compares the mean training reward of the last 10 steps with the first 10 (640 samples each).
Measured with exactly these flags (README, Results): at seed 1, gains of +0.022 (hsd) to +0.080 (sd
logit); the margin, +0.015, sits below the smallest. Other seeds are weaker (grpo +0.027, sd logit
+0.058, but sd token -0.014 at seed 2), so this is a regression check of the seed-1 runs rather than a
multi-seed learning claim. Held-out accuracy is logged too (avg@4 at temperature 1 on 100 problems),
but 50 steps move it by less than its noise on some seeds, so it is reported in README, not asserted.
"""
import importlib
import json
import statistics

import pytest
import torch
import tyro

STEPS, WINDOW, MARGIN = 50, 10, 0.015


@pytest.mark.parametrize("script,extra", [
    ("grpo", []), ("sd", []), ("sd", ["--sd-loss", "logit"]), ("credit", []), ("antisd", []),
    ("hsd", ["--diagnostics-every", "10"]),
])
def test_training_reward_rises(script, extra, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module(script)
        module.main(tyro.cli(module.Args, args=[
            "--seed", "1", "--total-steps", str(STEPS), "--eval-every", str(STEPS), "--eval-size", "100",
            "--eval-samples", "4", "--eval-temperature", "1.0", "--output-dir", str(tmp_path), *extra]))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    first = statistics.mean(r["reward/mean"] for r in rows[:WINDOW])
    last = statistics.mean(r["reward/mean"] for r in rows[-WINDOW:])
    assert last - first >= MARGIN, f"{script} {extra}: reward {first:.3f} -> {last:.3f}"
