"""Held-out evaluation: sample k completions per prompt, verify, report avg@k and pass@k, and each problem's score."""
from __future__ import annotations

import torch

from common.dist import Dist, all_reduce, gather_floats
from common.example import Example
from common.prompts import render_prompts
from common.rollout import generate
from common.verifiers import verify


def evaluate(policy, tokenizer, examples: list[Example], d: Dist, max_new_tokens: int, samples: int = 1,
             temperature: float = 0.0, batch_prompts: int = 64, enable_thinking: bool = False,
             top_p: float = 1.0) -> tuple[dict, list[dict], list[float]]:
    """Accuracy over `examples` split across ranks; returns (metrics, a few sample rows, each problem's fraction of
    correct samples in the order of `examples`: two evaluations of one set compare problem by problem)."""
    mine = examples[d.rank::d.world_size]
    correct, passk, reward = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    table, per_problem = [], []
    for i in range(0, len(mine), batch_prompts):
        batch = mine[i:i + batch_prompts]
        rollout = generate(policy, tokenizer, render_prompts(tokenizer, [e.prompt for e in batch], enable_thinking),
                           samples, max_new_tokens, temperature, top_p, autocast=d.autocast)
        verdicts = [verify(e, rollout.texts[j * samples + s]) for j, e in enumerate(batch) for s in range(samples)]
        ok = torch.tensor([v.correct for v in verdicts], dtype=torch.float64).view(len(batch), samples)
        correct += ok.mean(1).sum()
        per_problem.append(ok.mean(1))
        passk += ok.amax(1).sum()
        reward += torch.tensor([v.reward for v in verdicts],
                               dtype=torch.float64).view(len(batch), samples).mean(1).sum()
        if i == 0:
            table = [{"prompt": e.prompt, "completion": rollout.texts[j * samples],
                      "reward": verdicts[j * samples].reward} for j, e in enumerate(batch[:4])]
    totals = all_reduce(torch.stack([correct, passk, reward, torch.tensor(float(len(mine)), dtype=torch.float64)]))
    n = totals[3].clamp(min=1)
    metrics = {"eval/accuracy": (totals[0] / n).item(), "eval/reward": (totals[2] / n).item(),
               "eval/problems": int(totals[3].item())}
    if samples > 1:
        metrics[f"eval/pass@{samples}"] = (totals[1] / n).item()
    scores = gather_floats(torch.cat(per_problem) if per_problem else torch.zeros(0, dtype=torch.float64))
    where = gather_floats(torch.arange(d.rank, len(examples), d.world_size, dtype=torch.float64))  # rank r: r::W
    return metrics, table, scores[where.argsort()].tolist()
