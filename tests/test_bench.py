"""bench/compare.py --quick: every algorithm runs, and the CSVs and figures come out consistent."""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_compare_quick_pipeline(tmp_path):
    # Four of the configurations (the learning tests train every one): those whose diagnostics are checked.
    chosen = ["grpo", "credit", "hsd", "hsd-grpo"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--jobs", "2",
                           "--algorithms", *chosen, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["algorithm"] for r in summary] == chosen
    curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
    for r in summary:  # the summary is computed from the curves: first and last eval of the one seed
        evals = [c for c in curves if c["algorithm"] == r["algorithm"]]
        assert [int(c["step"]) for c in evals] == [0, 2]
        first, last = float(evals[0]["eval_accuracy"]), float(evals[-1]["eval_accuracy"])
        assert abs(float(r["gain_mean"]) - (last - first)) < 1e-4 and r["seeds"] == "1"
        assert 0 <= first <= 1 and 0 <= last <= 1
    diagnostics = {(r["algorithm"], r["metric"]) for r in csv.DictReader((tmp_path / "diagnostics.csv").open())}
    assert (("hsd", "hsd/abs_credit_near_div_answer_only") in diagnostics
            and ("credit", "credit/contrast_mean") in diagnostics)
    assert ("hsd-grpo", "hsd/credit_mass_near_div") in diagnostics
    for png in ("curves.png", "diagnostics.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --reuse reads the finished runs back instead of training again: the same summary, no new run.
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--reuse", "--algorithms",
                            *chosen, "--out", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reused") == len(summary)
    assert list(csv.DictReader((tmp_path / "summary.csv").open())) == summary


def test_generation_benchmark_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "generation.py"), "--model", "toy", "--dataset", "toy",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split("  ")[0].strip(): line for line in proc.stdout.splitlines()}
    for stage in ("generate (prompts shared)", "generate (every row)", "update (fwd + bwd + AdamW)"):
        ratio = float(lines[stage].split()[-1 if stage == "generate (every row)" else -4].rstrip("x"))
        assert ratio > 0
    assert "greedy tokens identical with and without" in proc.stdout


def test_compare_real_mode_resumes_and_reports_the_standard_error(tmp_path):
    """--real runs the five scripts' pipeline with LoRA and the real-model flags (here on the toy model, for time),
    reports eval_n and the gain's standard error, and --reuse resumes an interrupted run from its checkpoint."""
    def compare(steps: int, *flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "bench" / "compare.py"), "--real", "--model", "toy", "--dataset", "toy",
               "--algorithms", "grpo:1", "--steps", str(steps), "--eval-every", "1", "--out", str(tmp_path), *flags,
               "--", "--eval-size", "12", "--num-prompts", "2", "--group-size", "4", "--max-new-tokens", "16"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    compare(2)
    run_dir = tmp_path / "runs" / "grpo-1"
    args = json.loads((run_dir / "args.json").read_text())
    assert args["lora_rank"] == 64 and args["eval_temperature"] == 0 and args["eval_max_new_tokens"] == 128
    first_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    compare(3, "--reuse")  # the 2-step run's final checkpoint continues to 3 steps instead of starting again
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[:2] == first_rows[:2]
    (summary,) = csv.DictReader((tmp_path / "summary.csv").open())
    p0, p1, n = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"], rows[0]["eval/problems"]
    assert int(summary["eval_n"]) == n == 12
    expected = (p0 * (1 - p0) / n + p1 * (1 - p1) / n) ** 0.5
    assert abs(float(summary["gain_se_mean"]) - expected) < 1e-4
    # Paired over problems: the first and last evaluation's per-problem scores, explicit sums.
    evals = [json.loads(line) for line in (run_dir / "eval_scores.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2]
    d = [b - a for a, b in zip(evals[0]["scores"], evals[-1]["scores"])]
    mean = sum(d) / n
    paired = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5
    assert abs(float(summary["gain_se_paired_mean"]) - paired) < 1e-4 and abs(mean - (p1 - p0)) < 1e-9
    # runs.csv: the run's own row, with the problems that changed counted one by one.
    (run,) = csv.DictReader((tmp_path / "runs.csv").open())
    better = sum(1 for a, b in zip(evals[0]["scores"], evals[-1]["scores"]) if (a, b) == (0, 1))
    worse = sum(1 for a, b in zip(evals[0]["scores"], evals[-1]["scores"]) if (a, b) == (1, 0))
    assert (run["algorithm"], run["seed"], float(run["gain"])) == ("grpo", "1", pytest.approx(p1 - p0, abs=1e-4))
    assert (float(run["better"]), float(run["worse"])) == (better, worse)
    assert float(run["gain_se_paired"]) == pytest.approx(paired, abs=1e-4)
    assert (float(run["vs_grpo"]), float(run["vs_grpo_se"])) == (0, 0)  # grpo against its own run of the same seed


def test_paired_difference_against_explicit_sums():
    sys.path.insert(0, str(ROOT / "bench"))
    import compare

    scores, baseline = [1, 0, 1, 1, 0, 0.5], [0, 0, 1, 0, 1, 0.25]
    d = [1, 0, 0, 1, -1, 0.25]
    mean = sum(d) / 6
    se = (sum((x - mean) ** 2 for x in d) / 5 / 6) ** 0.5
    assert compare.paired_difference(scores, baseline) == (pytest.approx(mean), pytest.approx(se))
    with pytest.raises(ValueError):  # never over different problem sets
        compare.paired_difference(scores, baseline[:5])


def test_compare_takes_seeds_per_algorithm():
    sys.path.insert(0, str(ROOT / "bench"))
    import compare

    assert compare.algorithm_seeds("grpo:1,2") == ("grpo", [1, 2])
    assert compare.algorithm_seeds("credit-grpo") == ("credit-grpo", None)
    for bad in ("gpro", "grpo:1,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown algorithm|must be integers"):
            compare.algorithm_seeds(bad)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--algorithms", "grpo:one"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be integers" in proc.stderr


def test_real_samples_regenerates_the_recorded_verdicts(tmp_path):
    """bench/real_samples.py reloads a LoRA run's base (adapters off) and final checkpoint, lists the problems whose
    greedy score changed, and its regenerated answers get the scores the run recorded for them."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--total-steps", "3", "--eval-every", "2", "--eval-size", "32",
           "--eval-samples", "1", "--eval-temperature", "0", "--lora-rank", "8", "--learning-rate", "3e-2",
           "--sample-every", "0", "--output-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_samples.py"), str(run_dir), "--count", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    evals = [json.loads(line) for line in (run_dir / "eval_scores.jsonl").read_text().splitlines()]
    changed = [i for i, (a, b) in enumerate(zip(evals[0]["scores"], evals[-1]["scores"])) if a != b]
    assert changed, "the run should move some greedy answer at this learning rate"
    base = [r for r in rows if r["policy"] == "base"]
    final = [r for r in rows if r["policy"] == "final"]
    assert ([r["problem"] for r in base] == [r["problem"] for r in final]
            and set(r["problem"] for r in base) <= set(changed))
    assert base and all(r["score"] == r["recorded"] for r in rows), rows
    assert all(b["recorded"] != f["recorded"] for b, f in zip(base, final))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_samples.py"), str(run_dir), "--all"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    for who, evaluation in (("base", evals[0]), ("final", evals[-1])):  # --all: every problem, the run's verifier
        mine = [r for r in rows if r["policy"] == who]
        assert [r["problem"] for r in mine] == list(range(32)) and all(r["score"] == r["recorded"] for r in mine)
        accuracy = f"{sum(evaluation['scores']) / 32:.3f}"
        assert f"{who} (step {evaluation['step']}): accuracy {accuracy} rescored, {accuracy} recorded" in proc.stderr


def test_overhead_replays_one_batch_and_gives_ratios(monkeypatch, capsys):
    """bench/overhead.py samples one batch, replays it through every configuration (same rows, same tokens) and
    prints each one's time after generation and whole step against grpo.py and its baseline, with the parts."""
    sys.path.insert(0, str(ROOT / "bench"))
    import overhead

    seen = []
    run_config = overhead.run_config

    def recording(name, steps, common, replay):
        rows = run_config(name, steps, common, replay)
        seen.append((name, replay.recording, replay.batch.rollout.completion_ids.clone()))
        return rows

    monkeypatch.setattr(overhead, "run_config", recording)
    monkeypatch.setattr(sys, "argv", ["overhead.py", "--steps", "2", "--rounds", "1", "--generations", "2",
                                      "--only", "grpo", "sd-token", "antisd"])
    overhead.main()
    out = capsys.readouterr().out
    assert [(n, r) for n, r, _ in seen] == [("grpo", True), ("grpo", False), ("sd-token", False), ("antisd", False)]
    assert all(torch.equal(ids, seen[0][2]) for _, _, ids in seen)  # every configuration on the same tokens
    assert "generation" in out and "(median of 2)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()
            and line.split()[0] in ("grpo", "sd-token", "antisd")}
    assert rows["grpo"][1] == "1.00x" and rows["grpo"][2] == "1.00x"
    passes, vs_sd, ref, step, step_vs_sd = rows["antisd"][1:6]
    assert ref == "sd-token" and all(float(x.rstrip("x")) > 0 for x in (passes, vs_sd, step, step_vs_sd))
    score_s, teacher_s, update_s = map(float, rows["sd-token"][3:6])  # no baseline: its cells are empty
    assert score_s < 0.01 and teacher_s > 0 and update_s > 0  # no old-policy pass at one update per batch


def test_overhead_real_flags_are_compare_reals_without_checkpoints():
    sys.path.insert(0, str(ROOT / "bench"))
    import compare
    import overhead

    flags = overhead.real_flags()
    assert flags[:4] == ["--model", compare.REAL_MODEL, "--dataset", compare.REAL_DATASET]
    assert flags.count("--save-every") == 1 and flags[flags.index("--save-every") + 1] == "0"
    pairs = dict(zip(compare.REAL_FLAGS[::2], compare.REAL_FLAGS[1::2]))
    assert dict(zip(flags[4::2], flags[5::2])) == pairs | {"--save-every": "0"}


def test_real_recipes_parse_with_their_scripts(tmp_path):
    """Every script's --real command line (shared flags + its recipe) is valid, and the recipe sets what README says:
    hsd.py's teacher prompt without its last line, sd.py's lam."""
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    import compare

    from common.args import cli

    for script in compare.REAL_SCRIPTS:
        flags = [*compare.REAL_FLAGS, *compare.real_recipe(script), "--output-dir", str(tmp_path / script)]
        args = cli(importlib.import_module(script).Args, args=flags)
        assert args.lora_rank == 64 and args.eval_size == 200 and args.eval_temperature == 0
        if script == "hsd":
            assert args.teacher_instruction == ""
        if script == "sd":
            assert args.lam == 0.1  # its token credit at a fifth of the default


def test_teacher_signal_summary_against_explicit_sums():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from teacher_signal import credit_summary

    torch.manual_seed(0)
    u, lengths = torch.randn(6, 5), [5, 3, 1, 4, 2, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    correct = torch.tensor([True, False, True, False, False, True])
    ended = torch.tensor([True, True, False, True, True, False])
    pmi = [sum(u[i, t].item() for t in range(n)) for i, n in enumerate(lengths)]
    s = credit_summary(u * mask, mask, correct, ended, torch.ones(6, dtype=torch.bool))
    assert s["rows"] == 6 and abs(s["pmi_correct"] - (pmi[0] + pmi[2] + pmi[5]) / 3) < 1e-5
    assert abs(s["pmi_wrong"] - (pmi[1] + pmi[3] + pmi[4]) / 3) < 1e-5
    assert abs(s["gap"] - (pmi[0] + pmi[2] + pmi[5]) / 3 + (pmi[1] + pmi[3] + pmi[4]) / 3) < 1e-5
    assert abs(s["u_token"] - sum(pmi) / sum(lengths)) < 1e-5
    eos = [u[i, n - 1].item() for i, n in enumerate(lengths) if ended[i]]
    assert abs(s["u_eos"] - sum(eos) / len(eos)) < 1e-5
    some = torch.tensor([True, True, False, False, True, False])  # a context that distils rows 0, 1, 4 only
    s = credit_summary(u * mask, mask, correct, ended, some)
    assert (s["rows"] == 3 and abs(s["pmi_correct"] - pmi[0]) < 1e-5
            and abs(s["pmi_wrong"] - (pmi[1] + pmi[4]) / 2) < 1e-5)
    assert abs(s["u_token"] - (pmi[0] + pmi[1] + pmi[4]) / (5 + 3 + 2)) < 1e-5
    assert abs(s["u_eos"] - (u[0, 4].item() + u[1, 2].item() + u[4, 1].item()) / 3) < 1e-5


def test_teacher_signal_quick_prints_every_context():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "teacher_signal.py"), "--model", "toy",
                           "--dataset", "toy", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split()[:1] in (["sdpo"], ["opsd"], ["antisd"], ["hsd"])]
    assert [r[0] for r in rows] == ["sdpo", "opsd", "antisd", "hsd"] and all(int(r[1]) <= 8 for r in rows)
    assert [int(r[1]) for r in rows[1:]] == [8, 8, 8]  # every row but SDPO's peerless ones is distilled


def test_compare_run_output_goes_to_a_log_named_in_the_error(tmp_path):
    """A run writes to runs/{algorithm}-{seed}.log (never a pipe that dies with compare.py); a failed run's error
    names the log and quotes its end."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--algorithms", "grpo",
                           "--out", str(tmp_path), "--", "--learning-rate", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    log = tmp_path / "runs" / "grpo-1.log"
    assert "--learning-rate must be" in log.read_text()
    assert f"output in {log}" in proc.stderr and "--learning-rate must be" in proc.stderr


def test_vs_trl_learning_mode_takes_the_toy_recipe_and_the_projects_evaluation(tmp_path):
    """--learning trains the toy default recipe for 60 steps unless told otherwise, and scores a saved policy with
    the project's held-out evaluation (the same value for the same seed)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import vs_trl

    a = vs_trl.parse_args(["--learning"])
    assert (a.steps, a.warmup, a.learning_rate, a.num_prompts, a.group_size, a.max_new_tokens) == (60, 0, 3e-4, 8, 8,
                                                                                                    48)
    assert vs_trl.parse_args(["--learning", "--steps", "10", "--seeds", "4"]).steps == 10
    assert vs_trl.parse_args([]).steps == 10 and vs_trl.parse_args([]).learning_rate == 1e-5  # timing unchanged
    model = vs_trl.resolve_model(vs_trl.parse_args(["--model", "toy"]), tmp_path)
    assert (Path(model) / "config.json").exists()
    first = vs_trl.held_out_accuracy(model, 1, 48)
    assert 0 < first < 1 and vs_trl.held_out_accuracy(model, 1, 48) == first
