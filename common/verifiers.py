"""Verifiers: a reward and a one-line feedback for a completion of a toy, math, reasoning-gym or code task.

Toy: exact string match of the first line after the last `Answer:` (see `toy_verify`). Math:
extraction and a value rule of our own, then Hugging Face's `math-verify` for equivalence, run in a
long-lived worker process (its main thread, so SIGALRM timeouts work whatever thread calls us; a hung
worker is killed and restarted). Reasoning-gym (`rg_verify`): the same extraction and value rule, then the
task's own checker, in the same worker. Code: the last fenced Python block runs against assert tests in a
sandboxed `python -I -S -B` subprocess.

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

How the code verifier decides (`code_verify`): the program and the tests run in two processes. The
program's process runs its code and then only answers requests (call this, get that attribute, iterate
this); the tests' process, which never runs program code, runs the tests with its own builtins and
modules and receives the program's results as plain data (numbers, strings, bytes, containers,
Fraction, Decimal, Counter...) copied over a pipe, or as opaque handles for anything else. So a
program cannot monkeypatch the tests' builtins or modules, rebind `exec`, edit or even read the tests
(they reach the tests' process after the fork), learn the nonce or write the report, and an object of
a class it defines compares equal only to itself whatever its `__eq__` says (a subclass of a plain type,
such as a namedtuple or an IntEnum, compares as its plain value). Handles answer calls, attributes,
iteration, `len`, indexing, truth and `str` with values the program computes, as a real object would;
lists, dicts, sets and bytearrays a call changes in place are copied back. Program names that shadow a
builtin are not visible to the tests. A test cannot pass a function of its own to the program.

What the code sandbox isolates, layer by layer (each is best effort, probed in the child on every run
rather than once at import; where one is unavailable the others still apply):

* Process lifetime: the child starts a new session; on wall-clock timeout, and after every run, its
  whole process group gets SIGKILL.
* Namespaces (where the kernel permits; a user namespace is added when not root): a PID namespace
  (the tests' process runs as its init and the program's as its child, with a fresh /proc: host
  processes, the parent included, are invisible and unsignalable, init ignores the program's signals,
  and when it exits the kernel kills every process left behind); a network namespace (only a down
  loopback); a private mount namespace in which every mount is remounted read-only and fresh 16 MB
  tmpfs cover /tmp, /var/tmp, /dev/shm and /run/lock. The working directory is a new directory in that
  /tmp and vanishes with the namespace.
* Privileges (only when the parent runs as root): the child switches to a fresh random uid/gid without
  supplementary groups, so it cannot write root-owned files, read other processes' /proc/PID/environ,
  signal them or raise its limits again; RLIMIT_NPROC (which root ignores) then counts only this
  sandbox's processes, and after the run every process with that uid is killed. A Python
  installation the new uid can't reach (e.g. under /root) is bind-mounted read-only into the private
  /tmp so the standard library still imports. Always: PR_SET_NO_NEW_PRIVS and PR_SET_PDEATHSIG(SIGKILL);
  the tests' process is not dumpable, so the program's cannot ptrace it or open its /proc/PID/mem or fds.
* Resource limits, per process: RLIMIT_CPU, RLIMIT_AS (memory_mb), RLIMIT_FSIZE (10 MB per file, stdout
  included), RLIMIT_NPROC (8), RLIMIT_NOFILE (64), no core dumps; a value sent between them is at most 4 MB.
* Interpreter: `-I -S -B` (no PYTHON* variables, user site or site-packages: stdlib only; no .pyc
  writes); the environment is only PATH=/usr/bin:/bin; the recursion limit is 10000.
* System calls (seccomp, in the kernel): the program's process and its threads run under a filter, loaded
  after PR_SET_NO_NEW_PRIVS, on x86_64 and aarch64 (on other machines, or a kernel without seccomp, this
  layer is absent and the others still apply). It fails with EPERM: creating a process (fork, vfork, clone
  without CLONE_THREAD; clone3 answers ENOSYS, so glibc falls back to clone and threads work), execve and
  execveat, a signal to any process but itself (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo,
  pidfd_send_signal), socket() of any family (socketpair only of AF_UNIX: asyncio's event loop needs one),
  ptrace, process_vm_readv/writev, pidfd_getfd, process_madvise, namespaces and mounts (unshare, setns,
  mount, umount2, pivot_root, chroot, the new mount API), io_uring (whose requests seccomp would not see),
  bpf, keyrings, perf_event_open, userfaultfd, setsid and setpgid; a call of another ABI (x32, i386) fails
  whatever it is. Being in the kernel, it holds whatever the program does in its own process: libc called
  through ctypes, its memory rewritten, the stand-ins below undone.
* Python level (clear errors for correct programs, not a boundary): subprocess, socket, asyncio,
  multiprocessing, ctypes and pty import normally (`from X import Y` too), and what would cross the
  boundary raises PermissionError("sandbox: ... is not allowed (why)") when called: os.fork, forkpty,
  system, popen, exec*, spawn*, posix_spawn*; os.kill of any pid but the program's own, killpg, setsid,
  setpgid, setpgrp, signal.pidfd_send_signal; subprocess.Popen (so run, call, check_call, check_output,
  getoutput and asyncio's subprocesses) and _posixsubprocess.fork_exec; creating a socket.socket (one
  wrapping a descriptor the program holds, as socketpair and fromfd make, works); multiprocessing's
  Process.start (so Pool, Manager, ProcessPoolExecutor; ThreadPool uses threads and works); ctypes.CDLL,
  PyDLL, cdll, pydll and LoadLibrary, ctypes.pythonapi, _ctypes.dlopen of a library (dlopen(None), the
  already loaded program, stays: ctypes' own import needs it), dlsym, dlclose, call_function, and
  CFUNCTYPE/PYFUNCTYPE prototypes made from an address or a (name, library) pair (Python callbacks work).
  An import hook applies these again whenever such a module is imported again. What works: asyncio.run
  of coroutines (on a socketpair; to_thread too), threads, socketpair, socket's constants and helpers,
  subprocess.list2cmdline, and ctypes as data: c_int(3).value, Structure, arrays, callbacks, pointers,
  memmove, memset, string_at and cast. Raw memory access is deliberately left alone: it is the program's
  own address space, and ctypes' from_address and pointers would reach it anyway.
* I/O: the program's stdin is /dev/null; stdout and stderr go to one file in a fresh temp dir on the
  parent's side (only its last 64 KB are read back); that dir is removed afterwards.
* Results: the tests' process writes one JSON line, prefixed by a random nonce it got on stdin, to a
  dedicated pipe the program's process does not hold; the parent ignores it unless the child exited
  with status 0 before the timeout. If the program's process dies or writes anything but the protocol,
  the run scores 0.

What is NOT isolated: the program can read whatever its uid may read (world-readable files, the
read-only filesystem). The Python-level stand-ins are no boundary: a program can drop the import hook
from sys.meta_path, re-import a module, use a function-pointer type that was never guarded
(ctypes._CFuncPtr, type(ctypes.memmove)), write any memory of its own process with ctypes, and so call
libc directly; what then holds is the kernel's part (seccomp filter, namespaces, separate uid, rlimits,
no_new_privs). The filter leaves files alone: without root *and* without user namespaces (no mount
namespace, no separate uid) such a program can write the user's files. Where seccomp is missing (another
machine, an old kernel) it can create processes (bounded by RLIMIT_NPROC; killed after the run by the
PID namespace or the uid sweep where there is one, otherwise by the process-group kill, which a setsid
escapes), and where the namespaces are missing as well it can signal the user's processes (the tests'
process included: that run scores 0) and open network connections. As root without a mount namespace, a
Python installation the new uid can't reach leaves only built-in and already imported modules
importable. There is no cgroup: CPU is bounded by RLIMIT_CPU and the wall-clock timeout, memory by
RLIMIT_AS per process. Tests are trusted code: a name a test neither defines nor imports comes from the
program, and a test that compares two program objects with `==` compares their identity.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from common.data import Example

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Verdict:
    """A verifier's reward, correctness and one short line of feedback."""

    reward: float
    """1.0 correct / 0.0 wrong for toy and math; fraction of tests passed for code."""
    correct: bool
    """Toy/math: exact; code: all tests passed."""
    feedback: str
    """One short factual line for the self-distillation teacher."""


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


def _shown(text: str, limit: int = 60) -> str:
    """`text` on one line, cut to `limit` characters, for feedback."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _answer_verdict(ok: bool, shown: str) -> Verdict:
    """The toy/math verdict for an extracted final answer."""
    return Verdict(float(ok), ok, f"final answer {_shown(shown)} {'matches' if ok else 'does not match'}")


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
        if re.match(r"\s*[A-Za-z]{2,}", _clean(answer)):
            continue  # prose, "not 22", "below": not a value
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
        shown = ", ".join(dict.fromkeys(_shown(c, 20) for c in candidates))
        return None, _shown(f"several different final answers ({shown}): none counts", 120)
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
    return Verdict(0.0, False, f"final answer {_shown(text)} is not a number (an expression left unevaluated?)")


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
        return Verdict(0.0, False, f"verifier error: cannot parse gold answer {_shown(answer)}")
    text, why = _extract(completion)
    if text is None:
        return Verdict(0.0, False, why)
    gold_value = _gold_number(answer)
    if gold_value is not None:  # a number: only a number answers it
        value, _ = _predicted_number(text)
        if value is None:
            return _not_a_number(text)
        if question and value.kind != gold_value.kind and (value.kind, value.value) in _question_values(question):
            return Verdict(0.0, False, f"final answer {_shown(text)} is copied from the question")
        predicted = value.latex
    else:
        if question and _copied_expression(text, question):
            return Verdict(0.0, False, f"final answer {_shown(text)} is copied from the question")
        predicted = text
    pred = parse(f"\\boxed{{{predicted}}}", extraction_config=(LatexExtractionConfig(boxed_match_priority=0),
                                                              ExprExtractionConfig()), parsing_timeout=None)
    if not pred:
        return Verdict(0.0, False, f"final answer {_shown(text)} cannot be parsed")
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
    except Exception as e:  # a library bug on odd input must cost one reward, not the run
        return Verdict(0.0, False, _shown(f"verifier error: {type(e).__name__}: {e}", 200))
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
    except BaseException as e:
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
        except Exception as e:  # reasoning-gym missing, or the task's checker cannot be built
            verdict = Verdict(0.0, False, _shown(f"verifier error: {type(e).__name__}: {e}", 200))
        except _Deadline:  # the alarm fired just as the call finished
            verdict = Verdict(0.0, False, "verifier timed out")
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


# ---------------------------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n`]*\n(.*?)```", re.DOTALL)

FSIZE_BYTES = 10 << 20
"""Largest file (stdout/stderr included) the sandboxed program may write."""
MAX_PROCS = 8
"""RLIMIT_NPROC of the sandbox (processes and threads; per sandbox only when a fresh uid is used)."""
TMPFS_MB = 16
"""Size of each private tmpfs (the working directory lives in the one on /tmp)."""
OUTPUT_TAIL_BYTES = 64 << 10
RESULT_CAP_BYTES = 1 << 20
SANDBOX_ENV = {"PATH": "/usr/bin:/bin"}

# The sandbox child: `python -I -S -B -c _HARNESS`, job as JSON on stdin. It isolates itself (it is
# single-threaded, unlike a parent that may run torch threads, so no preexec_fn is needed), runs the
# program and the tests in one namespace, and reports on the result pipe.
_HARNESS = r'''
import builtins, ctypes, json, os, posix, re, resource, select, signal, struct, sys
from collections import Counter, OrderedDict, deque
from decimal import Decimal
from fractions import Fraction

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE = 1 << 18
LOCKED_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid nodev noexec *atime: a user namespace must keep them
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
PROCESS_CALLS = ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
                 "spawnvpe", "posix_spawn", "posix_spawnp")
GROUP_CALLS = ("killpg", "setsid", "setpgid", "setpgrp")
NO_PROCESSES, NO_SIGNALS, NO_NETWORK, NO_FOREIGN_CODE = ("no new processes", "no signals to other processes",
                                                         "no network", "no foreign code")

# The program's seccomp filter, per machine: (AUDIT_ARCH, first x32 syscall number or None, syscall numbers).
# clone only with CLONE_THREAD (threads, not processes); clone3 answers ENOSYS, so glibc falls back to clone;
# kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo only to the process itself; socketpair only AF_UNIX
# (asyncio's event loop); the rest of `deny` fails with EPERM: fork, vfork, execve, execveat, socket,
# pidfd_send_signal, pidfd_getfd, process_madvise, ptrace, process_vm_readv/writev, unshare, setns, mount,
# umount2, pivot_root, chroot, open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr, bpf,
# keyctl, add_key, request_key, perf_event_open, userfaultfd, io_uring_setup/enter/register (whose requests
# seccomp would not see), setsid, setpgid.
SECCOMP_TABLES = {
    "x86_64": (0xC000003E, 0x40000000, {
        "clone": 56, "clone3": 435, "socketpair": 53, "signal": (62, 200, 234, 129, 297),
        "deny": (57, 58, 59, 322, 41, 424, 438, 440, 101, 310, 311, 272, 308, 165, 166, 155, 161, 428, 429, 430,
                 431, 432, 433, 442, 321, 250, 248, 249, 298, 323, 425, 426, 427, 112, 109)}),
    "aarch64": (0xC00000B7, None, {  # the generic table: no fork or vfork syscalls
        "clone": 220, "clone3": 435, "socketpair": 199, "signal": (129, 130, 131, 138, 240),
        "deny": (221, 281, 198, 424, 438, 440, 117, 270, 271, 97, 268, 40, 39, 41, 51, 428, 429, 430, 431, 432,
                 433, 442, 280, 219, 217, 218, 241, 282, 425, 426, 427, 157, 154)}),
}


def mount_points():
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p) for p in points]  # undo \040 escapes


def searchable(path):
    """Whether any uid may reach `path` (o+x on every directory down to it, o+r on it)."""
    parts = path.rstrip("/").split("/")
    ancestors_ok = all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts)))
    return ancestors_ok and os.stat(path).st_mode & 0o005 == 0o005


def expose_python(libc):
    """Bind a Python installation the sandbox uid could not reach (e.g. under /root) to /tmp, read-only."""
    for i, prefix in enumerate(dict.fromkeys((sys.base_prefix, sys.base_exec_prefix))):
        if searchable(prefix):
            continue
        target = f"/tmp/.python{i}"
        os.mkdir(target, 0o755)
        if libc.mount(prefix.encode(), target.encode(), None, MS_BIND | MS_REC, None) == 0:
            libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            moved = lambda paths: [target + p[len(prefix):] if p.startswith(prefix) else p for p in paths]
            sys.path[:] = moved(sys.path)
            for module in list(sys.modules.values()):  # packages already imported look up submodules here
                if isinstance(getattr(module, "__path__", None), list):
                    module.__path__[:] = moved(module.__path__)
    sys.path_importer_cache.clear()


def isolate(libc, tmpfs_mb, dropping):
    """New network, mount and PID namespaces where permitted; (working directory, PID namespace made)."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | (CLONE_NEWUSER if os.geteuid() != 0 else 0)
    if libc.unshare(flags) != 0:
        return os.getcwd(), False
    if flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    # Without private propagation any mount below (the PID namespace's /proc too) would leak to the host.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return os.getcwd(), False
    for point in mount_points():
        try:
            keep = os.statvfs(point).f_flag & LOCKED_FLAGS
        except OSError:
            continue
        # MS_BIND: change this mount's flags only, never the filesystem's (which the host shares).
        libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
    options = f"size={tmpfs_mb}m,mode=1777".encode()
    # Fresh tmpfs over the world-writable directories: writes there vanish with the namespace.
    mounted = [point for point in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(point)
               and libc.mount(b"tmpfs", point.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0]
    work = os.getcwd()
    if "/tmp" in mounted:
        if dropping:
            expose_python(libc)
        work = "/tmp/work"
        os.mkdir(work, 0o700)
    return work, libc.unshare(CLONE_NEWPID) == 0


def enter_pid_namespace(libc):
    """Fork the new PID namespace's init, which goes on; this process waits and exits the way it did.

    When init exits the kernel kills everything else in the namespace, and host processes are
    invisible from inside, so the program can neither signal the parent nor leave children behind."""
    child = os.fork()
    if child == 0:
        libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)  # this namespace's pids
        return
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def limit(cfg):
    for res, value in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory_bytes"]),
                       (resource.RLIMIT_FSIZE, cfg["fsize_bytes"]), (resource.RLIMIT_NPROC, cfg["max_procs"]),
                       (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(res)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def drop_privileges(uid, work):
    os.chown(work, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def seccomp_filter(arch, x32, numbers, pid):
    """The BPF program (bytes, instruction count) of the table above for the process `pid`."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    arg0 = 16  # seccomp_data: nr (0), arch (4), instruction pointer (8), args (16 + 8i; low half first)
    code = [(LD, None, None, 4), (JEQ, None, "deny", arch), (LD, None, None, 0)]  # another ABI: all denied
    code += [(JGE, "deny", None, x32)] if x32 else []
    code += [(JEQ, "clone", None, numbers["clone"]), (JEQ, "enosys", None, numbers["clone3"]),
             (JEQ, "pair", None, numbers["socketpair"])]
    code += [(JEQ, "self", None, nr) for nr in numbers["signal"]] + [(JEQ, "deny", None, nr) for nr in numbers["deny"]]
    code += [(RET, None, None, ALLOW),
             "clone", (LD, None, None, arg0), (JSET, "allow", "deny", 0x10000),  # CLONE_THREAD
             "self", (LD, None, None, arg0), (JEQ, "allow", "deny", pid),
             "pair", (LD, None, None, arg0), (JEQ, "allow", "deny", 1),  # AF_UNIX
             "allow", (RET, None, None, ALLOW), "deny", (RET, None, None, EPERM), "enosys", (RET, None, None, ENOSYS)]
    labels, at = {}, 0
    for item in code:
        if type(item) is str:
            labels[item] = at
        else:
            at += 1
    program = [item for item in code if type(item) is not str]
    jump = lambda label, i: 0 if label is None else labels[label] - i - 1
    data = b"".join(struct.pack("=HBBI", op, jump(jt, i), jump(jf, i), k) for i, (op, jt, jf, k) in enumerate(program))
    return data, len(program)


def install_seccomp(libc):
    """Load the program's seccomp filter (after PR_SET_NO_NEW_PRIVS); False where the machine or kernel lacks it."""
    table = SECCOMP_TABLES.get(os.uname().machine)
    if table is None:
        return False
    data, count = seccomp_filter(*table, os.getpid())
    instructions = ctypes.create_string_buffer(data, len(data))

    class Program(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    return libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(Program(count, ctypes.addressof(instructions))), 0, 0) == 0


def refuse(what, why):
    """A stand-in for `what` that raises PermissionError when called."""
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed ({why})")
    refused.__name__ = refused.__qualname__ = what.rsplit(".", 1)[-1]
    return refused


class Refused:
    """A stand-in for an object (ctypes.pythonapi) whose every attribute raises PermissionError."""

    def __init__(self, what):
        object.__setattr__(self, "_what", what)

    def __getattr__(self, *args, **kwargs):
        raise PermissionError(f"sandbox: {object.__getattribute__(self, '_what')} is not allowed ({NO_FOREIGN_CODE})")

    __getitem__ = __call__ = __getattr__


def patch_os(module, pid):
    for name in PROCESS_CALLS:
        if hasattr(module, name):
            setattr(module, name, refuse(f"os.{name}", NO_PROCESSES))
    for name in GROUP_CALLS:
        if hasattr(module, name):
            why = NO_SIGNALS if name == "killpg" else "the process group is fixed"
            setattr(module, name, refuse(f"os.{name}", why))
    real_kill = module.kill

    def kill(target, sig):  # the program may signal itself (a handler it installed), never another process
        if type(target) is not int or target != pid:
            raise PermissionError(f"sandbox: os.kill of another process is not allowed ({NO_SIGNALS})")
        return real_kill(target, sig)

    module.kill = kill


def patch_signal(module):
    if hasattr(module, "pidfd_send_signal"):
        module.pidfd_send_signal = refuse("signal.pidfd_send_signal", NO_SIGNALS)


def patch_subprocess(module):
    # run, call, check_call, check_output, getoutput and asyncio's subprocesses all start a Popen here.
    module.Popen._execute_child = refuse("subprocess.Popen", NO_PROCESSES)


def patch_posixsubprocess(module):
    module.fork_exec = refuse("_posixsubprocess.fork_exec", NO_PROCESSES)


def patch_socket(module):
    init = module.socket.__init__

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:  # wrapping a descriptor the program already holds (socketpair, fromfd) is harmless
            raise PermissionError(f"sandbox: socket.socket is not allowed ({NO_NETWORK}; socket.socketpair works)")
        init(self, family, type, proto, fileno)

    module.socket.__init__ = __init__


def patch_multiprocessing_process(module):
    # Process, Pool, Manager and ProcessPoolExecutor workers all start here; ThreadPool uses threads and works.
    module.BaseProcess.start = refuse("multiprocessing.Process.start", NO_PROCESSES)


def patch_ctypes_extension(module):
    real_dlopen = module.dlopen

    def dlopen(name, *mode):  # None (the program itself, already loaded) only: ctypes' own import needs it
        if name is not None:
            raise PermissionError(f"sandbox: loading a library with ctypes is not allowed ({NO_FOREIGN_CODE})")
        return real_dlopen(name, *mode)

    module.dlopen = dlopen
    for name in ("dlsym", "dlclose", "call_function", "call_cdeclfunction"):
        if hasattr(module, name):
            setattr(module, name, refuse(f"_ctypes.{name}", NO_FOREIGN_CODE))


def patch_ctypes(module):
    def refused_library(self, *args, **kwargs):
        raise PermissionError(f"sandbox: ctypes.{type(self).__name__} is not allowed ({NO_FOREIGN_CODE})")

    module.CDLL.__init__ = refused_library  # PyDLL, cdll, pydll and LoadLibrary too
    guarded = {}

    def guard(factory):
        """CFUNCTYPE/PYFUNCTYPE whose prototypes wrap Python callables only, never an address or a library's name."""
        def prototype(*args, **kwargs):
            proto = factory(*args, **kwargs)
            if proto not in guarded:
                def __new__(cls, *args):
                    if args and (isinstance(args[0], (int, tuple)) or not callable(args[0])):
                        raise PermissionError(f"sandbox: a ctypes function at an address or in a library is not "
                                              f"allowed ({NO_FOREIGN_CODE}); Python callbacks work")
                    return proto.__new__(cls, *args)
                guarded[proto] = type(proto)(proto.__name__, (proto,), {
                    "__new__": __new__, "_argtypes_": proto._argtypes_, "_restype_": proto._restype_,
                    "_flags_": proto._flags_})
            return guarded[proto]
        prototype.__name__ = prototype.__qualname__ = factory.__name__
        return prototype

    replaced = {"pythonapi": Refused("ctypes.pythonapi"), "_dlopen": refuse("ctypes._dlopen", NO_FOREIGN_CODE),
                "CFUNCTYPE": guard(module.CFUNCTYPE), "PYFUNCTYPE": guard(module.PYFUNCTYPE)}
    originals = {name: getattr(module, name) for name in replaced}
    for other in list(sys.modules.values()):  # ctypes._endian's `from ctypes import *` holds them too
        names = getattr(other, "__dict__", None)
        for name in replaced if type(names) is dict else ():
            if names.get(name) is originals[name]:
                names[name] = replaced[name]


class Patcher:
    """A meta path finder: each module named in `patches`, whenever it is (re)imported, is patched once it has run."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader, patch)
        return spec


class PatchingLoader:
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def lock_down(libc):
    """The program's process only: no new privileges, death with the tests' process, the seccomp filter, and
    stand-ins that raise PermissionError for the dangerous calls of the modules below (which import normally)."""
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after the uid change and the fork, which clear it
    install_seccomp(libc)
    pid = os.getpid()
    patches = {"os": lambda m: patch_os(m, pid), "posix": lambda m: patch_os(m, pid), "signal": patch_signal,
               "subprocess": patch_subprocess, "_posixsubprocess": patch_posixsubprocess, "socket": patch_socket,
               "multiprocessing.process": patch_multiprocessing_process, "_ctypes": patch_ctypes_extension,
               "ctypes": patch_ctypes}
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, Patcher(patches))
    sys.setrecursionlimit(10000)


def describe(e, test):
    try:
        name, message = type(e).__name__, str(e)
    except BaseException:
        name, message = "Exception", ""
    if not message and isinstance(e, MemoryError):
        message = "memory limit exceeded"
    text = f"{name}: {message or test}"
    return " ".join(text.split())[:300]


# Wire format between the tests' process and the program's: frames of a 12-digit length and JSON, each
# value a tagged list. Plain data travels by value; anything else stays in the program's process and
# travels as a handle ["h", id, type name]; a subclass of a plain type travels as its plain value plus a
# handle (["v", value, id, type name]: a namedtuple keeps its fields, but compares as a tuple).
MESSAGE_CAP = 4 << 20
DEPTH_CAP = 100
PLAIN_TAGS = {int: "i", float: "f", complex: "c", str: "s", bytes: "y", bytearray: "Y", list: "l", tuple: "t",
              dict: "d", set: "S", frozenset: "F", range: "r", Fraction: "q", Decimal: "D", deque: "Q",
              Counter: "C", OrderedDict: "O"}
BASES = (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)


class Died(BaseException):
    """The program's process ended or broke the protocol: no test after this one can run."""


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MESSAGE_CAP:
        raise ValueError(f"value too large to return ({len(data)} bytes encoded)")
    data = b"%012d" % len(data) + data
    while data:
        data = data[os.write(fd, data):]


def wire(value, handle, depth=0):
    """`value` as a tagged list; `handle(value)` for what is not plain data (it may raise TypeError)."""
    if depth > DEPTH_CAP:
        raise ValueError("value nested too deeply")
    kind, deeper = type(value), lambda v: wire(v, handle, depth + 1)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    tag = PLAIN_TAGS.get(kind)
    if tag is None:
        return handle(value)
    if tag in "ir":
        return [tag, *(format(v, "x") for v in ((value,) if tag == "i" else (value.start, value.stop, value.step)))]
    if tag == "f":
        return ["f", float.__repr__(value)]
    if tag == "c":
        return ["c", float.__repr__(value.real), float.__repr__(value.imag)]
    if tag in "sD":
        return [tag, str(value)]
    if tag in "yY":
        return [tag, value.hex()]
    if tag == "q":
        return ["q", format(value.numerator, "x"), format(value.denominator, "x")]
    if tag in "dCO":
        return [tag, [[deeper(k), deeper(v)] for k, v in value.items()]]
    return [tag, [deeper(v) for v in value]]


def unwire(message, resolve, depth=0):
    """The value a tagged list stands for; handles go to `resolve(tag, fields)`. ValueError if malformed."""
    if depth > DEPTH_CAP or type(message) is not list or not message or type(message[0]) is not str:
        raise ValueError("malformed value")
    tag, fields, deeper = message[0], message[1:], lambda v: unwire(v, resolve, depth + 1)
    text = lambda i: fields[i] if type(fields[i]) is str and len(fields[i]) < MESSAGE_CAP else bad()
    items = lambda: fields[0] if type(fields[0]) is list else bad()
    if tag == "n":
        return None
    if tag == "b":
        return fields[0] if type(fields[0]) is bool else bad()
    if tag == "i":
        return int(text(0), 16)
    if tag == "f":
        return float(text(0))
    if tag == "c":
        return complex(float(text(0)), float(text(1)))
    if tag == "s":
        return text(0)
    if tag == "D":
        return Decimal(text(0))
    if tag in "yY":
        return (bytes if tag == "y" else bytearray).fromhex(text(0))
    if tag == "r":
        return range(int(text(0), 16), int(text(1), 16), int(text(2), 16))
    if tag == "q":
        return Fraction(int(text(0), 16), int(text(1), 16))
    if tag in "dCO":
        pairs = [(deeper(p[0]), deeper(p[1])) if type(p) is list and len(p) == 2 else bad() for p in items()]
        return Counter(dict(pairs)) if tag == "C" else OrderedDict(pairs) if tag == "O" else dict(pairs)
    if tag in "ltSFQ":
        return {"l": list, "t": tuple, "S": set, "F": frozenset, "Q": deque}[tag](deeper(v) for v in items())
    return resolve(tag, fields)


def bad():
    raise ValueError("malformed value")


# ------------------------------------------------------------------------------ the program's process


def serve(code, inbox, outbox):
    """Run the program, report its names, then answer the tests' requests on it until the pipe closes."""
    read, exit_now, loads = os.read, os._exit, json.loads
    objects, refs = {}, {}

    def opaque(value):
        ref = refs.setdefault(id(value), len(refs))
        objects[ref] = value
        return ["h", ref, str(getattr(type(value), "__name__", "object"))[:60]]

    def handle(value):
        """A handle; for a subclass of a plain type (namedtuple, IntEnum) its plain value as well."""
        base = next((b for b in BASES[1:] if isinstance(value, b)), None)
        if base is None:
            return opaque(value)
        if base in (list, tuple, set, frozenset):
            plain = base(base.__iter__(value))
        elif base is dict:
            plain = dict(dict.items(value))
        else:
            plain = str.__str__(value) if base is str else base(value)
        return ["v", wire(plain, handle), *opaque(value)[1:]]

    def value(message):
        return unwire(message, lambda tag, fields: objects[fields[0]] if tag == "h" else bad())

    def receive():
        def exactly(n):
            data = b""
            while len(data) < n:
                chunk = read(inbox, n - len(data))
                if not chunk:
                    exit_now(0)  # the tests' process is done
                data += chunk
            return data
        return loads(exactly(int(exactly(12))))

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as e:  # SystemExit included: exiting early must not skip the tests as passed
        send(outbox, ["raised", describe(e, "")])
        exit_now(0)
    exports = {}
    for name, v in list(namespace.items()):
        if name.startswith("__"):
            continue
        if type(v) is type(sys):
            exports[name] = ["m", str(getattr(v, "__name__", ""))]
            continue
        try:
            exports[name] = wire(v, handle)
            if len(json.dumps(exports[name])) > 1 << 16:
                exports[name] = opaque(v)
        except Exception:  # too deep, or odd: the tests can still use it through a handle
            exports[name] = opaque(v)
    send(outbox, ["ready", exports])
    operations = {"getattr": lambda target, name: getattr(target, name), "iter": lambda target: iter(target),
                  "next": lambda target: next(target), "len": lambda target: len(target),
                  "getitem": lambda target, key: target[value(key)], "bool": lambda target: bool(target),
                  "str": lambda target: str(target)}
    while True:
        op, ref, *rest = receive()
        try:
            if op == "call":
                args = [value(a) for a in rest[0]]
                result = objects[ref](*args, **{k: value(v) for k, v in rest[1].items()})
                after = [wire(a, handle) if type(a) in (list, dict, set, bytearray) else None for a in args]
                reply = ["ok", wire(result, handle), after]
            else:
                reply = ["ok", wire(operations[op](objects[ref], *rest), handle)]
            send(outbox, reply)
        except BaseException as e:
            try:
                name = str(type(e).__name__)[:60]
                send(outbox, ["err", name, describe(e, "")[len(name) + 2:]])
            except BaseException:
                send(outbox, ["err", "Exception", ""])


# -------------------------------------------------------------------------------- the tests' process


class Channel:
    """The tests' end of the pipes to the program's process."""

    def __init__(self, inbox, outbox, child):
        self.inbox, self.outbox, self.child, self.buffer = inbox, outbox, child, bytearray()
        self.status, self.dead, self.proxies = None, None, {}

    def exited(self):
        if self.status is None:
            pid, status = os.waitpid(self.child, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is not None

    def read(self, n):
        while len(self.buffer) < n:
            if select.select([self.inbox], [], [], 0.05)[0]:
                chunk = os.read(self.inbox, 1 << 16)
                if not chunk:
                    raise Died("exit")
                self.buffer += chunk
            elif self.exited():  # a child it forked may still hold the pipe open
                raise Died("exit")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def receive(self):
        if self.dead:
            raise Died(self.dead)
        try:
            header = self.read(12)
            if not header.isdigit() or int(header) > MESSAGE_CAP:
                raise Died("protocol")
            try:
                return json.loads(self.read(int(header)))
            except (ValueError, RecursionError):
                raise Died("protocol") from None
        except Died as e:
            self.dead = e.args[0]
            raise

    def value(self, message, exported=False):
        """A value the program sent; only its exported names may stand for modules (our own copies)."""
        try:
            if exported and type(message) is list and len(message) == 2 and message[0] == "m":
                return sys.modules.get(message[1]) if type(message[1]) is str else bad()
            return unwire(message, self.proxy)
        except Exception:  # whatever the program sent, a value that doesn't decode ends the run
            self.dead = "protocol"
            raise Died("protocol") from None

    def proxy(self, tag, fields):
        if tag == "h" and len(fields) == 2 and type(fields[0]) is int and type(fields[1]) is str:
            if fields[0] not in self.proxies:
                self.proxies[fields[0]] = Remote(self, fields[0], fields[1])
            return self.proxies[fields[0]]
        if tag == "v" and len(fields) == 3 and type(fields[1]) is int and type(fields[2]) is str:
            plain = unwire(fields[0], self.proxy)
            base = next((b for b in BASES[1:] if type(plain) is b), None)
            if base is None:
                bad()
            made = REMOTE_SUBCLASSES[base](plain)
            made.__dict__.update(_remote=Remote(self, fields[1], fields[2]))
            return made
        bad()

    def ask(self, request):
        """The program's answer to `request`: a value, a handle, or the exception it raised, re-raised here."""
        if self.dead:
            raise Died(self.dead)
        try:
            send(self.outbox, request)
        except OSError:
            self.dead = "exit"
            raise Died("exit") from None
        reply = self.receive()
        if type(reply) is list and reply and reply[0] == "ok" and len(reply) in (2, 3):
            result = self.value(reply[1])
            if len(reply) == 3 and request[0] == "call":
                self.update_arguments(request, reply[2])
            return result
        if type(reply) is list and len(reply) == 3 and reply[0] == "err" and all(type(x) is str for x in reply[1:]):
            if reply[1] in ("StopIteration", "StopAsyncIteration") and request[0] != "next":
                # Raised by a call, it would silently end a test's map()/filter() (`all(map(f, xs))`).
                raise RuntimeError(f"the program raised {reply[1]} outside an iterator's __next__")
            raise remote_error(reply[1], reply[2])
        self.dead = "protocol"
        raise Died("protocol")

    def update_arguments(self, request, after):
        """Lists, dicts, sets and bytearrays the program changed in place change here too."""
        if type(after) is not list or len(after) != len(self.passed):
            self.dead = "protocol"
            raise Died("protocol")
        for original, new in zip(self.passed, after):
            if new is not None and type(original) in (list, dict, set, bytearray):
                new = self.value(new)
                if type(new) is not type(original):
                    continue
                if type(original) in (dict, set):
                    original.clear()
                    original.update(new)
                else:
                    original[:] = new

    def call(self, ref, args, kwargs):
        self.passed = args
        return self.ask(["call", ref, [self.out(a) for a in args], {str(k): self.out(v) for k, v in kwargs.items()}])

    def out(self, value):
        def handle(v):
            if isinstance(v, Remote):
                return ["h", v._ref]
            if type(v) in REMOTE_SUBCLASSES.values():
                return ["h", v.__dict__["_remote"]._ref]
            base = next((b for b in BASES[1:] if isinstance(v, b)), None)
            if base is not None:
                return wire(base(v), handle)
            raise TypeError(f"a test can't pass a {type(v).__name__} to the program")
        return wire(value, handle)


class Remote:
    """An object that lives in the program's process. It compares equal only to itself: a class the program
    defines never decides a test's `==`. Calls, attributes, iteration, len, indexing, truth and str are
    answered by the program, with plain values or more handles."""

    __slots__ = ("_channel", "_ref", "_kind", "__weakref__")

    def __init__(self, channel, ref, kind):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_kind", kind)

    def __call__(self, *args, **kwargs):
        return self._channel.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._channel.ask(["getattr", self._ref, name])

    def __iter__(self):
        return self._channel.ask(["iter", self._ref])

    def __next__(self):
        return self._channel.ask(["next", self._ref])

    def __len__(self):
        n = self._channel.ask(["len", self._ref])
        if type(n) is not int:
            raise TypeError("len() of a program object must be an int")
        return n

    def __getitem__(self, key):
        return self._channel.ask(["getitem", self._ref, self._channel.out(key)])

    def __bool__(self):
        truth = self._channel.ask(["bool", self._ref])
        if type(truth) is not bool:
            raise TypeError("truth of a program object must be a bool")
        return truth

    def __str__(self):
        text = self._channel.ask(["str", self._ref])
        if type(text) is not str:
            raise TypeError("str() of a program object must be a str")
        return text

    def __repr__(self):
        return f"<{self._kind} object of the program>"

    def __reduce__(self):
        raise TypeError("program objects can't be pickled")


def remote_subclass(base):
    """A subclass of `base` whose attributes not found on `base` are the program's (a namedtuple's fields)."""

    def __getattr__(self, name):
        remote = self.__dict__.get("_remote")
        if remote is None or name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(remote, name)

    return type(base.__name__, (base,), {"__getattr__": __getattr__})


REMOTE_SUBCLASSES = {b: remote_subclass(b) for b in BASES[1:]}


def remote_error(name, message):
    """An exception of this process for one the program raised: the builtin of that name, if there is one."""
    name = name if name.isidentifier() else "Exception"
    kind = getattr(builtins, name, None)
    if kind is KeyError:  # whose str() would quote the message again
        return type(name, (KeyError,), {"__str__": lambda self: message})()
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:
            pass
    return type(name, (Exception,), {})(message)


def run_tests(channel, tests):
    first = channel.receive()
    if type(first) is list and len(first) == 2 and first[0] == "raised" and type(first[1]) is str:
        return {"passed": 0, "total": len(tests), "error": "the program raised " + first[1][:300]}
    if not (type(first) is list and len(first) == 2 and first[0] == "ready" and type(first[1]) is dict):
        channel.dead = "protocol"
        raise Died("protocol")
    # The tests' names: our own builtins, and the program's names except ones that shadow a builtin or
    # take a standard module's name without being that module (`math = Fake()`).
    namespace = {"__name__": "tests", "__builtins__": builtins}
    for name, message in first[1].items():
        module = type(message) is list and message[:1] == ["m"]
        if name.startswith("__") or hasattr(builtins, name) or name in sys.stdlib_module_names and not module:
            continue
        value = channel.value(message, exported=True)
        if value is not None or not module:  # a module we don't have: the tests import their own
            namespace[name] = value
    passed, error = 0, None
    for test in tests:
        try:
            exec(compile(test, "test", "exec"), namespace)
            passed += 1
        except Died:
            raise
        except BaseException as e:
            error = error or describe(e, test.strip())
        if channel.dead:  # a test that caught the program's death must not count
            raise Died(channel.dead)
    return {"passed": passed, "total": len(tests), "error": error}


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("job truncated")
        data += chunk
    return data


def main():
    # stdin: a 12-digit length, the job (program and limits), then the tests and the nonce. Only the job
    # is read before the program's process forks: it never holds the tests, the nonce or the result pipe.
    job = json.loads(read_exactly(0, int(read_exactly(0, 12))))
    write, dumps, exit_now, fd = os.write, json.dumps, os._exit, job["result_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    work, pid_namespace = isolate(libc, job["tmpfs_mb"], dropping=job["uid"] is not None)
    if pid_namespace:
        enter_pid_namespace(libc)
    if job["uid"] is not None:
        drop_privileges(job["uid"], work)
    os.chdir(work)
    program_in, tests_out = os.pipe()  # requests: tests -> program
    tests_in, program_out = os.pipe()  # replies: program -> tests
    child = os.fork()
    if child == 0:
        for unused in (fd, tests_out, tests_in):
            os.close(unused)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the rest of stdin (the tests) stays unread in the tests' process
        os.close(null)
        limit(job)
        lock_down(libc)
        vars(libc).clear()  # the harness's handle to libc and its functions: freed, not found through frames or gc
        del libc
        serve(job.pop("code"), program_in, program_out)
        exit_now(0)
    for unused in (program_in, program_out):
        os.close(unused)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program's process can't ptrace or read our memory
    limit(job)
    rest = b""
    while chunk := os.read(0, 1 << 16):
        rest += chunk
    secret = json.loads(rest)
    channel = Channel(tests_in, tests_out, child)
    try:
        result = run_tests(channel, secret["tests"])
    except Died as e:
        for _ in range(40 if e.args[0] == "exit" else 0):  # the pipe may close just before the exit status
            if channel.exited():
                break
            select.select([], [], [], 0.05)
        if e.args[0] == "exit" and channel.exited():
            status = channel.status
            died = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        else:  # it wrote something that is not the protocol, or closed its pipe and lives on
            died = "protocol"
        result = {"passed": 0, "total": len(secret["tests"]), "error": None, "died": died}
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    write(fd, (secret["nonce"] + " " + dumps(result) + "\n").encode())
    exit_now(0)  # skip atexit handlers and finalizers


main()
'''


def extract_code(completion: str) -> str | None:
    """The last fenced ```python block, else the last plain ``` block; None if there is neither."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    plain = [body for lang, body in blocks if not lang]
    return python[-1] if python else plain[-1] if plain else None


def _sandbox_uid(workdir: str) -> int | None:
    """A fresh uid owning `workdir` when we are root and may use it; None otherwise."""
    if os.geteuid() != 0:
        return None
    uid = (1 << 30) + secrets.randbelow(1 << 30)
    try:
        os.chown(workdir, uid, uid)  # fails where the uid is unmapped (rootless containers): skip the drop
    except OSError:
        return None
    return uid


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real uid is `uid` (children that escaped the process group)."""
    for _ in range(10):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return


def _read_available(fd: int, cap: int) -> bytes:
    """What is buffered in a pipe, without blocking on writers that may still hold it open."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < cap:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data[:cap]


def _parse_result(data: bytes, nonce: str, total: int) -> dict | None:
    """The harness's report: the last line carrying the nonce, if well formed."""
    for line in reversed(data.decode(errors="replace").splitlines()):
        if line.startswith(nonce + " "):
            try:
                result = json.loads(line[len(nonce) + 1:])
            except json.JSONDecodeError:
                return None
            ok = isinstance(result, dict) and result.get("total") == total and isinstance(result.get("passed"), int)
            return result if ok and 0 <= result["passed"] <= total else None
    return None


@dataclass
class _Run:
    """What the parent observed of one sandboxed run."""

    returncode: int
    timed_out: bool
    result: dict | None
    output_tail: str


def _run_sandboxed(code: str, tests: list[str], timeout_s: float, memory_mb: int) -> _Run:
    """Run the harness on `code` and `tests` in a fresh temp dir; kill everything it started afterwards."""
    workdir = tempfile.mkdtemp(prefix="cleansd-sandbox-")
    read_fd, write_fd = os.pipe()
    try:
        uid = _sandbox_uid(workdir)
        nonce = secrets.token_hex(16)
        job = json.dumps({"code": code, "result_fd": write_fd, "uid": uid, "cpu_s": int(timeout_s) + 1,
                          "memory_bytes": memory_mb << 20, "fsize_bytes": FSIZE_BYTES, "max_procs": MAX_PROCS,
                          "tmpfs_mb": TMPFS_MB}).encode()
        # The job first (framed), then what only the tests' process reads, after the program's has forked.
        stdin = b"%012d" % len(job) + job + json.dumps({"tests": tests, "nonce": nonce}).encode()
        output = os.path.join(workdir, "output.txt")
        with open(output, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _HARNESS], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=SANDBOX_ENV,
                                    pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        try:
            proc.communicate(stdin, timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid, uid)
        proc.communicate()
        result = _parse_result(_read_available(read_fd, RESULT_CAP_BYTES), nonce, len(tests))
        with open(output, "rb") as f:
            f.seek(max(0, os.path.getsize(output) - OUTPUT_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
        return _Run(proc.returncode, timed_out, result, tail)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int, uid: int | None) -> None:
    """SIGKILL the sandbox's process group and, with a sandbox uid, every process of that uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)


def _killed(signum: int) -> str:
    why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGKILL: " (CPU or memory limit?)",
           signal.SIGSEGV: " (stack overflow or memory limit?)"}.get(signum, "")
    try:
        name = signal.Signals(signum).name
    except ValueError:  # real-time signals have no name
        name = f"signal {signum}"
    return f"killed by {name}{why}"


def _failure(run: _Run, timeout_s: float) -> str | None:
    """Why a run's report can't be trusted, as feedback; None if it can."""
    if run.timed_out:
        return f"timed out after {timeout_s:g}s"
    if run.returncode < 0:
        return _killed(-run.returncode)
    died = run.result.get("died") if run.result is not None else None
    if died == "protocol":
        return "broke the test protocol (wrote to the harness's pipe or closed it)"
    if isinstance(died, dict) and isinstance(died.get("signal"), int):
        return _killed(died["signal"])  # the program's process, while the tests' process waited on it
    code = died.get("exit") if isinstance(died, dict) else run.returncode
    if code != 0 or run.result is None or died is not None:
        last = next((line for line in reversed(run.output_tail.splitlines()) if line.strip()), "")
        reason = f"exited with code {code} before reporting results"
        return f"{reason}: {_shown(last, 200)}" if last else reason
    return None


def code_verify(completion: str, tests: list[str], timeout_s: float = 5.0, memory_mb: int = 512) -> Verdict:
    """Fraction of assert `tests` that the completion's last Python block passes, run in the sandbox.

    The tests run in a process that never runs the program's code and sees only the values it computes
    (module docstring); a program that dies, times out or breaks that protocol scores 0."""
    code = extract_code(completion)
    if code is None:
        return Verdict(0.0, False, "no code block found")
    if not tests:
        return Verdict(0.0, False, "no tests to run")
    run = _run_sandboxed(code, tests, timeout_s, memory_mb)
    failure = _failure(run, timeout_s)
    if failure:
        return Verdict(0.0, False, failure)
    passed, total, error = run.result["passed"], len(tests), run.result.get("error")
    feedback = f"passed {passed} of {total} tests" + (f"; first failure: {error}" if error else "")
    return Verdict(passed / total, passed == total, feedback)
