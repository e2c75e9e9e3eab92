"""Verifiers: a reward and a one-line feedback for a completion of a toy, math, reasoning-gym or code task.

Toy: exact string match of the first line after the last `Answer:` (see `toy_verify`). Math:
extraction and a value rule of our own, then Hugging Face's `math-verify` for equivalence, run in a
long-lived worker process (its main thread, so SIGALRM timeouts work whatever thread calls us; a hung
worker is killed and restarted). Reasoning-gym (`rg_verify`): the same extraction and value rule, then the
task's own checker, in the same worker. Code: the last fenced Python block runs against assert tests in a
sandboxed `python -I -S -B` subprocess (`common.sandbox`, whose docstring says what is and is not isolated).

The math rule (`math_verify`): an answer is a value, not a restated computation.

* Where it is read: the last `\\boxed{}`, else the `####` line, else an explicit "the answer is X" /
  "Answer: X" / "the answer to ... is X" statement ("final answer to 8 + 8 + 7" introduces the question
  and is no answer), else the completion's last value if it is stated as a result (not an operand of
  `+ - * /`, not in a hedging sentence, not one of a list). Several different answers where one is
  read (two boxes, two `####` lines, two statements) are a hedge and score 0; the same answer repeated
  is fine, and a box written as rejected ("not $\\boxed{1}$") is no candidate.
* Gold a number (integer, decimal, fraction, percentage, scientific notation): the prediction must be a
  numeric literal (`17`, `-4`, `1,234`, `\\frac{3}{4}` in lowest terms, `25\\%`, `10^6`, optionally with
  `$`, units, a currency sign or an `x =` in front), never an expression that evaluates to the gold
  (`8+8+7`, `5*2`, `9^2`, `(10)(10)`, `\\frac{46}{2}`, `\\sqrt{529}`); and a number copied from the
  question in another notation than the gold's ("Express 0.75 as a fraction": `0.75`) does not count.
* Gold symbolic (radicals, pi, intervals, sets, tuples, polynomials): math-verify's equivalence, but an
  expression copied from the question (`(x+1)^2` for "Expand $(x+1)^2$") is never an answer; single
  letters and plain numbers are exempt (multiple-choice options).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from common.data import Example
from common.example import Verdict, one_line
from common.sandbox import code_verify, extract_code  # noqa: F401  (extract_code: re-exported)

ROOT = Path(__file__).resolve().parent.parent


def verify(example: Example, completion: str) -> Verdict:
    """Score `completion` with the verifier of `example.task`."""
    if example.task == "toy":
        return toy_verify(completion, example.answer)
    if example.task == "math":
        return math_verify(completion, example.answer, question=example.prompt)
    if example.task == "code":
        return code_verify(completion, example.tests or [])
    if example.task == "rg":
        return rg_verify(completion, example.meta["rg"])
    raise ValueError(f"unknown task {example.task!r}: expected toy, math, code or rg")


def _answer_verdict(ok: bool, shown: str) -> Verdict:
    """The toy/math verdict for an extracted final answer."""
    return Verdict(float(ok), ok, f"final answer {one_line(shown)} {'matches' if ok else 'does not match'}")


# ----------------------------------------------------------------------------------------------- toy


def toy_verify(completion: str, answer: str) -> Verdict:
    """Exact match of the first line of the text after the last `Answer:` (case-sensitive, stripped).

    Only that line is read: earlier `Answer:` lines neither help nor hurt, so writing several answers
    (a hedge) scores exactly what committing to the last one alone scores, never more; a line holding
    several values (`22 or 23`), an expression (`8+8+7`) or anything besides the answer fails the exact
    match. This is also what `common.toy.extract_answer` reads."""
    tail = completion.rsplit("Answer:", 1)[1].strip() if "Answer:" in completion else ""
    got = tail.splitlines()[0].strip() if tail else ""
    if not got:
        return Verdict(0.0, False, "no final answer found")
    return _answer_verdict(got == answer.strip(), got)


# ---------------------------------------------------------------------------------------------- math

MATH_WORKER_MEMORY = 4 << 30
"""Address-space cap of the math worker (sympy can build huge integers before a timeout fires)."""
MATH_GRACE_S = 2.0
"""Extra seconds the parent waits beyond the worker's own alarm before killing it (C code ignores alarms)."""
MATH_START_TIMEOUT_S = 120.0


class _Deadline(BaseException):
    """Raised by SIGALRM in the worker; a BaseException so math-verify's `except Exception` can't eat it."""


# Extraction and the value rule (pure Python: run in the worker, under its alarm, like math-verify).

_BOX_START = re.compile(r"\\(?:boxed|fbox)\b\s*")
_NEGATION = re.compile(r"(?:\bnot|n't|\binstead of|\brather than|\\neq?|≠)[\s$(\[]*$", re.IGNORECASE)
_CUE = re.compile(  # "answer is/was/:/=", or "answer to <the question> is": never "answer to" alone
    r"\banswer\b(?:\s*(?::|=|\bis\b|\bwas\b|\bwould be\b|\bwill be\b|\bshould be\b)"
    r"|\s+(?:to|of|for)\b[^\n.:,;=]{0,120}?(?:\s(?:is|was)\b|\s*=))\s*:?", re.IGNORECASE)
_CUT = re.compile(r"[.!?](?=\s|$)|;|,\s+(?=[A-Za-z]{2})|\s(?:because|since|which|so|but)\b", re.IGNORECASE)
_HEDGE_WORDS = re.compile(r"\b(?:or|either|maybe|perhaps|possibly|probably|might|could)\b", re.IGNORECASE)
_RESULT_WORD = re.compile(
    r"(?:\b(?:is|are|was|were|be|equals?|makes?|gives?|gets?|got|totals?|yields?|becomes?|results? in|equal to"
    r"|comes? to|amounts? to|sums? to|adds? up to)|:)\s*$", re.IGNORECASE)
_OPERATOR_AFTER = re.compile(r"[-+*/^=×÷<>]|\\(?:cdot|times|div|pm)\b|\d")
_OPERATOR_BEFORE = re.compile(r"(?:[-+*/^×÷({\[]|\\(?:cdot|times|div|pm|frac|sqrt))$")
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER_TOKEN = re.compile(r"(?<![\w.\\])-?(?:\\[dt]?frac\{\d+\}\{\d+\}|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
                           r"|\.\d+)(?:\s*\\?%)?(?!\w)")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
                      r"\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:displaystyle|left|right|quad|qquad|[,;:! ])|~")
_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_FRACTION = re.compile(r"\\[dt]?frac\s*(?:\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d)\s*(\d))|(\d+)\s*/\s*(\d+)")
_SCIENTIFIC = re.compile(rf"(?:({_DEC})\s*(?:\\times|\\cdot|×|\*|x)\s*)?10\s*\^\s*\{{?\s*([+-]?\d{{1,3}})\s*\}}?"
                         rf"|({_DEC})[eE]([+-]?\d{{1,3}})")
_NOT_UNITS = {"or", "and", "to", "plus", "minus", "times", "over", "divided", "by", "not", "nor", "than", "more",
              "less", "about", "approximately", "maybe", "perhaps", "then", "is", "equals"}


@dataclass(frozen=True)
class _Literal:
    """A number written as a value: its exact value, notation and a LaTeX form math-verify reads."""

    value: Fraction
    kind: str
    """`dec` (integer or decimal), `frac`, `sci` (10^n, a x 10^n, aeN) or `pct`."""
    latex: str


def _clean(text: str, lines: bool = False) -> str:
    """`text` without math delimiters, spacing commands, text/font wrappers (kept: their content) or markdown.

    Whitespace is collapsed (within each line if `lines`, which also keeps trailing punctuation)."""
    text = text.replace("−", "-").replace("\\$", " ").replace("$", " ")
    text = re.sub(r"\\[()\[\]]", " ", text)
    text = re.sub(r"(?<=\d)\\,(?=\d{3})", "", text).replace("{,}", ",")
    for _ in range(3):  # nested wrappers, innermost first
        text = _WRAPPER.sub(lambda m: f" {m[1]} ", text)
    text = _SPACING.sub(" ", text)
    text = re.sub(r"\*\*|__|`", "", text)
    if lines:
        return "\n".join(" ".join(line.split()) for line in text.split("\n"))
    return " ".join(text.split()).rstrip(" .,;:!?").lstrip(" :")


def _has_prose(text: str) -> bool:
    """Whether `text` holds a word (two or more letters that are not a LaTeX command)."""
    return re.search(r"(?<![\\A-Za-z])[A-Za-z]{2,}", text) is not None


def _literal(text: str, strict: bool) -> _Literal | None:
    """`text` as a numeric literal, or None if it is anything else (an expression, a list, words).

    Accepted, around an optional sign: an integer or decimal (`1,234` separators allowed), a fraction
    of integers (`\\frac{3}{4}`, `\\dfrac34`, `3/4`), scientific notation (`10^6`, `2 \\times 10^{3}`,
    `1e6`), each with an optional `%`, degree sign, currency sign or trailing unit words (`5 apples`).
    `strict` (predictions): a fraction must be in lowest terms with a denominator above 1 (`\\frac{46}{2}`
    is a division left undone)."""
    s = _clean(text)
    s = re.sub(r"^(?:€|£|¥|\\pounds|\\euro)\s*", "", s)
    for _ in range(4):  # unit words: "5 apples", "10 cm^2"
        m = re.search(r"\s([A-Za-z]+)\.?(?:\s*\^\s*\{?\d\}?)?$", s)
        if not m or m[1].lower() in _NOT_UNITS:
            break
        s = s[:m.start()].rstrip()
    s = re.sub(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)$", "", s)
    percent = re.search(r"\s*\\?%$", s)
    s = s[:percent.start()] if percent else s
    sign, body = re.fullmatch(r"([+-]?)\s*(.*)", s, re.DOTALL).groups()
    negative = sign == "-"
    if re.fullmatch(_DEC, body):
        value, kind, latex = Fraction(body.replace(",", "")), "dec", body.replace(",", "")
    elif m := _FRACTION.fullmatch(body):
        num, den = (m[1], m[2]) if m[1] else (m[3], m[4]) if m[3] else (m[5], m[6])
        num, den = int(num), int(den)
        if den == 0 or strict and (den == 1 or math.gcd(num, den) != 1):
            return None
        value, kind, latex = Fraction(num, den), "frac", f"\\frac{{{num}}}{{{den}}}"
    elif m := _SCIENTIFIC.fullmatch(body):
        mantissa, exponent = (m[1] or "1", m[2]) if m[2] else (m[3], m[4])
        value = Fraction(mantissa.replace(",", "")) * Fraction(10) ** int(exponent)
        kind, latex = "sci", f"{mantissa.replace(',', '')}\\times10^{{{int(exponent)}}}"
    else:
        return None
    if negative:
        value, latex = -value, "-" + latex
    if percent:
        kind, latex = "pct", latex + "\\%"
    return _Literal(value, kind, latex)


def _bad_lhs(lhs: str) -> bool:
    """Whether the left side of `lhs = value` makes it no answer: empty, a value itself ("22 = 23"), or a
    value followed by prose ("22 because 8 + 8 + 7 = 23")."""
    lhs = lhs.strip()
    return not lhs or _literal(lhs, strict=False) is not None or bool(re.match(r"[-+]?\d", lhs)) and _has_prose(lhs)


def _rhs(text: str) -> str | None:
    """The value side of `x = 5` / `8 + 8 + 7 = 23` (the text itself if it has no `=`); None for a bad chain."""
    parts = re.split(r"(?<![<>!=\\])=(?!=)", text)
    if len(parts) > 1 and any(_bad_lhs(p) for p in parts[:-1]):
        return None
    return parts[-1].strip()


def _norm_expr(text: str) -> str:
    """A comparison form of an expression: no spacing, delimiters, grouping or `\\dfrac`/`\\cdot` variants."""
    text = _clean(text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\cdot|\\times|×", "*", text)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "°", text)
    text = re.sub(r"\s*([^\w\s])\s*", r"\1", re.sub(r"[{}()]", " ", text))  # spaces only between words
    return re.sub(r"(\\[A-Za-z]+) (?=\w)", r"\1", " ".join(text.split())).strip()


def _answer_key(text: str) -> tuple:
    """What two final answers must share to count as the same answer (hedge detection)."""
    rhs = _rhs(_clean(text))
    lit = _literal(rhs, strict=False) if rhs else None
    return ("value", lit.value, lit.kind == "pct") if lit else ("text", _norm_expr(text))


def _copied_expression(pred: str, question: str) -> bool:
    """Whether `pred` (not a bare number or a single symbol) appears in the question as written."""
    p, q = _norm_expr(pred), _norm_expr(question)
    if not p or re.fullmatch(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)|\\?[A-Za-z]+|\\text[A-Za-z]", p):
        return False
    before = r"(?<![A-Za-z0-9])" if p[0].isalnum() else ""
    after = r"(?![A-Za-z0-9])" if p[-1].isalnum() else ""
    return re.search(before + re.escape(p) + after, q) is not None


def _question_values(question: str) -> set[tuple[str, Fraction]]:
    """(notation, value) of every number written in the question."""
    text, found = _clean(question), set()
    for m in re.finditer(r"\\[dt]?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\}|(?<![\d.])\d+\s*/\s*\d+(?![\d.])"
                         rf"|(?<![\d.])10\s*\^\s*\{{?\d{{1,3}}\}}?|(?<![\d.])(?:{_DEC})(?:\s*\\?%)?", text):
        lit = _literal(m[0], strict=False)
        if lit:
            found.add((lit.kind, lit.value))
    return found


def _boxes(text: str) -> list[tuple[int, str | None]]:
    """(start, content) of each outermost `\\boxed{...}`/`\\fbox{...}` (or `\\boxed 72`); None if unclosed/empty."""
    found, end = [], -1
    for m in _BOX_START.finditer(text):
        if m.start() < end:
            continue  # inside the previous box
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j, content = 1, i + 1, None
            while j < len(text):
                if text[j] == "\\":
                    j += 2  # \{ and \} are literal braces (a set), not grouping
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    content, end = text[i + 1:j].strip(), j + 1
                    break
                j += 1
            else:
                end = len(text)
        else:
            token = re.match(r"[^\s$\\{}]+", text[i:])
            content, end = (token[0], i + token.end()) if token else (None, i)
        while content and (inner := re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", content, re.DOTALL)):
            content = inner[1].strip()
        found.append((m.start(), content or None))
    return found


def _cut(text: str) -> str:
    """`text` up to the end of its first sentence or clause."""
    m = _CUT.search(text)
    return (text[:m.start()] if m else text).strip()


def _statements(text: str) -> list[str]:
    """The answers of explicit statements ("the answer is 17", "**Answer:** 9", "answer to 2+2 is 4")."""
    cues, found = list(_CUE.finditer(text)), []
    for k, cue in enumerate(cues):
        stop = cues[k + 1].start() if k + 1 < len(cues) else len(text)
        pos = cue.end() + len(re.match(r"\s*", text[cue.end():])[0])  # "Answer:\n17": the next line
        answer = _cut(text[pos:].split("\n", 1)[0])
        if not answer or pos + len(answer) > stop:
            continue  # "Final Answer: The final answer is 5": the inner statement counts
        if re.match(r"\s*[\"'”’)\]]*\s*[A-Za-z]{2,}", _clean(answer)):
            continue  # prose, "not 22", "below", '" is 6' after 'answer to "6 + 0 ="': not a value
        found.append(answer)
    return found


def _sentence(text: str, start: int, end: int) -> tuple[int, int]:
    """Bounds of the sentence (or line) holding text[start:end]."""
    left = max([m.end() for m in re.finditer(r"[.!?](?=\s)|\n", text[:start])], default=0)
    right = re.search(r"[.!?](?=\s|$)|\n", text[end:])
    return left, end + right.start() if right else len(text)


def _fallback(text: str) -> str | None:
    """Without a box, `####` or answer statement: the completion's last value, if it is stated as a result.

    That is its last math segment (`$...$`) if no digit follows it, else its last number; neither counts
    if it is an operand (an operator right before or after it: `8 + 8 + 7`, `5 * 2`, `8 + 8 + 7 = x`), if
    its sentence hedges (or, maybe, perhaps, ...), or if its sentence holds other numbers and it is not
    introduced as their result (`= 17` after a non-number, `is 23`, `: 23`): `22, 23` and `22 23` are lists."""
    text = re.sub(r"\*\*|__", "", text)
    segments = [m for m in _MATH_SEGMENT.finditer(text) if next(g for g in m.groups() if g is not None).strip()]
    if segments and not re.search(r"[\d$]", text[segments[-1].end():]):
        seg = segments[-1]
        value = next(g for g in seg.groups() if g is not None).strip()
        start, end = _sentence(text, seg.start(), seg.end())
        before, after = text[start:seg.start()].rstrip(), text[seg.end():end]
    else:
        text = _clean(text, lines=True)
        numbers = list(_NUMBER_TOKEN.finditer(text))
        if not numbers:
            return None
        seg = numbers[-1]
        value, (start, end) = seg[0], _sentence(text, seg.start(), seg.end())
        before, after = text[start:seg.start()].rstrip(), text[seg.end():end]
        if value.startswith("-") and re.search(r"[\d)\]}]$", before):
            return None  # "12 -4": a subtraction
    if _OPERATOR_AFTER.search(after) or _HEDGE_WORDS.search(text[start:end]) or _OPERATOR_BEFORE.search(before):
        return None
    if before.endswith("="):
        return None if _bad_lhs(_clean(before[:-1].rsplit("=", 1)[-1])) else value
    if re.search(r"\d", before) and "=" not in value and not _RESULT_WORD.search(before):
        return None  # "22 23", "22, 23": a list, not a result
    return value


def _extract(completion: str) -> tuple[str | None, str]:
    """(the final answer's text, "") or (None, why there is none)."""
    boxes = _boxes(completion)
    if boxes:
        if boxes[-1][1] is None:  # an empty or unclosed last box is no answer, not a cue to use an earlier one
            return None, "no final answer found"
        candidates = [c for s, c in boxes if c is not None and not _NEGATION.search(completion[max(0, s - 40):s])]
    elif "####" in completion:
        candidates = [a for a in (_cut(m[1]) for m in re.finditer(r"####([^\n]*)", completion)) if a]
    else:
        candidates = _statements(re.sub(r"\*\*|__", "", completion)) or list(filter(None, [_fallback(completion)]))
    if not candidates:
        return None, "no final answer found"
    if len({_answer_key(c) for c in candidates}) > 1:
        shown = ", ".join(dict.fromkeys(one_line(c, 20) for c in candidates))
        return None, one_line(f"several different final answers ({shown}): none counts", 120)
    return candidates[-1], ""


def _gold_number(answer: str) -> _Literal | None:
    """The gold answer as a numeric literal (lenient), or None when it is symbolic."""
    rhs = _rhs(_clean(answer))
    return _literal(rhs, strict=False) if rhs else None


def _predicted_number(text: str) -> tuple[_Literal | None, str | None]:
    """(the final answer's value side as a strict numeric literal, or None; that value side)."""
    rhs = _rhs(_clean(text))
    return (_literal(rhs, strict=True) if rhs else None), rhs


def _not_a_number(text: str) -> Verdict:
    return Verdict(0.0, False, f"final answer {one_line(text)} is not a number (an expression left unevaluated?)")


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    """math-verify's parse of a gold answer (cached: a dataset repeats each one across a group)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"\\boxed{{{answer}}}", extraction_config=(LatexExtractionConfig(), ExprExtractionConfig()),
                 parsing_timeout=None)


def _math_compare(completion: str, answer: str, question: str | None = None) -> Verdict:
    """Extract the final answer, apply the value rule, compare with math-verify (no timeout of its own)."""
    # Imported here: only the worker process pays for sympy.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as equivalent

    # Timeouts off: the worker's own alarm bounds the whole call (the library's would swallow timeouts).
    gold = _parse_gold(answer)
    if not gold:
        return Verdict(0.0, False, f"verifier error: cannot parse gold answer {one_line(answer)}")
    text, why = _extract(completion)
    if text is None:
        return Verdict(0.0, False, why)
    gold_value = _gold_number(answer)
    if gold_value is not None:  # a number: only a number answers it
        value, _ = _predicted_number(text)
        if value is None:
            return _not_a_number(text)
        if question and value.kind != gold_value.kind and (value.kind, value.value) in _question_values(question):
            return Verdict(0.0, False, f"final answer {one_line(text)} is copied from the question")
        predicted = value.latex
    else:
        if question and _copied_expression(text, question):
            return Verdict(0.0, False, f"final answer {one_line(text)} is copied from the question")
        predicted = text
    pred = parse(f"\\boxed{{{predicted}}}", extraction_config=(LatexExtractionConfig(boxed_match_priority=0),
                                                              ExprExtractionConfig()), parsing_timeout=None)
    if not pred:
        return Verdict(0.0, False, f"final answer {one_line(text)} cannot be parsed")
    return _answer_verdict(equivalent(gold, pred, timeout_seconds=None), text.strip("$ "))


def _rg_key(rg: dict) -> tuple[str, str]:
    """(task, its config as sorted JSON): what identifies a reasoning-gym checker."""
    return rg["task"], json.dumps(rg["config"], sort_keys=True)


@functools.lru_cache(maxsize=64)
def _rg_checker(task: str, config: str):
    """The `score_answer` of reasoning-gym task `task` built with `config` (JSON), cached across calls."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(config)).score_answer


def _rg_compare(completion: str, rg: dict) -> Verdict:
    """Extract the final answer as for math (a numeric gold needs a numeric literal), then the task's checker."""
    answer = str(rg["entry"]["answer"])
    text, why = _extract(completion)
    if text is None:
        return Verdict(0.0, False, why)
    if _gold_number(answer) is not None:
        value, rhs = _predicted_number(text)
        if value is None:
            return _not_a_number(text)
        candidate = value.latex if value.kind == "dec" else rhs  # `1,234 apples` -> `1234`; 3/4 and 25% as written
    else:
        candidate = _clean(text)
    score = float(_rg_checker(*_rg_key(rg))(candidate, rg["entry"]))
    correct = score >= 1.0
    verdict = _answer_verdict(correct, candidate)
    if not correct and score > 0:
        verdict.feedback += f" (the task's checker gives {score:g})"
    if rg.get("reward") == "task":
        verdict.reward = score
    return verdict


def _math_with_deadline(completion: str, answer: str, timeout_s: float, question: str | None = None,
                        rg: dict | None = None) -> Verdict:
    """`_math_compare` (or `_rg_compare` with `rg`) under a SIGALRM deadline; timeouts and errors score 0."""

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _rg_compare(completion, rg) if rg is not None else _math_compare(completion, answer, question)
    except _Deadline:
        return Verdict(0.0, False, "verifier timed out")
    except Exception as e:  # a library bug on odd input must cost one reward, not the run  # noqa: BLE001
        return Verdict(0.0, False, one_line(f"verifier error: {type(e).__name__}: {e}", 200))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _math_worker_main() -> None:
    """Math worker process: answer one JSON request per stdin line with one JSON verdict line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the reply channel
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MATH_WORKER_MEMORY, MATH_WORKER_MEMORY))
        _math_compare("\\boxed{1}", "1")  # load sympy and the LaTeX parser before any deadline runs
    except BaseException as e:  # reported to the parent, which raises  # noqa: BLE001
        replies.write(f"error: {type(e).__name__}: {e}\n")
        replies.flush()
        return
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:  # ends when the parent exits and the pipe closes
        request = json.loads(line)
        rg = request.get("rg")
        try:
            if rg is not None:  # import the task and build its checker before the deadline starts
                _rg_checker(*_rg_key(rg))
            verdict = _math_with_deadline(request["completion"], request["answer"], request["timeout_s"],
                                          request.get("question"), rg)
        except _Deadline:  # the alarm fired just as the call finished
            verdict = Verdict(0.0, False, "verifier timed out")
        except Exception as e:  # reasoning-gym missing, or the task's checker cannot be built  # noqa: BLE001
            verdict = Verdict(0.0, False, one_line(f"verifier error: {type(e).__name__}: {e}", 200))
        replies.write(json.dumps(asdict(verdict)) + "\n")
        replies.flush()


class _MathWorker:
    """The parent's handle on the math worker process: started lazily, replaced after a hang or crash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.owner = 0
        self.pending = b""
        self.checkers: set[tuple[str, str]] = set()
        """Reasoning-gym checkers the running worker has built (their first call may import the task)."""

    def call(self, completion: str, answer: str, timeout_s: float, question: str | None = None,
             rg: dict | None = None) -> Verdict:
        """One verdict from the worker, waiting at most `timeout_s` plus a grace period (plus the first import
        of a reasoning-gym task's checker)."""
        with self.lock:
            proc = self._ensure()
            request = json.dumps({"completion": completion, "answer": answer, "timeout_s": timeout_s,
                                  "question": question, "rg": rg})
            try:
                proc.stdin.write(request.encode() + b"\n")
                proc.stdin.flush()
            except OSError:
                line = b""
            else:
                first = rg is not None and _rg_key(rg) not in self.checkers
                line = self._read_line(time.monotonic() + timeout_s + MATH_GRACE_S + MATH_START_TIMEOUT_S * first)
                if line and rg is not None:
                    self.checkers.add(_rg_key(rg))
            if line is None:
                self._stop()
                return Verdict(0.0, False, "verifier timed out")
            if not line:
                self._stop()
                return Verdict(0.0, False, f"verifier error: math worker exited (code {proc.returncode})")
            return Verdict(**json.loads(line))

    def _ensure(self) -> subprocess.Popen:
        """The running worker of this process, starting one if needed (also after a fork)."""
        if self.proc is not None and self.owner == os.getpid():
            if self.proc.poll() is None:
                return self.proc
            self._stop()  # it died between calls
        # After a fork the inherited handle belongs to the parent: leave its worker alone.
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from common.verifiers import _math_worker_main; " \
               "_math_worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.owner, self.pending, self.checkers = os.getpid(), b"", set()
        line = self._read_line(time.monotonic() + MATH_START_TIMEOUT_S)
        if line != b"ready":
            self._stop()
            why = line.decode(errors="replace") if line else "no answer"
            raise RuntimeError(f"math verifier worker failed to start ({why}); is math-verify installed?")
        return self.proc

    def _read_line(self, deadline: float) -> bytes | None:
        """The worker's next reply line without the newline; b"" if it exited, None at the deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                return b""
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        """Kill and reap the worker; the next call starts a fresh one."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc = None


_MATH_WORKER = _MathWorker()


def math_verify(completion: str, answer: str, timeout_s: float = 5.0, question: str | None = None) -> Verdict:
    """Is the completion's final answer equal to `answer`, as a value (see the module docstring)?

    The final answer is the last `\\boxed{}` (one that follows "not"/"\\neq" is a rejected candidate and
    ignored), else the `####` line, else an explicit "answer is / answer: / answer to ... is" statement,
    else the last value of the completion stated as a result (`_fallback`). Several different boxed,
    `####` or stated answers are a hedge and score 0; the same one repeated is fine. If `answer` is a
    number, the prediction must be a numeric literal (`17`, `-4`, `1,234`, `0.5`, `\\frac{3}{4}` in
    lowest terms, `25\\%`, `10^6`, with `$`, units, `x =` allowed around it), never an expression that
    evaluates to it (`8+8+7`, `5*2`, `9^2`, `(10)(10)`, `\\frac{46}{2}`, `\\sqrt{4}`), and a number copied
    from `question` in another notation than the gold's (`0.75` for "write 0.75 as a fraction") does not
    count. Otherwise math-verify's equivalence decides, but an expression copied from `question` (a
    substring of it, up to spacing and grouping) is never an answer. Rewards are 1.0 or 0.0."""
    return _MATH_WORKER.call(completion, answer, timeout_s, question)


def rg_verify(completion: str, rg: dict, timeout_s: float = 5.0) -> Verdict:
    """Is the completion's final answer right by the reasoning-gym task's own checker?

    `rg` is an `rg:` example's `meta["rg"]`: task name, config, the task's entry and the reward mode. The answer
    is extracted as in `math_verify` (last box, `####`, "the answer is", strict fallback; a hedge scores 0);
    if the gold answer is a number the prediction must be a numeric literal (`8+8+7` is no answer to 23) and
    reaches the checker in plain digits (`1,234 apples` as `1234`). Otherwise its text, without math
    delimiters and `\\text{}` wrappers, goes to the checker. Reward mode `binary` (default): 1 when the
    checker gives full marks, else 0 (reasoning-gym gives partial marks to some wrong answers); `task`:
    the checker's own score. `correct` is always full marks."""
    return _MATH_WORKER.call(completion, str(rg["entry"]["answer"]), timeout_s, rg=rg)
