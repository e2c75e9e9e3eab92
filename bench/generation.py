"""Rollout generation and the update against this machine's matrix-product time for the same work, in one run.

For a batch of P prompts x G samples it times, each `--repeats` times (median):

* `generate` with each prompt prefilled once for its group (`shared_prompt_cache`, the default), and as plain
  `generate` runs it (every row's prompt in full): the baseline of the prompt sharing;
* the update: the policy's forward on the batch with the group's prompt run once (`Policy.forward` with
  `group_size`), backward of the summed log-probs and an AdamW step, as `common.update.Update` runs it;
* the matrix products that work needs, alone: each linear layer of the model (and the LM head where logits are
  needed) applied with `F.linear` to inputs of the real shapes, in the model's order, and for the update the
  two backward products (input and weight gradients) too. Attention score products are left out (at these
  context lengths a few percent of the linear layers' FLOPs) and so are norms, activations and sampling.

The ratios (time / matrix-product time) say how far each stage is from this machine's limit for that work:
1.0 would be pure matrix products. Absolute times vary with the machine's load; the ratios are measured side
by side.

    python bench/generation.py                                   # SmolLM2-135M, rg:chain_sum, 4 x 8, 16 tokens
    python bench/generation.py --model toy --dataset toy --quick # seconds, any machine
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.data import load_examples  # noqa: E402
from common.models import load_policy, load_tokenizer  # noqa: E402
from common.prompts import render_prompts  # noqa: E402
from common.rollout import generate  # noqa: E402

CHAIN_SUM = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"


def linear_layers(policy) -> list[torch.Tensor]:
    """The weights of the decoder's linear layers in forward order (the LM head excluded)."""
    return [m.weight for m in policy.lm.model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_time(weights: list[torch.Tensor], head: torch.Tensor, calls: list[tuple[int, int]],
                backward: bool = False) -> float:
    """Seconds for `calls` = [(tokens through the decoder, tokens through the head)] of plain products (inputs made
    beforehand: only the products are timed)."""
    inputs = {(n, w.shape[1]): torch.randn(n, w.shape[1]) for n, h in calls for w in [*weights, head] if n or h}
    inputs |= {(h, head.shape[1]): torch.randn(h, head.shape[1]) for _, h in calls if h}
    t0 = time.perf_counter()
    with torch.no_grad():
        for tokens, head_tokens in calls:
            for w, n in [(w, tokens) for w in weights] + ([(head, head_tokens)] if head_tokens else []):
                x = inputs[(n, w.shape[1])]
                y = F.linear(x, w)
                if backward:  # grad input (g W) and grad weight (g^T x)
                    y @ w
                    y.T @ x
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=CHAIN_SUM)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer rows: a smoke run")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.repeats, a.num_prompts, a.group_size = 1, 2, 4
    P, G = a.num_prompts, a.group_size
    tok = load_tokenizer(a.model)
    policy = load_policy(a.model, torch.device("cpu"))
    prompts = render_prompts(tok, [e.prompt for e in load_examples(a.dataset, "test")[:P]])
    weights, head = linear_layers(policy), policy.lm.lm_head.weight
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)  # as common.run.setup

    times: dict[str, list[float]] = {k: [] for k in ("shared", "plain", "mm_shared", "mm_plain", "update", "mm_update")}
    same_tokens = True
    for repeat in range(a.repeats + 1):  # the first round warms up and is dropped
        rows: dict[str, object] = {}
        for share in (True, False):
            torch.manual_seed(repeat)
            t0 = time.perf_counter()
            rows[share] = generate(policy, tok, prompts, G, a.max_new_tokens, temperature=0.0, share_prompts=share)
            rows[f"t{share}"] = time.perf_counter() - t0
        r = rows[True]
        same_tokens &= torch.equal(r.completion_ids, rows[False].completion_ids)
        Lp, T, B = r.prompt_ids.shape[1], r.completion_ids.shape[1], P * G
        steps = [(B, B)] * T  # the first call runs the last prompt token; each call's logits sample one token
        mm_shared = matmul_time(weights, head, [(P * (Lp - 1), 0)] + steps)
        mm_plain = matmul_time(weights, head, [(B * (Lp - 1), 0)] + steps)

        policy.train()
        t0 = time.perf_counter()
        out = policy(r.input_ids, r.attention_mask, completion_len=T, share_prompts=True)
        (out["logprobs"] * r.completion_mask).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0
        # Forward and backward of the shared prompts and the completions; the head on every completion token.
        mm_update = matmul_time(weights, head, [(P * Lp, 0), (B * (T - 1), B * T)], backward=True)
        if repeat:
            for key, value in (("shared", rows["tTrue"]), ("plain", rows["tFalse"]), ("mm_shared", mm_shared),
                               ("mm_plain", mm_plain), ("update", t_update), ("mm_update", mm_update)):
                times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{a.model} on {a.dataset}: {P} prompts x {G} samples, {Lp} prompt tokens (padded), {T} new tokens, "
          f"{torch.get_num_threads()} thread(s), median of {a.repeats}")
    print(f"{'stage':<28} {'vs its matmul time':>18}")
    print(f"{'generate (prompts shared)':<28} {med['shared'] / med['mm_shared']:>17.2f}x   target <= 1.5x")
    print(f"{'generate (every row)':<28} {med['plain'] / med['mm_plain']:>17.2f}x")
    print(f"{'update (fwd + bwd + AdamW)':<28} {med['update'] / med['mm_update']:>17.2f}x   target <= 1.3x")
    print(f"prompt sharing: generate {med['plain'] / med['shared']:.2f}x faster; greedy tokens "
          f"{'identical' if same_tokens else 'DIFFER'} with and without")


if __name__ == "__main__":
    main()
