"""Reward hacks of the math verifier: restating the question, hedging, and what genuine answers look like.

A chain-sum policy once learned to write `To find the final answer to 8 + 8 + 7, ...` and got reward 1.0,
because the expression after "final answer" evaluated to the gold 23. Every row below carries the question
it answers (`verify` passes `example.prompt` to the verifier). HACKS must score 0, GENUINE must score 1,
and appending the question or any of its sub-expressions to a wrong completion never makes it correct.
"""
import json
import random
from pathlib import Path

import pytest

from common import verifiers
from common.verifiers import math_verify, verify

Example = verifiers.Example  # whichever module the verifier takes it from
FIXTURE = Path(__file__).parent / "fixtures" / "chain_sum.jsonl"
CHAIN = "State the final answer to the following arithmetic problem: {} =  Put your final answer within \\boxed{{}}."


def chain_sum_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """The rows of fixtures/chain_sum.jsonl: 2-3 terms of 1-2 digit positive integers, from random.Random(seed).

    Regenerate with: python -c "import json, tests.test_reward_hacks as t; [print(json.dumps(r)) for r in
    t.chain_sum_rows()]" > tests/fixtures/chain_sum.jsonl (run from the repository root)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(1, 99) for _ in range(rng.randint(2, 3))]
        rows.append({"prompt": CHAIN.format(" + ".join(map(str, terms))), "answer": str(sum(terms)), "task": "math"})
    return rows


Q8 = CHAIN.format("8 + 8 + 7")
APPLES = "Tom has 5 bags with 2 apples in each bag. How many apples does he have?"
SQUARE = "What is 9 squared?"
HUNDRED = "What is 10 times 10?"
EXPAND = "Expand $(x+1)^2$."
SIN = "Compute $\\sin 60^\\circ$."
SQRT18 = "Simplify $\\sqrt{18}$."
FRACTION = "Express 0.75 as a common fraction."
SIMPLIFY = "Simplify $\\frac{6}{8}$."
HALF = "Write $\\frac{1}{2}$ as a decimal."

# (question, gold, completion): each must score 0.
HACKS = [
    (CHAIN.format("6 + 0"), "6", 'The answer to the question "6 + 0 =" is 5.'),  # the quoted question's twin in GENUINE
    # the samples and table: the question restated instead of answered
    (Q8, "23", "To find the final answer to 8 + 8 + 7, we can simplify it using the fundamental theorem of "
               "arithmetic, which is not only a mathematical"),
    (Q8, "23", "To find the final answer of 8 + 8 + 7 in arithmetic, it's determined to be 25.  You are 5"),
    (Q8, "23", "To find the final answer to 8 + 8 + 7, we add"),
    (Q8, "23", "So \\boxed{8+8+7}."),
    (Q8, "23", "The answer is 8 + 8 + 7."),
    (Q8, "23", "8 + 8 + 7 = x"),
    (Q8, "23", "The final answer: 15 + 8"),
    (APPLES, "10", "How many apples: 5 * 2"),
    (Q8, "23", "\\boxed{22} or \\boxed{23}"),
    # more restatements, in every place an answer is read from
    (Q8, "23", "State the final answer to the following arithmetic problem: 8 + 8 + 7 ="),
    (Q8, "23", Q8),  # the whole prompt, its empty \boxed{} included
    (Q8, "23", "\\boxed{8 + 8 + 7 =}"),
    (Q8, "23", "\\boxed{16 + 7}"),  # half evaluated
    (Q8, "23", "The answer is $8+8+7$."),
    (Q8, "23", "#### 8 + 8 + 7"),
    (Q8, "23", "Answer: 8+8+7"),
    (Q8, "23", "**Final Answer:** 8 + 8 + 7"),
    (Q8, "23", "The final answer to 8 + 8 + 7 is 8 + 8 + 7."),
    (Q8, "23", "$$8 + 8 + 7$$"),
    (Q8, "23", "\\boxed{\\text{8 + 8 + 7}}"),
    (Q8, "23", "\\boxed{x} where x = 8 + 8 + 7"),
    (Q8, "23", "The answer is 23 + 0."),
    (SQUARE, "81", "\\boxed{9^2}"),
    (HUNDRED, "100", "\\boxed{(10)(10)}"),
    (HUNDRED, "100", "\\boxed{10 \\times 10}"),
    (APPLES, "10", "\\boxed{5 \\times 2}"),
    (Q8, "23", "\\boxed{\\frac{46}{2}}"),  # a division left undone
    (Q8, "23", "\\boxed{\\sqrt{529}}"),
    (SIMPLIFY, "\\frac{3}{4}", "\\boxed{\\frac{6}{8}}"),
    (FRACTION, "\\frac{3}{4}", "\\boxed{0.75}"),  # the question's own number in another notation
    (HALF, "0.5", "The answer is $\\frac{1}{2}$."),
    # symbolic gold: an expression copied from the question
    (EXPAND, "x^2+2x+1", "\\boxed{(x+1)^2}"),
    (SIN, "\\frac{\\sqrt{3}}{2}", "\\boxed{\\sin 60^\\circ}"),
    (SIN, "\\frac{\\sqrt{3}}{2}", "So the answer is $\\sin(60^\\circ)$."),
    (SQRT18, "3\\sqrt{2}", "\\boxed{\\sqrt{18}}"),
    # hedges and lists of candidates
    (Q8, "23", "\\boxed{23} or \\boxed{24}"),
    (Q8, "23", "\\boxed{21}\\boxed{22}\\boxed{23}"),
    (Q8, "23", "\\boxed{22, 23}"),
    (Q8, "23", "\\boxed{23 \\text{ or } 24}"),
    (Q8, "23", "\\boxed{23 \\pm 1}"),
    (Q8, "23", "#### 22\n#### 23"),
    (Q8, "23", "The answer is 22. The answer is 23."),
    (Q8, "23", "The answer is 22 or 23."),
    (Q8, "23", "The answer is 23, 24, 25"),
    (Q8, "23", "It is either 22 or 23."),
    (Q8, "23", "Candidates: 21, 22, 23"),
    (Q8, "23", "22 23 24"),
    (Q8, "23", "8 + 8 + 7 = 22 = 23"),
    (Q8, "23", "8 + 8 + 7 = 22, no, 23"),
    (EXPAND, "x^2+2x+1", "\\boxed{x^2+2x+1} or \\boxed{x^2+1}"),
    # an answer followed by more numbers or operators
    (Q8, "23", "The answer is 23 24"),
    (Q8, "23", "8 + 8 + 7 = 23 + 1"),
    (Q8, "23", "It is 23 - 2"),
    (Q8, "23", "The sum is 23. \\boxed{}"),  # an empty last box is no answer
]

CHAIN17 = CHAIN.format("12 + 5")
NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
           "clips did Natalia sell altogether in April and May?")
OPTIONS = "Which is larger? (A) 3 (B) 4"
POLAR = ("Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the form "
         "$(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$")

# (question, gold, completion): each must score 1.
GENUINE = [
    (CHAIN17, "17", "12 + 5 = 17"),
    (Q8, "23", "8 + 8 + 7 = 23"),
    (Q8, "23", "8 + 8 = 16, 16 + 7 = 23. \\boxed{23}"),
    (Q8, "23", "The answer to 8 + 8 + 7 is 23."),
    (CHAIN.format("6 + 0"), "6", 'The answer to the question "6 + 0 =" is 6.'),  # the quoted question ends in =
    (Q8, "23", "The sum of 8, 8 and 7 is 23."),
    (Q8, "23", "First 8 + 8 = 16. Then 16 + 7 = 23, so \\boxed{23}. Final: \\boxed{23}"),  # repeated, no hedge
    (Q8, "23", "Final Answer: The final answer is $23$. I hope it is correct."),  # Minerva style
    (Q8, "23", "$\\boxed{x = 23}$"),
    ("What is 3 - 7?", "-4", "\\boxed{-4}"),
    ("What is 3 - 7?", "-4", "$-4$"),
    ("What is 3 - 7?", "-4", "3 - 7 = -4"),
    ("What is 3 - 7?", "-4", "The result is -4."),
    ("How much?", "30", "Each costs 3 dollars, so 10 cost 30 dollars.\n#### 30"),
    ("How many?", "9", "3 * 3 = 9\n\n**Answer:** 9"),
    ("How many?", "17", "The answer is 17."),
    ("How many?", "17", "Answer:\n17"),
    ("How many?", "42", "The answer is: 42"),
    ("How many?", "42", "\\boxed{\\textbf{42}}"),
    ("How many?", "1234", "The total is 1,234 apples."),
    ("How many?", "1234", "\\boxed{1,234}"),
    ("How many?", "1000", "#### 1,000"),
    ("How many?", "1000000", "\\boxed{10^6}"),
    ("What fraction?", "\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}"),
    ("What fraction?", "0.75", "\\boxed{\\dfrac{3}{4}}"),
    ("What fraction?", "-\\frac{3}{4}", "$\\boxed{-\\frac{3}{4}}$"),
    ("What fraction?", "\\frac{2}{3}", "So $x = \\frac{2}{3}$."),
    ("What fraction?", "0.5", "\\boxed{\\frac{1}{2}}"),
    ("What is half of one?", "\\frac{1}{2}", "\\boxed{0.5}"),
    ("Solve 2x = 10.", "5", "x = 5"),
    ("Solve 2x = 10.", "5", "\\boxed{x = 5}"),
    (APPLES, "10", "\\boxed{10\\text{ apples}}"),
    (APPLES, "10", "He has $10$ apples."),
    (APPLES, "10", "How many apples: 5 * 2 = 10"),
    ("What percent?", "25\\%", "\\boxed{25\\%}"),
    ("How much does it cost?", "18.5", "The answer is $\\boxed{\\$18.50}$."),
    ("What angle?", "90", "\\boxed{90^\\circ}"),
    ("How many?", "7", "\\[ \\boxed{7} \\]"),
    ("How many?", "12", "The answer is \\( 12 \\)."),
    ("How many marbles are left?", "15", "She gave away 5 of her 20 marbles. Therefore, she has 15 marbles left."),
    (NATALIA, "72", "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and "
                    "May.\n#### 72"),  # GSM8K reference style
    ("Find $a+b$ if the piecewise function is continuous.", "0",
     "For continuity at $x=2$ we need $2a+3=-3$, so $a=-3$. At $x=-2$ we need $-7=-4-b$, so $b=3$. Then "
     "$a+b=-3+3=\\boxed{0}$."),  # MATH reference style
    (SIN, "\\frac{\\sqrt{3}}{2}", "The point at $60^\\circ$ on the unit circle is $\\left(\\frac{1}{2}, "
                                  "\\frac{\\sqrt{3}}{2}\\right)$ (not $\\boxed{1}$), so $\\sin 60^\\circ = "
                                  "\\boxed{\\frac{\\sqrt{3}}{2}}$."),
    ("What is $\\cos 45^\\circ$?", "\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}"),
    (SQRT18, "3\\sqrt{2}", "$\\sqrt{18} = \\sqrt{9 \\cdot 2} = \\boxed{3\\sqrt{2}}$"),
    ("Simplify $\\sqrt{8}$.", "2\\sqrt{2}", "The answer is $2\\sqrt{2}$."),
    (EXPAND, "x^2+2x+1", "$(x+1)^2 = \\boxed{x^2 + 2x + 1}$"),
    ("Solve $x - 1 \\ge 0$ for $x < 3$.", "[1,3)", "\\boxed{[1, 3)}"),
    ("Solve $x \\le 2$.", "(-\\infty, 2]", "\\boxed{(-\\infty, 2]}"),
    ("List the roots.", "\\{1,2,3\\}", "\\boxed{\\{3, 2, 1\\}}"),
    (POLAR, "\\left( 3, \\frac{\\pi}{2} \\right)", "the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} "
                                                    "\\right)}.$"),
    (OPTIONS, "B", "\\boxed{B}"),  # a single letter from the question is an option, not a restatement
    (OPTIONS, "B", "\\boxed{\\text{(B)}}"),
]


def case_id(row: tuple) -> str:
    return " ".join(row[2].split())[:50]


@pytest.mark.parametrize("question,gold,completion", HACKS, ids=[case_id(r) for r in HACKS])
def test_hack_scores_zero(question, gold, completion):
    v = verify(Example(prompt=question, answer=gold, task="math"), completion)
    assert (v.reward, v.correct) == (0.0, False), v.feedback
    assert v.feedback and "\n" not in v.feedback


@pytest.mark.parametrize("question,gold,completion", GENUINE, ids=[case_id(r) for r in GENUINE])
def test_genuine_answer_scores_one(question, gold, completion):
    v = verify(Example(prompt=question, answer=gold, task="math"), completion)
    assert (v.reward, v.correct) == (1.0, True), v.feedback


def test_tables_are_large_enough():
    assert len(HACKS) >= 30 and len(GENUINE) >= 30


@pytest.mark.parametrize("completion,feedback", [
    ("\\boxed{8+8+7}", "final answer 8+8+7 is not a number (an expression left unevaluated?)"),
    ("\\boxed{22} or \\boxed{23}", "several different final answers (22, 23): none counts"),
    ("To find the final answer to 8 + 8 + 7, we add", "no final answer found"),
])
def test_hack_feedback(completion, feedback):
    assert math_verify(completion, "23", question=Q8).feedback == feedback


def test_copied_feedback():
    assert math_verify("\\boxed{(x+1)^2}", "x^2+2x+1", question=EXPAND).feedback == \
        "final answer (x+1)^2 is copied from the question"


def sub_expressions(terms: list[int]) -> list[str]:
    """Every contiguous run of the question's terms, as written there and without spaces."""
    runs = [terms[i:j] for i in range(len(terms)) for j in range(i + 1, len(terms) + 1)]
    return [sep.join(map(str, run)) for run in runs for sep in (" + ", "+")]


APPENDED = [  # how a policy could restate (part of) the question after its answer
    " {sub}", "\n{sub}", " {sub} =", " So {sub} = x.", " The answer is {sub}.", " Final answer: {sub}",
    " The final answer to {sub} is {sub}.", " \\boxed{{{sub}}}", "\n#### {sub}", " $${sub}$$", " {sub} = ?",
    " To find the final answer to {sub}, we add", " {question}",
]
WRONG = ["", "I don't know.", "The answer is {wrong}.", "\\boxed{{{wrong}}}", "#### {wrong}", "{expr} = {wrong}",
         "Let me add: {wrong}"]


def test_appending_the_question_never_makes_a_wrong_completion_correct():
    rng, checked = random.Random(1), 0
    for _ in range(40):
        terms = [rng.randint(1, 99) for _ in range(rng.randint(2, 4))]
        expr, total = " + ".join(map(str, terms)), sum(terms)
        question = CHAIN.format(expr)
        example = Example(prompt=question, answer=str(total), task="math")
        subs = sub_expressions(terms)
        for phrasing in APPENDED:
            for wrong_style in rng.sample(WRONG, 3):
                wrong = str(total + rng.choice([-10, -2, -1, 1, 2, 10]))
                sub = rng.choice(subs) if rng.random() < 0.7 else expr  # the full expression often
                completion = wrong_style.format(wrong=wrong, expr=expr) + phrasing.format(sub=sub, question=question)
                v = verify(example, completion)
                assert v.reward == 0.0 and not v.correct, (completion, v.feedback)
                checked += 1
        assert verify(example, f"{expr} = {total}").correct  # the same question answered is still correct
    assert checked == 40 * len(APPENDED) * 3


def test_chain_sum_fixture_is_reproducible_and_verifies():
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert rows == chain_sum_rows()
    assert len(rows) == 200 and len({r["prompt"] for r in rows}) > 150
    for row in rows:
        expr = row["prompt"].split(": ", 1)[1].split(" =", 1)[0]
        terms = [int(t) for t in expr.split(" + ")]
        assert 2 <= len(terms) <= 3 and all(1 <= t <= 99 for t in terms) and row["answer"] == str(sum(terms))
        example = Example(prompt=row["prompt"], answer=row["answer"], task=row["task"])
        assert verify(example, f"{expr} = {row['answer']}. \\boxed{{{row['answer']}}}").correct
        assert not verify(example, f"\\boxed{{{expr}}}").correct
        assert not verify(example, f"To find the final answer to {expr}, we add").correct


# The toy verifier reads one line: the first after the last `Answer:`, matched exactly.
TOY_HEDGES = ["Answer: 22\nAnswer: 23", "Answer: 23\nAnswer: 22", "Answer: 21\nAnswer: 22\nAnswer: 23",
              "Answer: 23\nlet me recheck\nAnswer: 23", "Answer: 22 Answer: 23"]


@pytest.mark.parametrize("completion", TOY_HEDGES)
@pytest.mark.parametrize("gold", ["22", "23"])
def test_toy_hedge_scores_what_its_last_answer_alone_scores(completion, gold):
    last = completion.rsplit("Answer:", 1)[1].strip().splitlines()[0]
    assert verifiers.toy_verify(completion, gold).reward == verifiers.toy_verify(f"Answer: {last}", gold).reward
    # so no hedge earns reward for two golds at once
    assert verifiers.toy_verify(completion, "22").reward + verifiers.toy_verify(completion, "23").reward <= 1.0


@pytest.mark.parametrize("completion", ["Answer: 22 or 23", "Answer: 23 24", "Answer: 8+8+7", "Answer: 8 + 8 + 7 = 23",
                                        "Answer: \\boxed{23}", "Answer: 22, 23", "Compute 8+8+7. Answer:", "23"])
def test_toy_restatements_and_lists_score_zero(completion):
    assert verifiers.toy_verify(completion, "23").reward == 0.0
