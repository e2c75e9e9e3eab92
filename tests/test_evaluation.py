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


@pytest.mark.parametrize("samples,temperature,top_p", [(1, 0.0, 1.0), (3, 1.0, 1.0), (3, 0.7, 0.5)])
def test_evaluate_matches_explicit_count(samples, temperature, top_p):
    policy, tokenizer = load_policy("toy", torch.device("cpu")), load_tokenizer("toy")
    examples = toy.examples("test")[:24]
    torch.manual_seed(0)
    metrics, table, scores = evaluate(policy, tokenizer, examples, Dist(), 48, samples, temperature, batch_prompts=10,
                                      top_p=top_p)
    torch.manual_seed(0)
    correct, passed, reward, each = 0.0, 0, 0.0, []
    for i in range(0, len(examples), 10):
        batch = examples[i:i + 10]
        r = generate(policy, tokenizer, render_prompts(tokenizer, [e.prompt for e in batch]), samples, 48,
                     temperature, top_p)
        for j, e in enumerate(batch):
            verdicts = [verify(e, r.texts[j * samples + s]) for s in range(samples)]
            correct += sum(v.correct for v in verdicts) / samples
            each.append(sum(v.correct for v in verdicts) / samples)
            passed += any(v.correct for v in verdicts)
            reward += sum(v.reward for v in verdicts) / samples
    assert metrics["eval/accuracy"] == pytest.approx(correct / len(examples))
    assert metrics["eval/reward"] == pytest.approx(reward / len(examples))
    assert metrics["eval/problems"] == len(examples)
    assert scores == pytest.approx(each)  # each problem's score, in the order of `examples`
    if samples > 1:
        assert metrics[f"eval/pass@{samples}"] == pytest.approx(passed / len(examples))
        assert metrics[f"eval/pass@{samples}"] >= metrics["eval/accuracy"]
    assert 0 < metrics["eval/accuracy"] < 1 and len(table) == 4


def test_eval_knobs_and_timing_apart_from_the_step(tiny_model_dir, tmp_path, capsys):
    """--eval-max-new-tokens bounds evaluation alone; perf/step_s excludes evaluation; the last line has the
    peak RSS."""
    import json

    import tyro

    import grpo

    out = tmp_path / "r"
    grpo.main(tyro.cli(grpo.Args, args=["--model", str(tiny_model_dir), "--output-dir", str(out), "--total-steps", "2",
                                        "--num-prompts", "2", "--group-size", "2", "--max-new-tokens", "12",
                                        "--eval-size", "3", "--eval-every", "1", "--eval-samples", "1",
                                        "--eval-max-new-tokens", "5", "--eval-batch-prompts", "2"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("perf/eval_s" in r and r["perf/step_s"] > 0 for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    evals = [s for s in samples if s["split"] == "eval"]
    train = [s for s in samples if s["split"] == "train"]
    assert evals and train
    # Byte-level toy tokenizer: a token decodes to at most one character
    # (bytes of invalid UTF-8 become one U+FFFD each).
    assert max(len(s["completion"]) for s in evals) <= 5 < max(len(s["completion"]) for s in train)
    assert "peak RSS" in capsys.readouterr().out.strip().splitlines()[-1]
    # Each evaluation's per-problem scores, whose mean is its accuracy.
    scores = [json.loads(line) for line in (out / "eval_scores.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scores] == [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1]
    for s, r in zip(scores, rows):
        assert len(s["scores"]) == 3 and sum(s["scores"]) / 3 == pytest.approx(r["eval/accuracy"])


def test_eval_top_p_reaches_the_sampler_and_only_the_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """--eval-top-p is the evaluation's nucleus (the papers' protocol); training keeps --top-p."""
    import tyro

    import grpo
    from common import evaluation, rollout

    seen, original = [], rollout.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **kw: seen.append(("eval", a[6])) or original(*a, **kw))
    grpo.main(tyro.cli(grpo.Args, args=["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "r"),
                                        "--total-steps", "2", "--num-prompts", "2", "--group-size", "2",
                                        "--max-new-tokens", "8", "--eval-size", "2", "--eval-temperature", "0.7",
                                        "--eval-top-p", "0.95"]))
    assert seen == [("eval", 0.95)] * 2  # steps 0 and the last
    with pytest.raises(SystemExit):
        tyro.cli(grpo.Args, args=["--eval-top-p", "0"])
