"""Learning: every algorithm improves held-out accuracy from the shipped toy base in a fixed budget.

Each test trains with the script's defaults (the embedded toy task, P=8 x G=8, lr 3e-4, 60 steps,
held-out avg@4 at temperature 1 on 200 problems, 800 samples) at seed 1 with one torch thread, so it
repeats bit for bit on the same build, and asserts the gain of `eval/accuracy` from step 0 to the last
step. The margins were set from `python bench/compare.py --seeds 1 2 3 4 5` (README, Results; one
thread per run, torch 2.11 on a 16-core Xeon) plus five seeds of `sd.py --sd-loss logit`, each one
below the worst of those five seeds:

    algorithm   gains over seeds 1-5           worst    margin
    grpo        +0.071 +0.069 +0.090 +0.071 +0.081   +0.069   0.05
    sd token    +0.034 +0.079 +0.059 +0.084 +0.056   +0.024*  0.015
    sd logit    +0.090 +0.036 +0.080 +0.073 +0.080   +0.036   0.025
    credit      +0.063 +0.041 +0.040 +0.059 +0.075   +0.040   0.03
    antisd      +0.073 +0.038 +0.069 +0.053 +0.121   +0.038   0.025
    hsd         +0.039 +0.074 +0.018 +0.034 +0.059   +0.018   0.01

* Seed 1 on this project's CI build (torch 2.13 on 2 cores) gave +0.024 for sd token mode, the worst
figure seen, so its margin sits below that. The difference of two such evaluations has a standard deviation of about 0.015 from sampling alone,
so the smaller margins (hsd above all) say "does not get worse and usually improves", not more.

The hsd run also checks the paper's claim on the same steps (ALGORITHMS.md §2.4): on failed rows, the
peer-conditioned teacher puts more of its negative credit within 8 tokens of the divergence from the
peer than the answer-only teacher does. Run means over seeds 1-5: 0.557/0.480, 0.571/0.481,
0.552/0.484, 0.522/0.444, 0.547/0.463, a gap of +0.068 to +0.090; the margin is 0.04.
"""
import importlib
import json
import statistics

import pytest
import torch
import tyro

MARGIN = {"grpo": 0.05, "sd": 0.015, "sd-logit": 0.025, "credit": 0.03, "antisd": 0.025, "hsd": 0.01}
HSD_CONCENTRATION_MARGIN = 0.04


def train(script: str, extra: list[str], out) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module(script)
        module.main(tyro.cli(module.Args, args=["--seed", "1", "--eval-every", "60", "--output-dir", str(out),
                                                "--sample-every", "0", *extra]))
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,script,extra", [
    ("grpo", "grpo", []), ("sd", "sd", []), ("sd-logit", "sd", ["--sd-loss", "logit"]), ("credit", "credit", []),
    ("antisd", "antisd", []), ("hsd", "hsd", []),
])
def test_held_out_accuracy_rises(name, script, extra, tmp_path):
    rows = train(script, extra, tmp_path)
    assert len(rows) == 60 and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    first, last = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert last - first >= MARGIN[name], f"{name}: held-out accuracy {first:.3f} -> {last:.3f}"
    if name == "hsd":
        peer = statistics.mean(r["hsd/credit_mass_near_div"] for r in rows if r["hsd/credit_mass_near_div"] == r["hsd/credit_mass_near_div"])
        answer_only = statistics.mean(r["hsd/credit_mass_near_div_answer_only"] for r in rows
                                      if r["hsd/credit_mass_near_div_answer_only"] == r["hsd/credit_mass_near_div_answer_only"])
        assert peer - answer_only >= HSD_CONCENTRATION_MARGIN, f"credit mass near divergence {peer:.3f} vs {answer_only:.3f}"
