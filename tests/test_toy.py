"""The embedded toy default: tokenizer, task splits and the shipped base checkpoint."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
import transformers

from common import toy

TEXT = "Compute 23+58+7.\n  tabs\tand ünïcödé 日本語 🎉 <b>&amp;</b>"


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return toy.build_tokenizer()


@pytest.fixture(scope="module")
def shipped() -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    model = transformers.AutoModelForCausalLM.from_pretrained(toy.TOY_MODEL_DIR).eval()
    return model, transformers.AutoTokenizer.from_pretrained(toy.TOY_MODEL_DIR)


def test_tokenizer_round_trips_bytes(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode())  # one token per byte
    assert tokenizer.decode(ids) == TEXT


def test_special_tokens(tokenizer):
    ids = {tokenizer.convert_tokens_to_ids(t) for t in (toy.IM_START, toy.IM_END, toy.PAD)}
    assert len(ids) == 3 and all(i >= 256 for i in ids)
    assert tokenizer.eos_token == toy.IM_END and tokenizer.pad_token == toy.PAD
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    assert tokenizer("A", add_special_tokens=False)["input_ids"] == [65]  # token id == byte value
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids(toy.IM_START), 65], skip_special_tokens=True) == "A"


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    gen = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_save_load_round_trip(tokenizer, tmp_path: Path):
    model = toy.build_model(tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok2(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert tok2.chat_template == tokenizer.chat_template
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    model2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(model2(ids).logits, model(ids).logits)
    assert model2.generation_config.eos_token_id == tokenizer.eos_token_id


def test_splits_deterministic_and_disjoint():
    train, test = toy.examples("train"), toy.examples("test")
    assert len(test) == toy.N_TEST and len(train) == toy.N_TRAIN
    assert [e.prompt for e in test] == [e.prompt for e in toy.examples("test")]
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train}) == len(train)
    with pytest.raises(ValueError):
        toy.examples("validation")


def test_solution_arithmetic():
    for ex in toy.examples("test"):
        assert ex.task == "toy"
        terms = [int(t) for t in re.fullmatch(r"Compute (\d+(?:\+\d+)+)\.", ex.prompt).group(1).split("+")]
        *steps, last = ex.solution.split("\n")
        total = terms[0]
        for step, term in zip(steps, terms[1:], strict=True):
            a, b, s = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
            assert (a, b, s) == (total, term, total + term)
            total = s
        assert last == f"Answer: {total}" and ex.answer == str(total) == toy.extract_answer(ex.solution)


def test_shipped_checkpoint_acceptance(shipped):
    model, tok = shipped
    assert isinstance(model, transformers.Qwen3ForCausalLM)
    test = toy.examples("test")  # the whole held-out split, as README reports
    answers = [e.answer for e in test]
    prompts = [e.prompt for e in test]
    assert max(len(tok(toy.student_text(tok, p))["input_ids"]) for p in prompts) < 64
    assert max(len(tok(e.solution)["input_ids"]) + 1 for e in test) < 48
    base = toy.accuracy(model, tok, prompts, answers)
    assert 0.10 <= base <= 0.60  # partial: RL has signal and room (measured 0.245)
    rng = random.Random(0)
    for context in toy.TEACHER_CONTEXTS[:3]:  # the self-teacher is genuinely better (measured 0.885-0.98)
        with_solution = toy.accuracy(model, tok, [toy.teacher_message(e, context, rng) for e in test], answers)
        assert with_solution >= 2 * base, context


def test_load_toy_missing(monkeypatch, tmp_path: Path):
    model, tok = toy.load_toy()
    assert tok.eos_token_id == model.config.eos_token_id
    monkeypatch.setattr(toy, "TOY_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="python -m common.toy"):
        toy.load_toy()


def test_pretraining_teacher_messages_are_the_scripts_own():
    """The toy base reads every teacher context the SD scripts build: its pre-training writes the same text."""
    import hsd
    import sd
    from common.verifiers import Verdict

    class First:  # the first of every choice: no feedback line, the solution block
        def choice(self, options):
            return options[0]

        def random(self):
            return 1.0

    ex = toy.examples("train")[0]
    texts = [toy.teacher_message(ex, context, First()) for context in toy.TEACHER_CONTEXTS]
    assert toy.TEACHER_CONTEXTS == ("sdpo", "opsd", "antisd", "hsd")
    assert texts[0] == sd.sdpo_message(ex.prompt, ex.solution, None).text
    assert texts[1] == sd.opsd_message(ex).text
    assert texts[2] == sd.antisd_message(ex, Verdict(1.0, True, ""), ex.solution).text
    assert texts[3] == hsd.hsd_message(ex, ex.solution, hsd.Args().teacher_instruction).text
