"""`--beta` works in every script: a k3 KL to the frozen initial policy, logged as `loss/kl`.

`--beta 0` loads no reference and is the recorded recipe (tests/test_reference.py); here
`--beta 0.1` must add the KL term and change the update. At step 0 the policy equals the reference,
so the k3 term and its gradient are exactly 0; from step 1 on the policy has moved and the term
changes the gradient.
"""
import importlib
import json

import pytest
import torch
import tyro

from common.run import setup

FAST = ["--total-steps", "2", "--num-prompts", "4", "--group-size", "4", "--eval-every", "0",
        "--sample-every", "0"]


def run(script, model, out, *extra):
    module = importlib.import_module(script)
    module.main(tyro.cli(module.Args, args=["--model", str(model), "--output-dir", str(out), *FAST, *extra]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", ["grpo", "sd", "credit", "antisd", "hsd"])
def test_beta_adds_a_kl_term_that_changes_the_update(script, tmp_path):
    # The shipped toy base: its groups hold both rewards, so step 0's update moves the policy away from the reference.
    plain = run(script, "toy", tmp_path / "plain", "--beta", "0")  # hsd's default is the paper's 0.001
    kl = run(script, "toy", tmp_path / "kl", "--beta", "0.1")
    assert not any("loss/kl" in r for r in plain)
    assert kl[0]["loss/kl"] == 0.0 and kl[0]["train/grad_norm"] == plain[0]["train/grad_norm"]  # pi == ref at step 0
    assert kl[1]["loss/kl"] > 0
    assert kl[1]["reward/mean"] == plain[1]["reward/mean"]  # the same rollout: step 0's update was the same
    assert kl[1]["train/grad_norm"] != plain[1]["train/grad_norm"]


def test_initial_teacher_is_the_reference(tiny_model_dir, tmp_path):
    """An `initial` teacher already holds the frozen initial weights: the KL term reuses it, no third copy."""
    import sd

    initial = setup(sd.Args(model=str(tiny_model_dir), output_dir=str(tmp_path / "i"), beta=0.1, teacher="initial"),
                    "sd", teacher_weights="initial", reference=True)
    assert initial.reference is initial.teacher is not None
    ema = setup(sd.Args(model=str(tiny_model_dir), output_dir=str(tmp_path / "e"), beta=0.1, teacher="ema"),
                "sd", teacher_weights="ema", reference=True)
    assert ema.reference is not None and ema.reference is not ema.teacher
    for p, q in zip(ema.reference.parameters(), ema.policy.parameters()):
        assert torch.equal(p, q) and not p.requires_grad
    assert setup(sd.Args(model=str(tiny_model_dir), output_dir=str(tmp_path / "n")), "sd").reference is None
