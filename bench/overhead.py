"""Step-time overhead of each algorithm against grpo.py, every configuration on the same rollouts.

One batch is sampled once from the base model (its generation timed over a few batches), then replayed
through every configuration's scoring and update for a few steps: each configuration pays for the same
prompts and completion tokens, so the ratios measure the algorithms' passes and not their rollouts'
lengths. Rounds alternate between configurations to spread machine noise; the first step of every run
is dropped (warm-up). The table gives, per configuration, the median seconds after generation (the
old-policy and reference passes, the teacher pass with CREDIT's contrast, the update) relative to
grpo.py's and to its own baseline's (CREDIT to SDPO's loss in sd.py, AntiSD to sd.py, HSD to OPSD's
full-vocabulary distillation), the same for the whole step (generation + those), and the three parts.

    python bench/overhead.py                 # toy default, ~10 minutes on 2 CPU cores
    python bench/overhead.py --steps 3 --rounds 1 --only grpo sd-token   # quick look
    python bench/overhead.py --real          # SmolLM2-135M with compare.py --real's task and shared settings
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import tempfile
import time
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
PARTS = ("score", "teacher", "update")
"""The step's parts after generation, as the scripts log them (perf/<part>_s)."""


def real_flags() -> list[str]:
    """compare.py --real's model, task and shared recipe, saving no checkpoints (evaluation is off in every run)."""
    shared = [f for i, f in enumerate(REAL_FLAGS) if "--save-every" not in (f, REAL_FLAGS[i - 1])]
    return ["--model", REAL_MODEL, "--dataset", REAL_DATASET, *shared, "--save-every", "0"]


class Replay:
    """Samples batches with a script's own `collect_batch` until `recording` is off (timing each; the first is kept),
    then hands every step a copy of the kept batch."""

    def __init__(self):
        self.batch, self.generate_s, self.recording = None, [], True

    def wrap(self, collect):
        def collect_batch(run, *args, **kwargs):
            if self.recording:
                start = time.perf_counter()
                batch = collect(run, *args, **kwargs)
                self.generate_s.append(time.perf_counter() - start)
                if self.batch is None:
                    self.batch = batch
            return copy.deepcopy(self.batch)
        return collect_batch


def run_config(name: str, steps: int, common: list[str], replay: Replay) -> list[dict]:
    """`steps` steps of one configuration, its batches from `replay`; the metrics of each step."""
    script, extra = CONFIGS[name]
    module = importlib.import_module(script)
    collect = module.collect_batch
    module.collect_batch = replay.wrap(collect)
    try:
        with tempfile.TemporaryDirectory() as out:
            module.main(tyro.cli(module.Args, args=[*common, *extra, "--total-steps", str(steps), "--eval-every", "0",
                                                     "--output-dir", out]))
            return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        module.collect_batch = collect


def after_generation(row: dict) -> float:
    """Seconds of a step after its rollout: the passes and the update (teacher included)."""
    return row["perf/step_s"] - row["perf/generate_s"]


def table(times: dict[str, list[dict]], generate_s: float) -> list[str]:
    """The overhead table: medians of the timed steps, relative to grpo.py and to each baseline."""
    median = {n: {"passes": statistics.median(after_generation(r) for r in rows),
                  **{p: statistics.median(r.get(f"perf/{p}_s", 0.0) for r in rows) for p in PARTS}}
              for n, rows in times.items()}
    lines = [f"{'config':<13} {'passes vs grpo':>14} {'vs baseline':>24} {'step vs grpo':>12} {'vs baseline':>12}  "
             f"{'score s':>8} {'teacher s':>9} {'update s':>8}  claim"]
    for name, m in median.items():
        whole = generate_s + m["passes"]
        cells = ["-", "", "-", ""]
        if "grpo" in median:
            cells[0] = f"{m['passes'] / median['grpo']['passes']:.2f}x"
            cells[2] = f"{whole / (generate_s + median['grpo']['passes']):.2f}x"
        ref = BASELINE.get(name)
        if ref in median:
            cells[1] = f"{m['passes'] / median[ref]['passes']:.2f}x {ref}"
            cells[3] = f"{whole / (generate_s + median[ref]['passes']):.2f}x"
        lines.append(f"{name:<13} {cells[0]:>14} {cells[1]:>24} {cells[2]:>12} {cells[3]:>12}  "
                     f"{m['score']:>8.3f} {m['teacher']:>9.3f} {m['update']:>8.3f}  {CLAIMS.get(name, '')}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="steps per configuration and round (the first is dropped)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--generations", type=int, default=3, help="batches sampled to time generation (the first is kept)")
    p.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--model", default="toy")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M on compare.py --real's task with its shared "
                        "settings (LoRA, no evaluation, no checkpoints); overrides --model")
    a = p.parse_args()
    common = real_flags() + ["--seed", "1"] if a.real else ["--model", a.model, "--seed", "1"]
    replay = Replay()
    run_config("grpo", a.generations, common, replay)  # samples (and times) the batch that every step replays
    replay.recording = False
    times: dict[str, list[dict]] = {n: [] for n in a.only}
    for _ in range(a.rounds):
        for name in a.only:
            times[name] += run_config(name, a.steps, common, replay)[1:]
    generate_s = statistics.median(replay.generate_s)
    mask = replay.batch.rollout.completion_mask
    print(f"\none replayed batch: {mask.shape[0]} rows, {int(mask.sum())} completion tokens "
          f"({float(mask.sum(-1).float().mean()):.1f} a row); generation {generate_s:.3f} s (median of "
          f"{len(replay.generate_s)}); {len(next(iter(times.values())))} timed steps per configuration")
    print("passes: seconds after generation (old-policy and reference passes, teacher, update); step: generation "
          "+ passes\n")
    print("\n".join(table(times, generate_s)))


if __name__ == "__main__":
    main()
