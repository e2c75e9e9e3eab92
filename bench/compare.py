"""Side-by-side learning curves of the five algorithms on the toy default, over several seeds.

Runs every algorithm with the same step budget and seeds (one subprocess per run, so runs are
independent), collects each `metrics.jsonl`, and writes into `--out`:
  curves.csv        one row per (algorithm, seed, eval step): step, wall time, eval accuracy
  summary.csv       held-out accuracy per algorithm at step 0 and at the end, and the gain: mean, std,
                    min, max over seeds; the number of eval problems and the gain's standard error, both
                    unpaired (conservative) and paired over problems (from each run's eval_scores.jsonl)
  runs.csv          one row per run: first and last accuracy, the gain, its paired standard error, the
                    problems wrong at the first evaluation and right at the last (better) and back (worse), and
                    the last accuracy against grpo's run of the same seed, paired over problems (vs_grpo)
  diagnostics.csv   per (algorithm, seed): the mean over the run of each diagnostic below
  curves.png        accuracy vs step and vs wall time, mean +- std band over seeds
  diagnostics.png   the algorithms' own signals: SD pMI per row, CREDIT contrast term, AntiSD gate
                    trace (teacher entropy median, H_warm, g), HSD credit mass near the divergence
                    vs the answer-only teacher

    python bench/compare.py                      # 3 seeds x 9 configurations (60 steps)
    python bench/compare.py --quick              # 1 seed, a few steps: checks the pipeline end to end
    python bench/compare.py --real               # the five scripts on SmolLM2-135M and a reasoning-gym task
    python bench/compare.py --real --reuse       # continue it: finished runs are read, interrupted ones resume
    python bench/compare.py --real --algorithms grpo:1,2 sd      # seeds per algorithm: grpo's 1 and 2, sd's --seeds

Runs go `--jobs` at a time (default: one per CPU core; one with `--real`), each with one torch thread, so a
run's metrics do not depend on how many run beside it; each run's output goes to `runs/{algorithm}-{seed}.log`.
`--real` writes into results/real/ and adds to summary.csv the number of eval problems and the standard error
of each gain.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (script, its flags): the five algorithms with their defaults (each paper's recipe; sd.py's is AntiSD's token
# frame), sd.py's logit mode and its two published presets (SDPO's and OPSD's official recipes), and CREDIT and HSD
# with a GRPO reward term beside their distillation (the remedy sources recommend against drift).
CONFIGS = {
    "grpo": ("grpo", []),
    "sd": ("sd", []),
    "sd-logit": ("sd", ["--sd-loss", "logit"]),
    "sd-sdpo": ("sd", ["--preset", "sdpo"]),
    "sd-opsd": ("sd", ["--preset", "opsd"]),
    "credit": ("credit", []),
    "credit-grpo": ("credit", ["--grpo-coef", "1"]),
    "antisd": ("antisd", []),
    "hsd": ("hsd", []),
    "hsd-grpo": ("hsd", ["--grpo-coef", "1"]),
}
# --real: each script's own defaults (its paper's recipe) on SmolLM2-135M with LoRA (OPSD's r = 64, alpha 128) at
# lr 2e-5, at the size this CPU affords in about an hour (README's CPU recipe), greedy eval of 200 problems. OPSD's
# lr 2e-4 collapsed GRPO here within 3 steps (answers shrank to ~7 tokens, train reward 0.19 -> 0-0.03).
REAL_SCRIPTS = ["grpo", "sd", "credit", "antisd", "hsd"]
REAL_MODEL, REAL_DATASET = "smollm2-135m", "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"
REAL_FLAGS = ["--num-prompts", "4", "--group-size", "8", "--max-new-tokens", "96", "--temperature", "0.7",
              "--micro-batch-rows", "16", "--eval-size", "200", "--eval-samples", "1", "--eval-temperature", "0",
              "--eval-max-new-tokens", "128", "--lora-rank", "64", "--learning-rate", "2e-5", "--save-every", "5"]
# --real: flags of one script's recipe added after REAL_FLAGS (settings found by measurement on this task). sd.py,
# credit.py and antisd.py write their papers' teacher contexts verbatim. hsd.py's wording is the project's choice, and
# here it ends without "Now solve the original problem step by step.": on SmolLM2 that line made the teacher prefer long
# explanations to the task's short answers (it scored the end of a short answer ~1.1 nats below the student, against
# ~0.3 without it), and completions grew to the 96-token cap. sd.py weights its token credit at lam 0.1 (default 0.5):
# at 0.5 the student learned to state a number without writing the sum out ("The final answer is 8" where the base
# wrote "1 + 5 = 6"), and greedy accuracy went 0.205 -> 0.210 -> 0.100 (with the earlier generic teacher context).
REAL_RECIPES: dict[str, list[str]] = {"sd": ["--lam", "0.1"], "hsd": ["--teacher-instruction", ""]}


def real_recipe(script: str) -> list[str]:
    """The flags that --real adds for `script` after the shared REAL_FLAGS."""
    return REAL_RECIPES.get(script, [])


# Per script, the algorithm's own signals (credit magnitude near the divergence is HSD's paper measure).
DIAGNOSTICS = {"sd": ["sd/pmi_seq_mean"], "credit": ["credit/contrast_mean", "credit/sign_flip_frac"],
               "antisd": ["gate/entropy_median", "gate/h_warm", "gate/on"],
               "hsd": ["hsd/abs_credit_near_div", "hsd/abs_credit_near_div_answer_only", "hsd/credit_mass_near_div",
                       "hsd/credit_mass_near_div_answer_only"]}


def diagnostics_of(algorithm: str) -> list[str]:
    """The diagnostic keys of a configuration: its script's."""
    return DIAGNOSTICS.get(CONFIGS[algorithm][0], [])


def run_one(algorithm: str, seed: int, steps: int, eval_every: int, out: Path, extra: list[str],
            reuse: bool = False) -> list[dict]:
    """Train one algorithm for one seed in a subprocess (or, with `reuse`, read a finished run and resume an
    interrupted one from its checkpoint); returns its rows."""
    run_dir = out / "runs" / f"{algorithm}-{seed}"
    done = run_dir / "metrics.jsonl"
    if reuse and done.exists():
        rows = [json.loads(line) for line in done.read_text().splitlines() if line.strip()]
        if len(rows) == steps:
            print(f"{algorithm:>7} seed {seed}: reused ({rows[-1]['eval/accuracy']:.3f})", flush=True)
            return rows
    script, flags = CONFIGS[algorithm]
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *flags, "--seed", str(seed), "--total-steps", str(steps),
           "--eval-every", str(eval_every), "--output-dir", str(run_dir),
           "--resume" if reuse else "--overwrite", *extra]
    started = time.perf_counter()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    # The run's output goes to a file, not a pipe: a run outlives this process if it is stopped (a closed pipe
    # would end the run at its next line), and its progress can be followed while it trains.
    log = out / "runs" / f"{algorithm}-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (output in {log}):\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"{algorithm:>7} seed {seed}: final eval/accuracy {rows[-1]['eval/accuracy']:.3f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    return rows


def wall_times(rows: list[dict]) -> list[float]:
    """Cumulative training wall time at the end of each step."""
    total, out = 0.0, []
    for r in rows:
        total += r["perf/step_s"]
        out.append(total)
    return out


def plot(results: dict[str, dict[int, list[dict]]], out: Path, eval_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, by_seed in results.items():
        evals = {seed: [(r["step"], t, r["eval/accuracy"])
                        for r, t in zip(rows, wall_times(rows)) if "eval/accuracy" in r]
                 for seed, rows in by_seed.items()}
        steps = [s for s, _, _ in next(iter(evals.values()))]
        accs = [[e[i][2] for e in evals.values()] for i in range(len(steps))]
        times = [statistics.mean(e[i][1] for e in evals.values()) for i in range(len(steps))]
        mean = [statistics.mean(a) for a in accs]
        std = [statistics.pstdev(a) for a in accs]
        for ax, x in zip(axes, (steps, times)):
            ax.plot(x, mean, marker="o", label=algorithm)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    axes[0].set(xlabel="step", ylabel=f"held-out accuracy ({eval_label})", title="accuracy vs step")
    axes[1].set(xlabel="training wall time (s, mean over seeds)", title="accuracy vs wall time")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    present = [a for a in results if diagnostics_of(a)]
    if not present:  # GRPO alone has no diagnostics of its own
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
    for ax, algorithm in zip(axes[0], present):
        rows = next(iter(results[algorithm].values()))
        if CONFIGS[algorithm][0] == "antisd":  # the gate: teacher entropy relative to H_warm, its thresholds, steps on
            points = [(r["step"], r["gate/entropy_median"] / r["gate/h_warm"]) for r in rows if "gate/h_warm" in r]
            if points:
                ax.plot(*zip(*points), label="entropy median / H_warm", marker=".")
            for level in (1.0, 0.93):
                ax.axhline(level, color="gray", lw=0.8, ls="--")
            for r in rows:
                if r.get("gate/on"):
                    ax.axvspan(r["step"] - 0.5, r["step"] + 0.5, color="tab:red", alpha=0.15, lw=0)
            ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="gate on")
        else:
            for key in diagnostics_of(algorithm):
                points = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
                if points:
                    ax.plot(*zip(*points), label=key, marker=".")
        ax.set(title=f"{algorithm} (seed {next(iter(results[algorithm]))})", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=120)


def diagnostic_means(rows: list[dict], keys: list[str]) -> dict[str, float]:
    """Mean over the run of each diagnostic, skipping steps where it is absent or NaN.

    A key and its `_answer_only` twin (HSD's two teachers) are averaged over the steps that have both,
    so that they compare the same rows.
    """
    out = {}
    for key in keys:
        base = key.removesuffix("_answer_only")
        paired = base + "_answer_only" in keys and base in keys
        values = [r[key] for r in rows if key in r and r[key] == r[key]
                  and (not paired or (base in r and base + "_answer_only" in r))]
        out[key] = statistics.mean(values) if values else float("nan")
    return out


def spread(values: list[float]) -> list[float]:
    return [statistics.mean(values), statistics.pstdev(values), min(values), max(values)]


def gain_standard_error(first: float, final: float, n: int) -> float:
    """Standard error of final - first, two accuracies over the same n problems, taken as independent binomials:
    sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n). Conservative: the two evals' correlation over problems is ignored."""
    return (first * (1 - first) / n + final * (1 - final) / n) ** 0.5


def score_changes(run_dir: Path) -> tuple[float, float, float]:
    """From the per-problem scores of the first and last evaluation (eval_scores.jsonl), d_i = last_i - first_i:
    the gain's paired standard error sd(d) / sqrt(n) (the same problems evaluated twice), the summed gains of the
    problems that improved (with greedy 0/1 scores: the count of wrong -> right) and the summed losses of those
    that got worse; NaN when the run has no such file."""
    path = run_dir / "eval_scores.jsonl"
    if not path.exists():
        return math.nan, math.nan, math.nan
    evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    d = [b - a for a, b in zip(evals[0]["scores"], evals[-1]["scores"])]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else math.nan
    return se, sum(x for x in d if x > 0), -sum(x for x in d if x < 0)


def last_scores(run_dir: Path) -> list[float] | None:
    """The per-problem scores of a run's last evaluation (eval_scores.jsonl), or None without that file."""
    path = run_dir / "eval_scores.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-1]["scores"]


def paired_difference(scores: list[float], baseline: list[float]) -> tuple[float, float]:
    """mean(d) and its standard error sd(d) / sqrt(n), d_i = scores_i - baseline_i over the same n problems."""
    d = [a - b for a, b in zip(scores, baseline, strict=True)]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5


def algorithm_seeds(text: str) -> tuple[str, list[int] | None]:
    """`NAME` or `NAME:SEED,SEED...` (seeds of that algorithm only) -> (name, seeds or None for --seeds)."""
    name, _, seeds = text.partition(":")
    if name not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown algorithm {name!r} (choose from {', '.join(CONFIGS)})")
    try:
        return name, [int(x) for x in seeds.split(",")] if seeds else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds of {name} must be integers, as grpo:1,2 (got {seeds!r})") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 1 2 3 (--real: 1)")
    p.add_argument("--steps", type=int, default=None, help="default: 60 (--real: 40)")
    p.add_argument("--eval-every", type=int, default=None, help="default: 10 (--real: 20)")
    p.add_argument("--algorithms", nargs="+", type=algorithm_seeds, default=None, metavar="NAME[:SEEDS]",
                   help=f"of {', '.join(CONFIGS)}, each optionally with its own seeds, as grpo:1,2 (default: all "
                        "ten configurations; --real: the five scripts)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, one thread each (default: one per CPU "
                                                          "core; --real: 1)")
    p.add_argument("--out", type=Path, default=None, help="default: results/ (--real: results/real/)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M on a reasoning-gym task (LoRA), not the toy")
    p.add_argument("--model", default=REAL_MODEL, help="--real's model")
    p.add_argument("--dataset", default=REAL_DATASET, help="--real's dataset")
    p.add_argument("--quick", action="store_true", help="one seed, 3 steps, small eval: a pipeline check")
    p.add_argument("--reuse", action="store_true", help="read runs already finished under --out instead of re-running "
                                                         "them (continues an interrupted benchmark)")
    p.add_argument("extra", nargs="*", help="flags passed to every script (after --)")
    a = p.parse_args()
    real = a.real
    a.seeds = a.seeds or ([1] if real else [1, 2, 3])
    a.steps, a.eval_every = a.steps or (40 if real else 60), a.eval_every or (20 if real else 10)
    a.algorithms = a.algorithms or [(name, None) for name in (REAL_SCRIPTS if real else CONFIGS)]
    a.jobs = a.jobs or (1 if real else os.cpu_count() or 1)
    a.out = a.out or ROOT / "results" / ("real" if real else "")
    extra = (["--model", a.model, "--dataset", a.dataset, *REAL_FLAGS] if real else []) + list(a.extra)
    if a.quick:
        a.seeds, a.steps, a.eval_every = a.seeds[:1], 3, 2
        a.algorithms = [(name, seeds and seeds[:1]) for name, seeds in a.algorithms]
        extra += ["--eval-size", "16", "--num-prompts", "4", "--group-size", "4"]
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = [(alg, seed) for alg, seeds in a.algorithms for seed in seeds or a.seeds]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        done = pool.map(lambda job: run_one(*job, a.steps, a.eval_every, a.out,
                                            extra + (real_recipe(CONFIGS[job[0]][0]) if real else []), a.reuse), jobs)
        results: dict[str, dict[int, list[dict]]] = {}
        for (alg, seed), rows in zip(jobs, done):
            results.setdefault(alg, {})[seed] = rows
    run_args = json.loads((a.out / "runs" / f"{jobs[0][0]}-{jobs[0][1]}" / "args.json").read_text())
    eval_n = int(next(iter(next(iter(results.values())).values()))[0]["eval/problems"])
    eval_label = f"avg@{run_args['eval_samples']} at T={run_args['eval_temperature']:g}, {eval_n} problems"
    with open(a.out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "seed", "step", "wall_s", "eval_accuracy"])
        for alg, by_seed in results.items():
            for seed, rows in by_seed.items():
                for r, t in zip(rows, wall_times(rows)):
                    if "eval/accuracy" in r:
                        w.writerow([alg, seed, r["step"], f"{t:.2f}", r["eval/accuracy"]])
    with open(a.out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "seeds", "initial_mean", "final_mean", "final_std", "final_min", "final_max",
                    "gain_mean", "gain_std", "gain_min", "gain_max", "train_s_mean", "eval_n", "gain_se_mean",
                    "gain_se_paired_mean"])
        print(f"\nheld-out accuracy ({eval_label}), {a.steps} steps")
        print(f"{'algorithm':<12} {'initial':>8} {'final':>15} {'gain':>15} {'min gain':>9} {'train s':>8} "
              f"{'gain se':>8} {'paired':>7}")
        for alg, by_seed in results.items():
            first = [rows[0]["eval/accuracy"] for rows in by_seed.values()]
            final = [rows[-1]["eval/accuracy"] for rows in by_seed.values()]
            final_s, gain_s = spread(final), spread([b - f for f, b in zip(first, final)])
            train_s = statistics.mean(wall_times(rows)[-1] for rows in by_seed.values())
            se = statistics.mean(gain_standard_error(f, b, eval_n) for f, b in zip(first, final))
            paired = statistics.mean(score_changes(a.out / "runs" / f"{alg}-{seed}")[0] for seed in by_seed)
            w.writerow([alg, len(final), f"{statistics.mean(first):.4f}", *(f"{v:.4f}" for v in final_s),
                        *(f"{v:.4f}" for v in gain_s), f"{train_s:.1f}", eval_n, f"{se:.4f}", f"{paired:.4f}"])
            print(f"{alg:<12} {statistics.mean(first):>8.3f} {final_s[0]:>8.3f} ± {final_s[1]:.3f} "
                  f"{gain_s[0]:>+8.3f} ± {gain_s[1]:.3f} {gain_s[2]:>+9.3f} {train_s:>8.0f} {se:>8.3f} {paired:>7.3f}")
    with open(a.out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "seed", "initial", "final", "gain", "gain_se_paired", "better", "worse", "vs_grpo",
                    "vs_grpo_se", "train_s"])
        for alg, by_seed in results.items():
            for seed, rows in by_seed.items():
                first, final = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
                se, better, worse = score_changes(a.out / "runs" / f"{alg}-{seed}")
                scores, grpo = (last_scores(a.out / "runs" / f"{name}-{seed}") for name in (alg, "grpo"))
                vs_grpo = ([f"{v:.4f}" for v in paired_difference(scores, grpo)]
                           if seed in results.get("grpo", {}) and scores and grpo else ["", ""])
                w.writerow([alg, seed, f"{first:.4f}", f"{final:.4f}", f"{final - first:.4f}", f"{se:.4f}",
                            f"{better:g}", f"{worse:g}", *vs_grpo, f"{wall_times(rows)[-1]:.1f}"])
    with open(a.out / "diagnostics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "seed", "metric", "run_mean"])
        for alg in (x for x in results if diagnostics_of(x)):
            for seed, rows in results[alg].items():
                for key, value in diagnostic_means(rows, diagnostics_of(alg)).items():
                    w.writerow([alg, seed, key, f"{value:.5f}"])
    plot(results, a.out, eval_label)
    print(f"\nwrote {a.out}/curves.csv, summary.csv, runs.csv, diagnostics.csv, curves.png, diagnostics.png")


if __name__ == "__main__":
    main()
