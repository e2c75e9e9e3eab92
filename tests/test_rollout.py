"""Rollout generation: each prompt prefilled once for its group gives the same samples as plain `generate`."""
import warnings

import pytest
import torch

from common.data import load_examples
from common.models import load_policy, load_tokenizer
from common.prompts import render_prompts
from common.rollout import generate

# Toy problems of different lengths (left padding), held out from training.
PROBLEMS = sorted({e.prompt: e for e in load_examples("toy", "test")}, key=len)[::60][:3]


@pytest.fixture(scope="module")
def toy():
    return load_policy("toy", torch.device("cpu")), load_tokenizer("toy")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prompts_sample_what_plain_generate_samples(toy, temperature):
    policy, tok = toy
    prompts = render_prompts(tok, PROBLEMS)
    runs = []
    for share in (True, False):
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated cache argument, no generation-config complaint
            runs.append(generate(policy, tok, prompts, 4, 40, temperature=temperature, share_prompts=share))
    shared, plain = runs
    assert torch.equal(shared.prompt_ids, plain.prompt_ids) and torch.equal(shared.prompt_mask, plain.prompt_mask)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.completion_mask, plain.completion_mask) and shared.texts == plain.texts
    assert shared.prompt_ids.shape[0] == 12 and shared.completion_mask.sum() > 12  # rows really decoded
    if temperature == 0:
        assert all("Answer:" in t for t in shared.texts)


def test_each_prompt_is_prefilled_once(toy, monkeypatch):
    policy, tok = toy
    widths = []
    forward = type(policy.lm.model).forward

    def spy(self, input_ids=None, **kwargs):
        widths.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(policy.lm.model), "forward", spy)
    r = generate(policy, tok, render_prompts(tok, PROBLEMS), 4, 8, temperature=0.0)
    Lp = r.prompt_ids.shape[1]
    assert widths[0] == (3, Lp - 1)  # the prefill: 3 distinct prompts, all but their last token
    assert widths[1] == (12, 1)  # then every row runs its last prompt token, and decodes one token per call
    assert all(w == (12, 1) for w in widths[1:])
