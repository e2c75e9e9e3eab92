"""What the self-teacher says about the student's own rollouts, for each teacher-prompt instruction, in one run.

Samples G completions for each of P training problems from the base policy, verifies them, and scores the same
tokens under sd.py's teacher prompt (the answer-only block, with and without feedback on the attempt) ending in
each instruction given, with the base weights (sd.py's `current` teacher at step 0). For each setting it prints:

  pMI correct / wrong   mean over rows of sum_t u_t, u_t = log pi_T(y_t | x, c, y_<t) - log pi(y_t | x, y_<t):
                        a useful teacher likes correct rows more than wrong ones
  u per token           mean credit over all completion tokens
  u at EOS              mean credit of the end-of-sequence token on rows that ended: negative values push
                        the student to stop later, so distillation lengthens its answers

    python bench/teacher_signal.py                             # SmolLM2-135M, rg:chain_sum, 12 x 8, 96 tokens
    python bench/teacher_signal.py --model toy --dataset toy --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sd  # noqa: E402  (sd.py's own teacher block: the answer line, then the feedback sentence)
from common.data import load_examples  # noqa: E402
from common.logprobs import score_completions  # noqa: E402
from common.models import load_policy, load_tokenizer  # noqa: E402
from common.prompts import render_prompts  # noqa: E402
from common.rollout import generate  # noqa: E402
from common.teacher import TEACHER_INSTRUCTION, teacher_inputs  # noqa: E402
from common.verifiers import verify  # noqa: E402

CHAIN_SUM = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"


def credit_summary(u: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, ended: torch.Tensor) -> dict[str, float]:
    """pMI of correct and wrong rows, mean credit per token, mean credit at the EOS of the rows that ended."""
    pmi = (u * mask).sum(-1)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    at_eos = u[torch.arange(u.shape[0]), last][ended]
    nan = float("nan")
    return {"pmi_correct": pmi[correct].mean().item() if correct.any() else nan,
            "pmi_wrong": pmi[~correct].mean().item() if (~correct).any() else nan,
            "u_token": ((u * mask).sum() / mask.sum()).item(),
            "u_eos": at_eos.mean().item() if ended.any() else nan}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=CHAIN_SUM)
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instructions", nargs="+", default=[TEACHER_INSTRUCTION, ""],
                   help='teacher prompt last lines to compare ("" for none)')
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
    correct, ended = torch.tensor([v.correct for v in verdicts]), ~r.truncated
    mask = r.completion_mask.float()

    def scores(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return score_completions(policy, prompt_ids, prompt_mask, r.completion_ids, r.completion_mask, 1.0, 512,
                                     a.group_size)["logprobs"]

    student = scores(r.prompt_ids, r.prompt_mask)
    print(f"\n{a.model} on {a.dataset}: {a.num_prompts} prompts x {a.group_size} samples at T={a.temperature:g}, "
          f"{a.max_new_tokens} new tokens: {correct.sum().item()} correct, {ended.sum().item()} ended, mean length "
          f"{statistics.mean(mask.sum(-1).tolist()):.1f}")
    print(f"{'instruction':<48} {'feedback':>8} {'pMI correct':>11} {'pMI wrong':>10} {'u/token':>8} {'u at EOS':>9}")
    for instruction in a.instructions:
        for feedback in (True, False):
            blocks = [sd.privileged_block(e, v, "answer", feedback) for e, v in zip(rows, verdicts)]
            ids, pmask, _ = teacher_inputs(tok, [e.prompt for e in rows], blocks, 10_000, device,
                                           instruction=instruction)
            s = credit_summary((scores(ids, pmask) - student) * mask, mask, correct, ended)
            print(f"{repr(instruction)[:48]:<48} {'on' if feedback else 'off':>8} {s['pmi_correct']:>11.2f} "
                  f"{s['pmi_wrong']:>10.2f} {s['u_token']:>8.3f} {s['u_eos']:>9.2f}")


if __name__ == "__main__":
    main()
