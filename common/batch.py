"""One step's verified rollout: sample G completions for P prompts, verify them, score them, summarise them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from common.dist import all_reduce
from common.example import Example
from common.logprobs import score_completions
from common.prompts import render_prompts
from common.rollout import Rollout, concat_rollouts, generate, select_rows
from common.verifiers import Verdict, verify


@dataclass
class Batch:
    """One step's verified rollout: rows of a prompt contiguous, P groups of G."""

    rollout: Rollout
    examples: list[Example]
    """The example of each row."""
    verdicts: list[Verdict]
    rewards: torch.Tensor
    """[B] rewards (after the script's reward shaping, if any)."""
    sampled_groups: int
    """Groups generated to fill this batch (> P under dynamic sampling)."""


RewardShaping = Callable[[Rollout, torch.Tensor], torch.Tensor]
"""(rollout, verifier rewards [B]) -> shaped rewards [B], e.g. DAPO's overlong penalty."""


def collect_batch(run, args, shape_rewards: RewardShaping | None = None) -> Batch:
    """Roll out G completions for P prompts and verify them; with `--dynamic-sampling`, keep informative groups.

    Dynamic sampling (DAPO) draws up to `--max-sampling-rounds` rounds of P prompts and keeps the
    first P groups whose (shaped) rewards are not all equal, topping up with uninformative groups
    when the rounds run out, so that every step has P groups.
    """
    a = args
    G, P = a.group_size, run.local_prompts
    parts, examples, verdicts, rewards, informative, sampled = [], [], [], [], [], 0
    for _ in range(a.max_sampling_rounds if a.dynamic_sampling else 1):
        prompts = run.sampler.take(P)
        r = generate(run.policy, run.tokenizer,
                     render_prompts(run.tokenizer, [e.prompt for e in prompts], a.enable_thinking),
                     G, a.max_new_tokens, a.temperature, a.top_p, autocast=run.d.autocast)
        v = [verify(e, text) for e, text in zip([e for e in prompts for _ in range(G)], r.texts)]
        rew = torch.tensor([x.reward for x in v], dtype=torch.float32)
        if shape_rewards is not None:
            rew = shape_rewards(r, rew)
        base = sum(p.completion_ids.shape[0] for p in parts)
        parts.append(r)
        examples += [e for e in prompts for _ in range(G)]
        verdicts += v
        rewards.append(rew)
        sampled += P
        informative += [base + g * G for g in range(P) if rew[g * G:(g + 1) * G].std() > 0]
        if not a.dynamic_sampling or len(informative) >= P:
            break
    rollout, rewards = concat_rollouts(parts, run.tokenizer.pad_token_id), torch.cat(rewards)
    # Informative groups first, then (if rounds ran out) uninformative ones, so every step has P groups.
    starts = informative[:P] + [s for s in range(0, len(examples), G)
                                if s not in informative][: P - len(informative[:P])]
    rows = [s + j for s in sorted(starts) for j in range(G)] if a.dynamic_sampling else list(range(len(examples)))
    return Batch(select_rows(rollout, rows), [examples[i] for i in rows], [verdicts[i] for i in rows],
                 rewards[rows], sampled)


def score_rollout(run, args, batch: Batch, model: torch.nn.Module | None = None, **stats) -> dict[str, torch.Tensor]:
    """Log-probs (and `stats`: entropy, top-k) of the sampled tokens after the rows' own prompts, without grad.

    `model` defaults to the policy (the rollout policy, before the update: s_old); pass the reference
    model for the KL term. A group's rows share their prompt, so it runs once per group.
    """
    a, r = args, batch.rollout
    with run.d.autocast():
        return score_completions(model if model is not None else run.policy, r.prompt_ids, r.prompt_mask,
                                 r.completion_ids, r.completion_mask, temperature=a.temperature,
                                 chunk_size=a.logprob_chunk, micro_rows=a.micro_batch_rows, share_prompts=True,
                                 **stats)


def batch_metrics(run, batch: Batch, advantages: torch.Tensor) -> dict[str, float]:
    """Reward, accuracy, group, length and sampling statistics of a step, averaged over ranks."""
    G, r = run.args.group_size, batch.rollout
    rewards = batch.rewards
    correct = torch.tensor([float(v.correct) for v in batch.verdicts])
    zero_std = (rewards.view(-1, G).std(dim=1) == 0).float()
    lengths = r.lengths.float().cpu()
    local = torch.stack([rewards.mean(), (rewards ** 2).mean(), correct.mean(), zero_std.mean(), lengths.mean(),
                         r.truncated.float().mean().cpu(), advantages.abs().mean(),
                         torch.tensor(batch.sampled_groups / run.local_prompts)])
    mean = all_reduce(local) / run.d.world_size
    return {"reward/mean": mean[0].item(), "reward/std": math.sqrt(max(mean[1].item() - mean[0].item() ** 2, 0.0)),
            "reward/accuracy": mean[2].item(), "reward/frac_zero_std": mean[3].item(),
            "completion/len_mean": mean[4].item(), "completion/len_max": all_reduce(lengths.max(), "max").item(),
            "completion/clipped_ratio": mean[5].item(), "adv/abs_mean": mean[6].item(),
            "sampling/groups_per_prompt_slot": mean[7].item()}
