"""Reference: every script's recipes reproduce the metrics recorded before the scripts were split.

Each configuration runs 3 toy steps at seed 1 with one torch thread and a 16-prompt evaluation, in
this process, and every recorded numeric field of its metrics.jsonl except timings (`perf/`) must be
there and match the recorded value (metrics added since may appear beside them): integers exactly,
floats to a relative 1e-4 (absolute 1e-7 near zero). Not bit for bit, because the same torch build
picks its matrix kernels by the CPU it runs on: two x86 machines of this project's CI gave floats
apart by up to 1e-5 relative (the largest, CREDIT's step-1 gradient norm), with every sampled token,
reward and length the same. A change to a formula moves some metric far more than that. Where a
script's defaults have since moved to its paper's recipe, the configuration names the flags that give
the recorded recipe. The fixture `fixtures/reference_metrics.json` was written by
`python tests/test_reference.py --record [NAME ...]` (all configurations, or the named ones) on the CPU
build of torch that CI installs (2.13); a change that moves any float of a recipe fails here. Re-record
only for a change that is meant to alter the numbers, only the configurations it alters, and say so in
its commit.
"""
from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import tyro

FIXTURE = Path(__file__).parent / "fixtures" / "reference_metrics.json"
COMMON = ["--total-steps", "3", "--eval-size", "16", "--seed", "1", "--sample-every", "0"]
CONFIGS = {
    "grpo": ("grpo", []),
    "grpo-preset-grpo": ("grpo", ["--preset", "grpo"]),
    "grpo-dr-grpo": ("grpo", ["--preset", "dr-grpo"]),
    "grpo-dapo": ("grpo", ["--preset", "dapo"]),
    "sd-token": ("sd", []),
    "sd-logit": ("sd", ["--sd-loss", "logit"]),
    "sd-ema": ("sd", ["--teacher", "ema"]),
    "sd-sdpo": ("sd", ["--preset", "sdpo"]),
    "sd-opsd": ("sd", ["--preset", "opsd"]),
    "credit": ("credit", []),
    "antisd": ("antisd", []),
    "antisd-gate-on": ("antisd", ["--gate-warmup-steps", "1", "--peer", "first", "--eps-high", "0.28"]),
    "hsd": ("hsd", []),
}


def run_config(name: str, out: Path) -> list[dict]:
    """Run one configuration and return its metrics rows without timings."""
    script, extra = CONFIGS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module(script)
        module.main(tyro.cli(module.Args, args=[*COMMON, "--output-dir", str(out), *extra]))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and isinstance(v, (int, float))} for r in rows]


def matches(got: float, expected: float) -> bool:
    """Integers exactly; floats to the precision that differs between CPUs (module docstring)."""
    if isinstance(expected, int) and isinstance(got, int):
        return got == expected
    return got == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, tmp_path):
    expected = json.loads(FIXTURE.read_text())[name]
    got = run_config(name, tmp_path / name)
    assert len(got) == len(expected) == 3
    for step, (g, e) in enumerate(zip(got, expected)):
        assert set(e) <= set(g), f"{name} step {step}: missing {sorted(set(e) - set(g))}"
        diff = {k: (g[k], e[k]) for k in e if not matches(g[k], e[k])}
        assert not diff, f"{name} step {step}: {diff}"


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or not set(sys.argv[2:]) <= set(CONFIGS):
        sys.exit(f"usage: python tests/test_reference.py --record [NAME ...]  (names: {' '.join(CONFIGS)})")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    recorded = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        recorded |= {n: run_config(n, Path(tmp) / n) for n in sys.argv[2:] or CONFIGS}
    FIXTURE.write_text(json.dumps({n: recorded[n] for n in CONFIGS}, indent=1) + "\n")
    print(f"wrote {FIXTURE}: {', '.join(sys.argv[2:] or CONFIGS)}")
