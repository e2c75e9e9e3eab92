"""Chunked log-probs, entropy, top-k gathers and teacher scoring against naive full-softmax computations."""
import pytest
import torch
import torch.nn.functional as F

from common.logprobs import log1mexp, naive_token_stats, score_completions, token_stats
from common.prompts import tokenize_left


def make(B=3, T=5, H=16, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, head, targets


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_fp32(chunk, temperature):
    hidden, head, targets = make()
    got = token_stats(hidden, head, targets, temperature, chunk, with_entropy=True)
    want = naive_token_stats(head(hidden), targets, temperature)
    # Explicit loops over tokens as a second, independent reference.
    logits = head(hidden).double() / temperature
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            p = torch.softmax(logits[b, t], -1)
            assert got["logprobs"][b, t].item() == pytest.approx(torch.log(p[targets[b, t]]).item(), abs=1e-5)
            assert got["entropy"][b, t].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["entropy"], want["entropy"], atol=1e-5, rtol=1e-5)


def test_chunked_bf16_close_to_fp32():
    hidden, head, targets = make(dtype=torch.bfloat16)
    got = token_stats(hidden, head, targets, 0.8, 3, with_entropy=True)
    want = naive_token_stats(head.float()(hidden.float()), targets, 0.8)
    torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(got["entropy"], want["entropy"], atol=5e-2, rtol=2e-2)


def test_topk_and_gather_with_tail():
    hidden, head, targets = make(V=50)
    k = 6
    got = token_stats(hidden, head, targets, 0.9, 4, topk=k)
    logp = F.log_softmax(head(hidden) / 0.9, -1)
    assert torch.equal(got["topk_index"], logp.topk(k, -1).indices)
    gathered = token_stats(hidden, head, targets, 0.9, 5, gather_index=got["topk_index"])["gathered"]
    want_top = logp.gather(-1, got["topk_index"])
    want_tail = torch.log(1 - want_top.exp().sum(-1))
    torch.testing.assert_close(gathered[..., :k], want_top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered[..., k], want_tail, atol=1e-5, rtol=1e-5)


def test_log1mexp_stable():
    x = torch.tensor([-1e-6, -0.1, -0.6931, -0.7, -5.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-30]))).all()


def test_gradients_match_naive():
    hidden, head, targets = make()
    h1 = hidden.clone().requires_grad_(True)
    token_stats(h1, head, targets, 0.7, 4, with_entropy=True)["logprobs"].sum().backward()
    g_head = head.weight.grad.clone()
    head.weight.grad = None
    h2 = hidden.clone().requires_grad_(True)
    naive_token_stats(head(h2), targets, 0.7)["logprobs"].sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_head, head.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_gradients_match_explicit_sums(temperature):
    """LinearLogProb (the update's path) against d log p_t / dh_t = sum_v (onehot(y_t) - p_t)_v W_v / tau and
    d/dW_v = sum_t g_t (onehot(y_t) - p_t)_v h_t / tau in float64, with per-token upstream weights that zero the
    padding positions."""
    hidden, head, targets = make(B=2, T=4, H=8, V=11)
    upstream = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    upstream[1, :2] = 0.0  # padding: no gradient from these positions
    h = hidden.clone().requires_grad_(True)
    out = token_stats(h, head, targets, temperature, 3, with_entropy=True)
    (out["logprobs"] * upstream).sum().backward()
    assert not out["entropy"].requires_grad  # a statistic under grad
    W = head.weight.detach().double()
    want_h, want_w = torch.zeros_like(hidden, dtype=torch.float64), torch.zeros_like(W)
    for b in range(2):
        for t in range(4):
            p = torch.softmax(hidden[b, t].double() @ W.T / temperature, -1)
            d = -p
            d[targets[b, t]] += 1
            want_h[b, t] = upstream[b, t] * (d @ W) / temperature
            want_w += upstream[b, t].double() * torch.outer(d, hidden[b, t].double()) / temperature
    torch.testing.assert_close(h.grad.double(), want_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), want_w, atol=1e-5, rtol=1e-5)
    assert torch.all(h.grad[1, :2] == 0)
    with torch.no_grad():  # values and entropies equal the no-grad path's
        plain = token_stats(hidden, head, targets, temperature, 3, with_entropy=True)
    torch.testing.assert_close(out["logprobs"].detach(), plain["logprobs"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["entropy"], plain["entropy"], atol=1e-6, rtol=1e-6)


def test_fused_head_frozen_weight_and_bf16_autocast():
    """A frozen head (LoRA trains no head) gets no gradient and the hidden states the same one; under bf16 autocast
    the gradients stay close to fp32's."""
    hidden, head, targets = make()
    h32 = hidden.clone().requires_grad_(True)
    token_stats(h32, head, targets, 0.9, 4)["logprobs"].sum().backward()
    head.weight.requires_grad_(False)
    h = hidden.clone().requires_grad_(True)
    token_stats(h, head, targets, 0.9, 4)["logprobs"].sum().backward()
    assert head.weight.grad is not None and torch.equal(h.grad, h32.grad)
    head.weight.grad = None
    h16 = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_stats(h16, head, targets, 0.9, 4)["logprobs"]
    lp.sum().backward()
    assert head.weight.grad is None and h16.grad.dtype == torch.float32
    torch.testing.assert_close(h16.grad, h32.grad, atol=5e-2, rtol=5e-2)


def full_logprobs(policy, ids, temperature):
    """Naive: one unpadded forward of the whole sequence through the HF model, full softmax."""
    logits = policy.lm(input_ids=ids[None]).logits[0]
    return F.log_softmax(logits.float() / temperature, -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)


def test_policy_scores_left_padded_rows_like_unpadded(policy, tokenizer):
    prompts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nCompute 12+34+56.<|im_end|>\n<|im_start|>assistant\n", "hi"]
    completions = ["1+2=3\nAnswer: 3<|im_end|>", "12+34=46<|im_end|>", "x<|im_end|>"]
    p_ids, p_mask = tokenize_left(tokenizer, prompts, torch.device("cpu"))
    c = [tokenizer(t, add_special_tokens=False).input_ids for t in completions]
    T = max(map(len, c))
    c_ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x in c])
    c_mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in c])
    with torch.no_grad():
        got = score_completions(policy, p_ids, p_mask, c_ids, c_mask, 0.7, chunk_size=5, micro_rows=2,
                                with_entropy=True)
        for i, (p, x) in enumerate(zip(prompts, c)):
            ids = torch.tensor(tokenizer(p, add_special_tokens=False).input_ids + x)
            want = full_logprobs(policy, ids, 0.7)[-len(x):]
            torch.testing.assert_close(got["logprobs"][i, :len(x)], want, atol=1e-5, rtol=1e-4)
            assert (got["logprobs"][i, len(x):] == 0).all()  # padding is zeroed, never scored


def test_prompt_sharing_matches_full_forward(policy, tokenizer):
    """share_prompts: each distinct prompt runs once, KV selected per row; same stats and gradients as the full
    forward, whether the rows sharing a prompt are contiguous (a GRPO group) or scattered (teacher prompts)."""
    prompts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n", "hi", "<|im_start|>user\nbye"]
    completions = ["1+2=3\nAnswer: 3<|im_end|>", "12+34=46<|im_end|>", "x<|im_end|>", "Answer: 9<|im_end|>",
                   "7<|im_end|>", "Answer: 1+1<|im_end|>"]
    rows = [0, 0, 1, 1, 2, 0]  # prompt of each row: 3 distinct prompts over 6 rows, prompt 0 also last
    p_ids, p_mask = tokenize_left(tokenizer, [prompts[i] for i in rows], torch.device("cpu"))
    c = [tokenizer(t, add_special_tokens=False).input_ids for t in completions]
    T = max(map(len, c))
    c_ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x in c])
    c_mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in c])
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
    policy.train()
    first, owner = policy.prompt_groups(ids, mask, T)
    assert first.tolist() == [0, 2, 4] and owner.tolist() == rows
    assert policy.prompt_groups(ids[[0, 2, 4]], mask[[0, 2, 4]], T) is None  # all distinct: nothing to share
    assert policy.prompt_groups(ids, mask, 1) is None  # one completion token: nothing before it to run
    assert policy.prompt_groups(ids, mask.bool(), T) is not None  # any mask dtype

    def run(order, share):
        policy.zero_grad()
        out = policy(ids[order], mask[order], T, 0.7, chunk_size=3, with_entropy=True, share_prompts=share)
        (out["logprobs"] * c_mask[order]).sum().backward()
        return out, [p.grad.clone() for p in policy.parameters()]

    natural, shuffled = list(range(6)), [5, 2, 0, 4, 1, 3]
    full, full_grads = run(natural, False)
    for order in (natural, shuffled):
        shared, shared_grads = run(order, True)
        for key in ("logprobs", "entropy"):
            torch.testing.assert_close(shared[key] * c_mask[order], full[key][order] * c_mask[order], atol=1e-5,
                                       rtol=1e-5)
        for a, b in zip(shared_grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # A batch of distinct prompts runs the full forward, bit for bit.
    distinct = [0, 2, 4]
    assert torch.equal(policy(ids[distinct], mask[distinct], T, 0.7, chunk_size=3, share_prompts=True)["logprobs"],
                       policy(ids[distinct], mask[distinct], T, 0.7, chunk_size=3)["logprobs"])


def test_prefix_sharing_uses_the_current_cache_api(policy, tokenizer):
    """transformers 5.24 deprecates `past_key_values` (removed in 5.40): prefix sharing must not rely on it."""
    import logging
    import warnings

    prompts = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n", "hi"]
    G = 2
    p_ids, p_mask = tokenize_left(tokenizer, [p for p in prompts for _ in range(G)], torch.device("cpu"))
    c_ids = torch.tensor([tokenizer("1+2=3<|im_end|>", add_special_tokens=False).input_ids] * len(prompts) * G)
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, torch.ones_like(c_ids)], 1)
    assert policy.prompt_groups(ids, mask, c_ids.shape[1]) is not None
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, hf_logger = Collect(), logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # transformers warns once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy(ids, mask, c_ids.shape[1], share_prompts=True)["logprobs"].sum().backward()
    finally:
        hf_logger.removeHandler(handler)
    said = messages + [str(w.message) for w in caught]
    assert not [m for m in said if "past_key_values" in m or "deprecated" in m.lower()], said
