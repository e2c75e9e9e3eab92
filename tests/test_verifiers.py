"""Verifiers: toy exact match, math-verify equivalence (hand-checked table), dispatch (code: tests/test_sandbox.py)."""
import threading
import time

import pytest

from common import verifiers
from common.example import Example
from common.verifiers import Verdict, math_verify, toy_verify, verify

# (gold answer, completion, expected correct), each checked by hand.
MATH_CASES = [
    # plain numbers and where the final answer is taken from
    ("72", "She sold 48 + 24 = 72 clips. \\boxed{72}", True),
    ("72", "So $\\boxed{72}$.", True),
    ("72", "The answer is 72.", True),
    ("72", "Answer: 72", True),
    ("72", "48 + 24 = 72, then 72 - 2 = 70. \\boxed{70}", False),  # right number earlier, wrong boxed
    # Two different boxed answers are a hedge (the issue's `\boxed{22} or \boxed{23}`), self-corrections included.
    ("72", "First \\boxed{72}, no wait: \\boxed{71}", False),
    ("71", "First \\boxed{72}, no wait: \\boxed{71}", False),
    ("71", "First \\boxed{72}, no wait: \\boxed{71}, so \\boxed{71}", False),
    ("71", "Not $\\boxed{72}$ but $\\boxed{71}$", True),  # a box written as rejected is no candidate
    ("12", "I think it is 12.\n\\boxed{}", False),  # empty box: no answer, not the earlier 12
    ("12", "\\boxed{120}", False),
    ("120", "\\boxed{12}", False),
    ("72", "\\boxed 72", True),
    ("72", "\\boxed{72", False),  # unclosed box
    ("72", "I don't know.", False),
    ("72", "", False),
    ("0", "\\boxed{0}", True),
    # GSM8K style
    ("18", "She makes 9 * 2 = 18 dollars.\n#### 18", True),
    ("100", "I got 100 at first.\n#### 99", False),
    ("100", "#### 100\nThat took 5 steps", True),  # only the #### line counts
    ("1000", "#### 1,000", True),
    # negative numbers
    ("-5", "\\boxed{-5}", True),
    ("5", "\\boxed{-5}", False),
    ("-5", "the answer is -5", True),
    # fractions and decimals
    ("\\frac{1}{2}", "the answer is 0.5", True),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", True),
    ("1/2", "\\boxed{\\frac{1}{2}}", True),
    ("1.5", "\\boxed{\\frac{3}{2}}", True),
    ("1.5", "\\boxed{1.50}", True),
    ("1.5", "\\boxed{15}", False),
    ("\\frac{3}{4}", "The answer is 3/4", True),
    ("\\frac{1}{3}", "\\boxed{0.333}", False),  # too coarse a decimal
    ("\\frac{1}{3}", "\\boxed{0.3333333}", True),
    # thousands separators
    ("1000", "The total is 1,000 dollars.", True),
    ("1,000", "The total is 1000.", True),
    ("1000000", "\\boxed{1{,}000{,}000}", True),
    ("1000000", "\\boxed{10^6}", True),
    # units and percentages
    ("5", "\\boxed{5 \\text{ cm}}", True),
    ("10", "\\boxed{10\\,\\mathrm{cm}}", True),
    ("10", "\\boxed{\\$10}", True),
    ("18", "She makes 18 dollars", True),
    ("6", "You can simply add 1 to 5, which results in 6.", True),  # stated as the result of 1 and 5
    ("6", "Adding 1 and 5 is equal to 6.", True),
    ("6", "The sum of 1 and 5 comes to 6.", True),
    ("7", "Adding 1 and 5 results in 6 or 7.", False),  # a hedge still scores 0
    ("25\\%", "\\boxed{25\\%}", True),
    ("25", "The answer is 25%", True),
    ("0.25", "\\boxed{25\\%}", True),
    # symbolic answers
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True),
    ("3\\sqrt{2}", "\\boxed{\\sqrt{18}}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}", True),
    ("\\pi", "\\boxed{3.14}", False),
    ("2\\pi", "\\boxed{2\\pi}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("3", "Solving, \\boxed{x = 3}", True),
    # intervals and sets
    ("[1,3)", "\\boxed{[1,3)}", True),
    ("[1,3)", "\\boxed{(1,3)}", False),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", True),
    ("\\{1,2,3\\}", "\\boxed{\\{1,2\\}}", False),
    ("2, 3", "\\boxed{3, 2}", True),
]


@pytest.mark.parametrize("gold,completion,expected", MATH_CASES)
def test_math_table(gold, completion, expected):
    v = math_verify(completion, gold)
    assert v.correct is expected, v.feedback
    assert v.reward == float(expected)
    assert v.feedback and "\n" not in v.feedback


def test_math_feedback_lines():
    assert math_verify("\\boxed{88}", "88").feedback == "final answer 88 matches"
    assert math_verify("\\boxed{87}", "88").feedback == "final answer 87 does not match"
    assert math_verify("no idea", "88").feedback == "no final answer found"


def test_math_from_non_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append((math_verify("\\boxed{\\frac{1}{2}}", "0.5"),
                                                    math_verify("\\boxed{3}", "4"))))
    t.start()
    t.join(60)
    assert [v.correct for v in out[0]] == [True, False]


@pytest.mark.parametrize("in_thread", [False, True])
def test_math_pathological_input_times_out_and_recovers(in_thread):
    out = []

    def call():  # a symbolic gold: against a number the unevaluated power is refused before sympy runs
        out.append(math_verify("\\boxed{9^{9^{9^{9}}}}", "\\sqrt{2}", timeout_s=1))

    start = time.monotonic()
    if in_thread:
        t = threading.Thread(target=call)
        t.start()
        t.join(30)
    else:
        call()
    assert time.monotonic() - start < 10
    assert out[0] == Verdict(0.0, False, "verifier timed out")
    assert math_verify("\\boxed{72}", "72").correct  # the worker still (or again) answers
    v = math_verify("\\boxed{9^{9^{9^{9}}}}", "72", timeout_s=1)
    assert v.feedback.endswith("is not a number (an expression left unevaluated?)")


def test_math_worker_is_restarted_after_dying():
    assert math_verify("\\boxed{2}", "2").correct
    worker = verifiers._MATH_WORKER.proc
    worker.kill()
    worker.wait()
    assert math_verify("\\boxed{2}", "2").correct


def test_math_unparseable_gold_is_an_error_verdict():
    v = math_verify("\\boxed{1}", "")
    assert v.reward == 0.0 and v.feedback.startswith("verifier error")


@pytest.mark.parametrize("completion,answer,expected,feedback", [
    ("3 + 4 = 7\nAnswer: 7", "7", True, "final answer 7 matches"),
    ("Answer: 5\nlet me recheck\nAnswer: 7", "7", True, "final answer 7 matches"),  # the last Answer: wins
    ("Answer: 7\nAnswer: 5", "7", False, "final answer 5 does not match"),
    ("Answer:    7   \n\nmore text", "7", True, "final answer 7 matches"),  # stripped, first line
    ("Answer: 7 apples", "7", False, "final answer 7 apples does not match"),
    ("The result is 7", "7", False, "no final answer found"),
    ("Answer:   ", "7", False, "no final answer found"),
    ("", "7", False, "no final answer found"),
    ("answer: 7", "7", False, "no final answer found"),  # case matters
])
def test_toy(completion, answer, expected, feedback):
    assert toy_verify(completion, answer) == Verdict(float(expected), expected, feedback)


def test_verify_dispatch():
    assert verify(Example(prompt="p", answer="7", task="toy"), "Answer: 7").correct
    assert verify(Example(prompt="p", answer="\\frac{1}{2}", task="math"), "\\boxed{0.5}").correct
    code = Example(prompt="p", answer="double", task="code", tests=["assert f(2) == 4", "assert f(0) == 1"])
    v = verify(code, "```python\ndef f(x):\n    return 2 * x\n```")
    assert v.reward == 0.5 and not v.correct and "first failure: AssertionError: assert f(0) == 1" in v.feedback
    with pytest.raises(ValueError, match="unknown task"):
        verify(Example(prompt="p", answer="7", task="chess"), "Answer: 7")

