"""Held-out evaluation against an explicit loop: generate, verify, count (avg@k, pass@k, reward)."""
import pytest
import torch

from common import toy
from common.dist import Dist
from common.evaluation import evaluate
from common.models import load_policy, load_tokenizer
from common.prompts import render_prompts
from common.rollout import generate
from common.verifiers import verify


@pytest.mark.parametrize("samples,temperature", [(1, 0.0), (3, 1.0)])
def test_evaluate_matches_explicit_count(samples, temperature):
    policy, tokenizer = load_policy("toy", torch.device("cpu")), load_tokenizer("toy")
    examples = toy.examples("test")[:24]
    torch.manual_seed(0)
    metrics, table = evaluate(policy, tokenizer, examples, Dist(), 48, samples, temperature, batch_prompts=10)
    torch.manual_seed(0)
    correct, passed, reward = 0.0, 0, 0.0
    for i in range(0, len(examples), 10):
        batch = examples[i:i + 10]
        r = generate(policy, tokenizer, render_prompts(tokenizer, [e.prompt for e in batch]), samples, 48, temperature)
        for j, e in enumerate(batch):
            verdicts = [verify(e, r.texts[j * samples + s]) for s in range(samples)]
            correct += sum(v.correct for v in verdicts) / samples
            passed += any(v.correct for v in verdicts)
            reward += sum(v.reward for v in verdicts) / samples
    assert metrics["eval/accuracy"] == pytest.approx(correct / len(examples))
    assert metrics["eval/reward"] == pytest.approx(reward / len(examples))
    if samples > 1:
        assert metrics[f"eval/pass@{samples}"] == pytest.approx(passed / len(examples))
        assert metrics[f"eval/pass@{samples}"] >= metrics["eval/accuracy"]
    assert 0 < metrics["eval/accuracy"] < 1 and len(table) == 4
