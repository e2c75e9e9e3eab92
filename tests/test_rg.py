"""reasoning-gym tasks as datasets (`--dataset rg:<task>?key=value`): seeded disjoint splits, the task's checker."""
import json

import pytest

pytest.importorskip("reasoning_gym")
import reasoning_gym  # noqa: E402

from common import tracking  # noqa: E402
from common.data import RG_SUFFIX, DataError, load_examples, parse_rg_spec  # noqa: E402
from common.verifiers import verify  # noqa: E402

CHAIN = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2&train_size=400&test_size=60"


def test_spec_parsing_types_and_defaults():
    name, config, options = parse_rg_spec("rg:chain_sum?min_terms=2&allow_negation=false&scale=0.5&seed=3&reward=task")
    assert name == "chain_sum"
    assert config == {"min_terms": 2, "allow_negation": False, "scale": 0.5}
    assert options == {"seed": 3, "train_size": 5000, "test_size": 500, "reward": "task"}
    assert parse_rg_spec("rg:products") == ("products", {}, {"seed": 0, "train_size": 5000, "test_size": 500,
                                                            "reward": "binary"})


@pytest.mark.parametrize("spec, message", [
    ("rg:no_such_task", "unknown reasoning-gym task 'no_such_task'"),
    ("rg:chain_sum?min_terms", "'min_terms' is not key=value"),
    ("rg:chain_sum?train_size=0", "train_size must be an integer >= 1"),
    ("rg:chain_sum?seed=x", "seed must be an integer"),
    ("rg:chain_sum?reward=half", "reward must be binary"),
    ("rg:chain_sum?no_such_field=1", "reasoning-gym rejected the config"),
    ("rg:chain_sum?min_terms=9&max_terms=2", "reasoning-gym rejected the config"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_examples(spec, "train")


def test_splits_are_seeded_disjoint_and_deterministic():
    train, test = load_examples(CHAIN, "train"), load_examples(CHAIN, "test")
    assert 0 < len(test) <= 60 and 0 < len(train) <= 400
    questions = [e.meta["rg"]["entry"]["question"] for e in train + test]
    assert len(set(questions)) == len(questions)  # no duplicate within a split, no test question in train
    again = load_examples(CHAIN, "train")
    assert [(e.prompt, e.answer) for e in again] == [(e.prompt, e.answer) for e in train]
    other = load_examples(CHAIN + "&seed=7", "test")
    assert [e.prompt for e in other] != [e.prompt for e in test]
    # The task's config reached reasoning-gym: 2-3 terms of 1-2 digits.
    for e in train + test:
        meta = e.meta["rg"]["entry"]["metadata"]
        assert 2 <= meta["num_terms"] <= 3 and 1 <= meta["num_digits"] <= 2
    first = test[0]
    assert first.task == "rg" and first.prompt.endswith(RG_SUFFIX)
    assert first.prompt == first.meta["rg"]["entry"]["question"] + RG_SUFFIX
    assert first.answer == first.meta["rg"]["entry"]["answer"]
    json.dumps(first.meta)  # what the verifier's worker receives is plain JSON


def test_a_train_split_smaller_than_the_test_split_is_said_once(capsys):
    """2 terms of 1 digit: about 200 distinct problems, most of them drawn by the default 500-entry test split."""
    small = "rg:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
    tracking.warned.discard(f"rg-small-train {small}")  # said once per process: this test may not be the first
    train, test = load_examples(small, "train"), load_examples(small, "test")
    assert len(train) < len(test)
    load_examples(small, "train")
    out = capsys.readouterr().out
    assert out.count(f"the train split holds {len(train)} distinct questions, fewer than the test split's "
                     f"{len(test)}") == 1 and "lower test_size" in out
    train, test = load_examples(small + "&test_size=100", "train"), load_examples(small + "&test_size=100", "test")
    assert len(train) > len(test) and "warning" not in capsys.readouterr().out
    assert not {e.prompt for e in train} & {e.prompt for e in test}


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic", "simple_equations", "products", "letter_counting",
                                  "leg_counting", "spell_backward", "word_sorting"])
def test_reward_agrees_with_the_tasks_checker(task):
    checker = reasoning_gym.create_dataset(task, size=1, seed=0)
    for e in load_examples(f"rg:{task}?test_size=6", "test"):
        entry, gold = e.meta["rg"]["entry"], e.answer
        wrong = str(int(gold) + 1) if gold.lstrip("-").isdigit() else gold[::-1] + "x"
        assert checker.score_answer(gold, entry) == 1.0 and checker.score_answer(wrong, entry) < 1.0
        cases = [(f"Let me think.\n\n\\boxed{{{gold}}}", 1.0), (f"\\boxed{{{wrong}}}", 0.0), ("I do not know.", 0.0),
                 ("", 0.0)]
        if gold.lstrip("-").isdigit():  # a stated number counts as for math; words are read from a box
            cases.append((f"The answer is {gold}.", 1.0))
        for completion, expected in cases:
            verdict = verify(e, completion)
            assert (verdict.reward, verdict.correct) == (expected, expected == 1.0), (task, completion, verdict)


def test_numeric_gold_needs_a_number_and_hedges_score_zero():
    e = load_examples(CHAIN, "test")[0]
    expression = e.meta["rg"]["entry"]["metadata"]["expression"]
    assert verify(e, f"\\boxed{{{expression}}}").reward == 0.0  # the question restated, not its value
    assert "not a number" in verify(e, f"\\boxed{{{expression}}}").feedback
    assert verify(e, f"\\boxed{{{expression} = {e.answer}}}").reward == 1.0
    assert verify(e, f"\\boxed{{{e.answer}}} or maybe \\boxed{{{int(e.answer) + 1}}}").reward == 0.0
    assert verify(e, f"\\boxed{{\\text{{{e.answer}}}}}").reward == 1.0


def test_reward_mode_task_keeps_partial_marks():
    binary = load_examples("rg:spell_backward?test_size=3", "test")[0]
    partial = load_examples("rg:spell_backward?test_size=3&reward=task", "test")[0]
    near = binary.answer[:-1]
    score = reasoning_gym.create_dataset("spell_backward", size=1, seed=0).score_answer(
        near, binary.meta["rg"]["entry"])
    assert 0.0 < score < 1.0
    b, p = verify(binary, f"\\boxed{{{near}}}"), verify(partial, f"\\boxed{{{near}}}")
    assert (b.reward, b.correct) == (0.0, False) and "checker gives" in b.feedback
    assert p.reward == pytest.approx(score) and not p.correct
