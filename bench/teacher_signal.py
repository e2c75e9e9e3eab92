"""What the self-teacher says about the student's own rollouts under each published teacher context, in one run.

Samples G completions for each of P training problems from the base policy, verifies them, and scores the same
tokens under each script's teacher context (SDPO's, OPSD's and AntiSD's templates as sd.py writes them, HSD's
wording), with the base weights (the `current` teacher at step 0). For each context it prints, over the rows
that context distils (SDPO distils only rows with a successful peer or environment feedback):

  rows                  how many rows are distilled
  pMI correct / wrong   mean over rows of sum_t u_t, u_t = log pi_T(y_t | x, c, y_<t) - log pi(y_t | x, y_<t):
                        a useful teacher likes correct rows more than wrong ones
  gap                   pMI correct - pMI wrong: how well the context separates them (larger is better)
  gap, shared rows      the same over the rows that every context listed distils (SDPO's, when it is listed),
                        so that the contexts compare on the same rollouts
  u per token           mean credit over the distilled completion tokens
  u at EOS              mean credit of the end-of-sequence token on distilled rows that ended: negative values
                        push the student to stop later, so distillation lengthens its answers

    python bench/teacher_signal.py                             # SmolLM2-135M, rg:chain_sum, 12 x 8, 96 tokens
    python bench/teacher_signal.py --model toy --dataset toy --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hsd  # noqa: E402  (HSD's own wording)
import sd  # noqa: E402  (the published templates: SDPO, OPSD, AntiSD)
from common.data import load_examples  # noqa: E402
from common.logprobs import score_completions  # noqa: E402
from common.models import load_policy, load_tokenizer  # noqa: E402
from common.prompts import render_prompts  # noqa: E402
from common.rollout import generate  # noqa: E402
from common.teacher import choose_peers, teacher_inputs  # noqa: E402
from common.verifiers import verify  # noqa: E402

CHAIN_SUM = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"
CONTEXTS = ["sdpo", "opsd", "antisd", "hsd"]


def credit_summary(u: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, ended: torch.Tensor,
                   rows: torch.Tensor) -> dict[str, float]:
    """Over `rows` (bool [B]): their number, pMI of correct and wrong ones, mean credit per token, mean credit
    at the EOS of those that ended."""
    pmi = (u * mask).sum(-1)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    at_eos = u[torch.arange(u.shape[0]), last][ended & rows]
    nan = float("nan")
    pmi_correct = pmi[correct & rows].mean().item() if (correct & rows).any() else nan
    pmi_wrong = pmi[~correct & rows].mean().item() if (~correct & rows).any() else nan
    m = mask[rows]
    return {"rows": int(rows.sum()), "pmi_correct": pmi_correct, "pmi_wrong": pmi_wrong, "gap": pmi_correct - pmi_wrong,
            "u_token": ((u[rows] * m).sum() / m.sum()).item() if m.sum() > 0 else nan,
            "u_eos": at_eos.mean().item() if at_eos.numel() else nan}


def context_messages(context: str, batch: SimpleNamespace, group_size: int, seed: int) -> tuple[list, torch.Tensor]:
    """Each row's teacher message under `context` and which rows it distils (sd.py's templates, hsd.py's wording)."""
    if context in ("sdpo", "opsd", "antisd"):
        args = sd.Args(context=context, group_size=group_size)
        return sd.teacher_messages(batch, args, torch.Generator().manual_seed(seed))
    correct = torch.tensor([v.correct for v in batch.verdicts])
    peers = choose_peers(correct, group_size, "random", torch.Generator().manual_seed(seed)).tolist()
    instruction = hsd.Args().teacher_instruction
    return [hsd.hsd_message(e, hsd.privileged_block(e, batch.rollout.texts[p] if p >= 0 else None), instruction)
            for e, p in zip(batch.examples, peers)], \
        torch.ones(len(peers), dtype=torch.bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=CHAIN_SUM)
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contexts", nargs="+", default=CONTEXTS, choices=CONTEXTS, help="teacher contexts to compare")
    p.add_argument("--quick", action="store_true", help="2 prompts x 4 samples of 16 tokens: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.num_prompts, a.group_size, a.max_new_tokens = 2, 4, 16
    torch.manual_seed(a.seed)
    tok, device = load_tokenizer(a.model), torch.device("cpu")
    policy = load_policy(a.model, device).eval()
    examples = load_examples(a.dataset, "train")[: a.num_prompts]
    with torch.no_grad():
        r = generate(policy, tok, render_prompts(tok, [e.prompt for e in examples]), a.group_size, a.max_new_tokens,
                     temperature=a.temperature)
    rows = [e for e in examples for _ in range(a.group_size)]
    verdicts = [verify(e, text) for e, text in zip(rows, r.texts)]
    batch = SimpleNamespace(examples=rows, verdicts=verdicts, rewards=torch.tensor([v.reward for v in verdicts]),
                            rollout=r)
    correct, ended = torch.tensor([v.correct for v in verdicts]), ~r.truncated
    mask = r.completion_mask.float()

    def scores(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return score_completions(policy, prompt_ids, prompt_mask, r.completion_ids, r.completion_mask,
                                     a.temperature, 512, a.group_size)["logprobs"]

    student = scores(r.prompt_ids, r.prompt_mask)
    groups = correct.view(-1, a.group_size).any(-1)
    print(f"\n{a.model} on {a.dataset}: {a.num_prompts} prompts x {a.group_size} samples at T={a.temperature:g}, "
          f"{a.max_new_tokens} new tokens: {correct.sum().item()} correct, "
          f"{groups.sum().item()} of {len(groups)} groups "
          f"with a success, {ended.sum().item()} ended, mean length {statistics.mean(mask.sum(-1).tolist()):.1f}")
    credits, rows = {}, {}
    for context in a.contexts:
        messages, rows[context] = context_messages(context, batch, a.group_size, a.seed)
        ids, pmask, _ = teacher_inputs(tok, messages, 10_000, device)
        credits[context] = (scores(ids, pmask) - student) * mask
    shared = torch.stack(list(rows.values())).all(0)
    print(f"{'context':<8} {'rows':>5} {'pMI correct':>11} {'pMI wrong':>10} {'gap':>6} {'u/token':>8} {'u at EOS':>9} "
          f"{'gap, ' + str(int(shared.sum())) + ' shared rows':>20}")
    for context in a.contexts:
        s = credit_summary(credits[context], mask, correct, ended, rows[context])
        common = credit_summary(credits[context], mask, correct, ended, shared)
        print(f"{context:<8} {s['rows']:>5} {s['pmi_correct']:>11.2f} {s['pmi_wrong']:>10.2f} {s['gap']:>6.2f} "
              f"{s['u_token']:>8.3f} {s['u_eos']:>9.2f} {common['gap']:>20.2f}")


if __name__ == "__main__":
    main()
