"""Read a finished run's policy: greedy completions of the base and the final checkpoint on held-out problems.

A gain is believed only after reading what the final policy writes (a broken checker once scored restated
questions as correct). For the problems whose greedy score changed between the run's first and last evaluation
(`eval_scores.jsonl`), this regenerates both answers, the base model's (the adapters switched off under LoRA,
else the run's `--model`) and the final checkpoint's, verifies them again and prints one JSON line each:

    python bench/real_samples.py results/real/runs/grpo-1 [--count 5]
    python bench/real_samples.py results/real/runs/grpo-1 --all   # every problem, rescored by the current verifier

`score` is the verifier's verdict on the regenerated text and `recorded` the run's own evaluation of that
problem; for a greedy evaluation (`--eval-temperature 0 --eval-samples 1`) they agree unless a near tie in the
logits flips a token between batch layouts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import checkpoint  # noqa: E402
from common.models import Policy, load_policy, load_tokenizer  # noqa: E402
from common.prompts import render_prompts  # noqa: E402
from common.rollout import generate  # noqa: E402
from common.run import load_splits  # noqa: E402
from common.verifiers import verify  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a run's output directory (args.json, eval_scores.jsonl, checkpoint/)")
    p.add_argument("--count", type=int, default=5,
                   help="problems that improved to show (and half as many that got worse)")
    p.add_argument("--all", action="store_true",
                   help="every held-out problem: both evaluations rescored by the current verifier (on stderr)")
    a = p.parse_args()
    args = json.loads((a.run_dir / "args.json").read_text())
    evaluations = [json.loads(line) for line in (a.run_dir / "eval_scores.jsonl").read_text().splitlines()]
    found = checkpoint.find(a.run_dir)
    if len(evaluations) < 2 or found is None:
        sys.exit(f"{a.run_dir}: needs two evaluations in eval_scores.jsonl and a checkpoint/")
    first, last = evaluations[0], evaluations[-1]
    tokenizer = load_tokenizer(args["model"])
    _, evals, _, _ = load_splits(SimpleNamespace(**args), tokenizer)  # the run's eval set, in its order
    better = [i for i, (x, y) in enumerate(zip(first["scores"], last["scores"])) if y > x][: a.count]
    worse = [i for i, (x, y) in enumerate(zip(first["scores"], last["scores"])) if y < x][: max(1, a.count // 2)]
    chosen = list(range(len(evals))) if a.all else better + worse
    prompts = render_prompts(tokenizer, [evals[i].prompt for i in chosen], args["enable_thinking"])
    device = torch.device("cpu")
    model_dir = found / "model"
    if (model_dir / "adapter_config.json").exists():  # LoRA: the base model is the final one with adapters off
        from peft import PeftModel

        final = Policy(PeftModel.from_pretrained(load_policy(args["model"], device).lm, model_dir))
        base, base_context = final, final.lm.disable_adapter
    else:
        base, final = load_policy(args["model"], device), load_policy(str(model_dir), device)
        base_context = contextlib.nullcontext
    for who, policy, context, evaluation in (("base", base, base_context, first),
                                             ("final", final, contextlib.nullcontext, last)):
        policy.eval()
        with torch.no_grad(), context():
            texts = generate(policy, tokenizer, prompts, 1, args["eval_max_new_tokens"] or args["max_new_tokens"],
                             temperature=0.0).texts
        scores = [float(verify(evals[i], text).correct) for i, text in zip(chosen, texts)]
        for i, text, score in zip(chosen, texts, scores):
            print(json.dumps({"policy": who, "eval_step": evaluation["step"], "problem": i, "question": evals[i].prompt,
                              "gold": evals[i].answer, "completion": text, "score": score,
                              "recorded": evaluation["scores"][i]}), flush=True)
        if a.all:
            recorded = sum(evaluation["scores"][i] for i in chosen) / len(chosen)
            print(f"{who} (step {evaluation['step']}): accuracy {sum(scores) / len(chosen):.3f} rescored, "
                  f"{recorded:.3f} recorded, {len(chosen)} problems", file=sys.stderr)


if __name__ == "__main__":
    main()
