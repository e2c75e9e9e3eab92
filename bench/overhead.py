"""Step-time overhead of each algorithm against grpo.py, measured in one run on the same config.

Every configuration trains from the same base with the same seed for a few steps (no evaluation),
rounds alternate between configurations to spread machine noise, and the table reports the median
step time of each relative to grpo.py and to its own baseline (CREDIT to SDPO's loss in sd.py, AntiSD
to sd.py, HSD to OPSD's full-vocabulary distillation), beside the papers' claims.
The first step of every run is dropped (warm-up). Also printed: each configuration's mean completion
length over the timed steps (step time grows with it, and runs sample different completions once their
updates differ), the median time of its teacher pass (with CREDIT's contrast) relative to its baseline's,
and grpo.py's step breakdown (generation / old-policy scoring / update fractions).

    python bench/overhead.py                 # toy default, ~10 minutes on 2 CPU cores
    python bench/overhead.py --steps 4 --rounds 1 --only grpo sd-token   # quick look
    python bench/overhead.py --real          # SmolLM2-135M with compare.py --real's task and shared settings
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import REAL_DATASET, REAL_FLAGS, REAL_MODEL  # noqa: E402

# CREDIT's own lam = 0 baseline: SDPO with CREDIT's EMA rate, reverse KL and top-20.
SDPO_CREDIT = ["--preset", "sdpo", "--ema-rate", "0.01", "--jsd-alpha", "1", "--topk", "20"]
CONFIGS = {
    "grpo": ("grpo", []),
    "sd-token": ("sd", []),
    "sd-logit": ("sd", ["--sd-loss", "logit"]),
    "sd-sdpo": ("sd", ["--preset", "sdpo"]),
    "sd-sdpo-k20": ("sd", SDPO_CREDIT),
    "sd-opsd": ("sd", ["--preset", "opsd"]),
    "credit": ("credit", []),
    "credit-c2": ("credit", ["--num-contrast", "2"]),
    "antisd": ("antisd", []),
    "hsd": ("hsd", []),
    "hsd-nodiag": ("hsd", ["--diagnostics-every", "0"]),
}
# The baseline each configuration is compared with beside grpo.py, and the paper's claim about it.
BASELINE = {"credit": "sd-sdpo-k20", "credit-c2": "sd-sdpo-k20", "antisd": "sd-token", "hsd": "sd-opsd",
            "hsd-nodiag": "sd-opsd"}
CLAIMS = {"credit": "CREDIT: about 1% over SDPO", "antisd": "AntiSD: no additional cost over SD",
          "hsd-nodiag": "HSD: 1.17x OPSD (24.1 s vs 20.6 s on 8xH100)",
          "sd-token": "one extra teacher forward", "sd-logit": "teacher top-k gather"}


def real_flags() -> list[str]:
    """compare.py --real's model, task and shared recipe, saving no checkpoints (evaluation is off in every run)."""
    shared = [f for i, f in enumerate(REAL_FLAGS) if "--save-every" not in (f, REAL_FLAGS[i - 1])]
    return ["--model", REAL_MODEL, "--dataset", REAL_DATASET, *shared, "--save-every", "0"]


def run_config(name: str, steps: int, common: list[str]) -> list[dict]:
    script, extra = CONFIGS[name]
    module = importlib.import_module(script)
    with tempfile.TemporaryDirectory() as out:
        module.main(tyro.cli(module.Args, args=[*common, *extra, "--total-steps", str(steps), "--eval-every", "0",
                                                 "--output-dir", out]))
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--model", default="toy")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M on compare.py --real's task with its shared "
                        "settings (LoRA, no evaluation, no checkpoints); overrides --model")
    a = p.parse_args()
    common = ["--model", a.model, "--seed", "1"]
    if a.real:
        common = real_flags() + ["--seed", "1"]
    times: dict[str, list[float]] = {n: [] for n in a.only}
    lengths: dict[str, list[float]] = {n: [] for n in a.only}  # step time grows with the completions' length
    teacher: dict[str, list[float]] = {n: [] for n in a.only}  # the teacher pass alone (its contrast included)
    breakdown: list[dict] = []
    for _ in range(a.rounds):
        for name in a.only:
            rows = run_config(name, a.steps, common)[1:]
            times[name] += [r["perf/step_s"] for r in rows]
            lengths[name] += [r["completion/len_mean"] for r in rows]
            teacher[name] += [r["perf/teacher_s"] for r in rows if "perf/teacher_s" in r]
            if name == "grpo":
                breakdown += rows
    base = statistics.median(times["grpo"]) if "grpo" in times else None
    print(f"\n{'config':<13} {'vs grpo':>8} {'vs baseline':>20} {'teacher pass vs baseline':>25} {'tokens':>7}  claim")
    for name in a.only:
        med = statistics.median(times[name])
        vs_grpo = f"{med / base:.2f}x" if base else "-"
        ref = BASELINE.get(name)
        vs_ref = f"{med / statistics.median(times[ref]):.2f}x {ref}" if ref in times else ""
        vs_teacher = f"{statistics.median(teacher[name]) / statistics.median(teacher[ref]):.2f}x" \
            if ref in times and teacher[name] and teacher[ref] else ""
        tokens = statistics.mean(lengths[name])
        print(f"{name:<13} {vs_grpo:>8} {vs_ref:>20} {vs_teacher:>25} {tokens:>7.1f}  {CLAIMS.get(name, '')}")
    if breakdown:
        parts = {k: statistics.median(r[f"perf/{k}_s"] / r["perf/step_s"] for r in breakdown)
                 for k in ("generate", "score", "update")}
        print("\ngrpo.py step breakdown (median fractions): " + ", ".join(f"{k} {v:.0%}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
