"""Registered hub datasets, loaded by the real loader from fixtures in each dataset's own schema and format."""
import json
from pathlib import Path

import pytest

from common.data import DATA_DIR_ENV, DataError, Example, last_boxed, load_examples
from common.verifiers import verify

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
MATH_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture()
def fixtures(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(FIXTURES))


def fields(examples: list[Example], *names: str) -> list[tuple]:
    return [tuple(getattr(e, n) for n in names) for e in examples]


def test_gsm8k(fixtures):
    ex = load_examples("gsm8k", "train")
    assert fields(ex, "answer", "task", "tests") == [("72", "math", None), ("10", "math", None), ("1600", "math", None)]
    assert ex[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                              "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert ex[1].solution == "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10."
    assert ex[0].prompt == ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                            "May. How many clips did Natalia sell altogether in April and May?" + MATH_SUFFIX)
    assert ex[2].meta["row"].startswith("gsm8k train row 2 (") and ex[2].meta["row"].endswith("gsm8k/train.parquet)")


def test_math_boxed_answers_and_template(fixtures, capsys):
    train = load_examples("math", "train")
    # The last box wins (not the earlier \boxed{1}); nested and escaped braces stay; "\boxed 4" is skipped.
    assert [e.answer for e in train] == ["0", "\\frac{\\sqrt{3}}{2}", "\\{-1, 2\\}"]
    assert "skipped 1 row(s) without a final answer" in capsys.readouterr().out
    assert train[1].prompt == "Compute $\\sin 60^\\circ$." + MATH_SUFFIX
    assert train[2].solution == "Factor: $(x-2)(x+1)=0$, so the set is $\\boxed{\\{-1, 2\\}}$."
    test = load_examples("math", "test")  # MATH-500 (jsonl): its `answer` field
    assert [e.answer for e in test] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}"]
    assert all(e.task == "math" and e.solution for e in train + test)


def test_last_boxed():
    assert last_boxed("$\\boxed{1}$ then $\\boxed{\\frac{a}{b^{2}}}$.") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\fbox{\\left\\{ x \\right.}") == "\\left\\{ x \\right."
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None and last_boxed("\\boxed{}") is None


def test_dapo_math_strips_wrapper_and_duplicates(fixtures):
    ex = load_examples("dapo-math", "train")
    assert [e.answer for e in ex] == ["34", "9", "2"]  # row 2 repeats row 0, as on the hub
    assert ex[1].prompt == "How many positive divisors does $36$ have?" + MATH_SUFFIX
    assert ex[0].prompt.startswith("In triangle $ABC$") and "Answer:" not in ex[0].prompt
    assert ex[2].prompt == "Find the remainder when $2^{10}$ is divided by $7$." + MATH_SUFFIX  # no wrapper to strip
    assert all(e.solution is None and e.task == "math" for e in ex)


def test_aime_is_eval_only(fixtures):
    assert [e.answer for e in load_examples("aime", "test")] == ["204", "540"]
    with pytest.raises(DataError, match="'aime' is eval-only: train on another dataset and pass --eval-dataset aime"):
        load_examples("aime", "train")
    with pytest.raises(DataError, match="'dapo-math' has no test split: pass --eval-dataset"):
        load_examples("dapo-math", "test")


def test_mbpp(fixtures):
    ex = load_examples("mbpp", "train")
    assert ex[0].prompt == ("Write a python function to find the first repeated character in a given string.\n\n"
                            "Your code should pass this test:\nassert first_repeated_char(\"abcabc\") == \"a\"\n\n"
                            "Write the Python function in a single fenced ```python code block.")
    assert ex[2].tests == ["import math\nassert math.isclose(circle_area(2), 4 * math.pi)",
                           "import math\nassert circle_area(0) == 0"]  # setup code, then each assert
    assert ex[0].tests == ['assert first_repeated_char("abcabc") == "a"', 'assert first_repeated_char("abc") == "None"',
                           'assert first_repeated_char("123123") == "1"']
    assert ex[2].solution == "```python\ndef circle_area(r):\n  return 3.141592653589793 * r * r\n```"
    assert ex[2].answer == "assert math.isclose(circle_area(2), 4 * math.pi)\nassert circle_area(0) == 0"
    assert all(e.task == "code" for e in ex)


def test_reference_solutions_verify(fixtures):
    """The mapping end to end: each fixture's own reference passes the verifier against its Example."""
    for e in load_examples("gsm8k", "train"):
        assert verify(e, f"{e.solution}\n#### {e.answer}").correct, e.answer
    assert not verify(e, f"{e.solution}\n#### 1601").correct
    for e in load_examples("math", "train") + load_examples("math", "test"):
        assert verify(e, e.solution).correct, e.answer
    for e in load_examples("mbpp", "train"):
        assert verify(e, e.solution).reward == 1.0, verify(e, e.solution).feedback
    assert verify(e, "```python\ndef circle_area(r):\n    return 0\n```").reward == 0.5


def test_unknown_name_lists_known_ones():
    with pytest.raises(DataError, match=r"unknown dataset 'gsm9k': use one of \['aime', 'dapo-math', 'gsm8k', "
                                        r"'math', 'mbpp', 'toy'\]"):
        load_examples("gsm9k")


def test_missing_field_names_dataset_row_and_field(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?"}]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"gsm8k train row 1 \(.*train.jsonl\): missing field 'answer'"):
        load_examples("gsm8k", "train")
    (tmp_path / "dapo-math").mkdir()
    row = {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}
    (tmp_path / "dapo-math" / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="dapo-math train row 0 .*missing field 'reward_model.ground_truth'"):
        load_examples("dapo-math", "train")
    with pytest.raises(DataError, match=f"{DATA_DIR_ENV}=.*: need mbpp/train.parquet, .jsonl or .json"):
        load_examples("mbpp", "train")


def test_hub_failure_offline_names_the_fix(monkeypatch):
    import datasets

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fails fast, as with no network
    with pytest.raises(DataError, match=r"cannot load 'gsm8k' \(openai/gsm8k, config main, split train\) from the "
                                        r"Hugging Face hub: .*no network.*CLEANSD_DATA_DIR.*prompt, answer"):
        load_examples("gsm8k", "train")
