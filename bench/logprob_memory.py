"""Peak memory of per-token log-probs with a large vocabulary: chunked paths vs the naive full-logits path.

Each measurement runs in a fresh subprocess and reads its peak resident memory, so the ratios printed
are from one run on one machine. The claim checked: the chunked paths' peak grows with the chunk, not
with batch x length x vocab, both for plain log-probs and for sd.py's logit mode (entropy + top-k
indices, then log-probs gathered at them with a tail bucket).

    python bench/logprob_memory.py [--vocab 151936 --hidden 256]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from common.logprobs import naive_token_stats, token_stats
torch.manual_seed(0)
mode, rows, length, vocab, hidden, chunk, grad = {args}
head = torch.nn.Linear(hidden, vocab, bias=False)
h = torch.randn(rows, length, hidden, requires_grad=grad)
y = torch.randint(0, vocab, (rows, length))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.set_grad_enabled(grad):
    if mode == "naive":
        out = naive_token_stats(head(h), y)["logprobs"]
    elif mode == "chunked":
        out = token_stats(h, head, y, 1.0, chunk)["logprobs"]
    else:  # sd.py logit mode: entropy, top-100 indices, then log-probs gathered at them (+ tail bucket)
        stats = token_stats(h, head, y, 1.0, chunk, with_entropy=True, topk=100)
        out = token_stats(h, head, y, 1.0, chunk, gather_index=stats["topk_index"])["gathered"]
    if grad:
        out.sum().backward()
print(json.dumps({{"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""


def measure(mode: str, rows: int, length: int, vocab: int, hidden: int, chunk: int, grad: bool) -> float:
    code = CHILD.format(root=str(Path(__file__).resolve().parent.parent),
                        args=repr((mode, rows, length, vocab, hidden, chunk, grad)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512)
    a = p.parse_args()
    print(f"vocab {a.vocab}, hidden {a.hidden}, length {a.length}, chunk {a.chunk} positions; peak RSS above baseline")
    print(f"{'rows':>5} {'grad':>5} {'naive MB':>10} {'chunked MB':>11} {'chunked/naive':>14} {'top-k path/naive':>17}")
    for grad in (False, True):
        for rows in (2, 8):
            naive = measure("naive", rows, a.length, a.vocab, a.hidden, a.chunk, grad)
            chunked = measure("chunked", rows, a.length, a.vocab, a.hidden, a.chunk, grad)
            topk = measure("topk", rows, a.length, a.vocab, a.hidden, a.chunk, grad)
            print(f"{rows:>5} {str(grad):>5} {naive:>10.0f} {chunked:>11.0f} "
                  f"{chunked / naive:>14.3f} {topk / naive:>17.3f}")


if __name__ == "__main__":
    main()
