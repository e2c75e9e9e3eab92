"""Step-time overhead of each algorithm against grpo.py, measured in one run on the same config.

Every configuration trains from the same base with the same seed for a few steps (no evaluation),
rounds alternate between configurations to spread machine noise, and the table reports the median
step time of each relative to grpo.py (and CREDIT relative to sd.py), beside the papers' claims.
The first step of every run is dropped (warm-up). Also printed: grpo.py's step breakdown
(generation / old-policy scoring / update fractions).

    python bench/overhead.py                 # toy default, ~10 minutes on 2 CPU cores
    python bench/overhead.py --steps 4 --rounds 1 --only grpo sd-token   # quick look
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

CONFIGS = {
    "grpo": ("grpo", []),
    "sd-token": ("sd", ["--sd-loss", "token"]),
    "sd-logit": ("sd", ["--sd-loss", "logit"]),
    "credit-k1": ("credit", ["--num-contrast", "1"]),
    "credit-k2": ("credit", ["--num-contrast", "2"]),
    "credit-k4": ("credit", ["--num-contrast", "4"]),
    "antisd": ("antisd", []),
    "hsd": ("hsd", []),
}
CLAIMS = {"credit-k1": "CREDIT: negligible extra compute vs SD", "antisd": "AntiSD: no additional cost over SD",
          "sd-token": "one extra teacher forward (issue goal <= 1.5x)", "sd-logit": "teacher top-k gather (<= 1.5x)"}


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
    a = p.parse_args()
    common = ["--model", a.model, "--seed", "1"]
    times: dict[str, list[float]] = {n: [] for n in a.only}
    breakdown: list[dict] = []
    for _ in range(a.rounds):
        for name in a.only:
            rows = run_config(name, a.steps, common)[1:]
            times[name] += [r["perf/step_s"] for r in rows]
            if name == "grpo":
                breakdown += rows
    base = statistics.median(times["grpo"]) if "grpo" in times else None
    sd_base = statistics.median(times["sd-token"]) if "sd-token" in times else None
    print(f"\n{'config':<11} {'vs grpo':>8} {'vs sd':>7}  claim")
    for name in a.only:
        med = statistics.median(times[name])
        vs_grpo = f"{med / base:.2f}x" if base else "-"
        vs_sd = f"{med / sd_base:.2f}x" if sd_base and name.startswith("credit") else ""
        print(f"{name:<11} {vs_grpo:>8} {vs_sd:>7}  {CLAIMS.get(name, '')}")
    if breakdown:
        parts = {k: statistics.median(r[f"perf/{k}_s"] / r["perf/step_s"] for r in breakdown)
                 for k in ("generate", "score", "update")}
        print("\ngrpo.py step breakdown (median fractions): " + ", ".join(f"{k} {v:.0%}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
