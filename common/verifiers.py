"""Verifiers: a reward and a one-line feedback for a completion of a toy, math or code task.

Toy: exact match of the text after the last `Answer:`. Math: Hugging Face's `math-verify`, run in a
long-lived worker process (its main thread, so SIGALRM timeouts work whatever thread calls us; a hung
worker is killed and restarted). Code: the last fenced Python block runs against assert tests in a
sandboxed `python -I -S -B` subprocess.

What the code sandbox isolates, layer by layer (each is best effort, probed in the child on every run
rather than once at import; where one is unavailable the others still apply):

* Process lifetime: the child starts a new session; on wall-clock timeout, and after every run, its
  whole process group gets SIGKILL.
* Namespaces (where the kernel permits; a user namespace is added when not root): a PID namespace
  (the program runs as its init with a fresh /proc: host processes, the parent included, are
  invisible and unsignalable, and when it exits the kernel kills every process it left behind); a
  network namespace (only a down loopback); a private mount namespace in which every mount is
  remounted read-only and fresh 16 MB tmpfs cover /tmp, /var/tmp, /dev/shm and /run/lock. The
  working directory is a new directory in that /tmp and vanishes with the namespace.
* Privileges (only when the parent runs as root): the child switches to a fresh random uid/gid without
  supplementary groups, so it cannot write root-owned files, read other processes' /proc/PID/environ,
  signal them or raise its limits again; RLIMIT_NPROC (which root ignores) then counts only this
  sandbox's processes, and after the run every process with that uid is killed. A Python
  installation the new uid can't reach (e.g. under /root) is bind-mounted read-only into the private
  /tmp so the standard library still imports. Always: PR_SET_NO_NEW_PRIVS and PR_SET_PDEATHSIG(SIGKILL).
* Resource limits: RLIMIT_CPU, RLIMIT_AS (memory_mb), RLIMIT_FSIZE (10 MB per file, stdout included),
  RLIMIT_NPROC (8), RLIMIT_NOFILE (64), no core dumps.
* Interpreter: `-I -S -B` (no PYTHON* variables, user site or site-packages: stdlib only; no .pyc
  writes); the environment is only PATH=/usr/bin:/bin; before the program runs, fork/exec/spawn/
  system/kill/setsid are replaced by stubs that raise, and subprocess, socket, multiprocessing,
  asyncio, pty and ctypes imports fail; the recursion limit is 10000.
* I/O: stdin is /dev/null; stdout and stderr go to one file in a fresh temp dir on the parent's side
  (only its last 64 KB are read back); that dir is removed afterwards.
* Results: the harness writes one JSON line, prefixed by a random nonce it got on stdin, to a
  dedicated pipe; the parent ignores it unless the child exited with status 0 before the timeout.

What is NOT isolated: the program can read whatever its uid may read (world-readable files, the
read-only filesystem). Without root *and* without user namespaces there are no namespaces and no
separate uid, so a program that undoes the Python-level stubs (e.g. `sys.modules` surgery, then
ctypes) can write the user's files, signal the user's processes and open network connections. As
root without a mount namespace, a Python installation the new uid can't reach leaves only built-in
and already imported modules importable. There is no seccomp filter and no cgroup: CPU is bounded by
RLIMIT_CPU and the wall-clock timeout, memory by RLIMIT_AS per process. A program that inspects the
harness's frames can find the nonce, but a forged report still needs a clean exit before the real
tests run. Tests share the program's namespace, so objects that compare equal to everything defeat
`==` asserts (reward hacking, not an escape).
"""
from __future__ import annotations

import json
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
        return math_verify(completion, example.answer)
    if example.task == "code":
        return code_verify(completion, example.tests or [])
    raise ValueError(f"unknown task {example.task!r}: expected toy, math or code")


def _shown(text: str, limit: int = 60) -> str:
    """`text` on one line, cut to `limit` characters, for feedback."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _answer_verdict(ok: bool, shown: str) -> Verdict:
    """The toy/math verdict for an extracted final answer."""
    return Verdict(float(ok), ok, f"final answer {_shown(shown)} {'matches' if ok else 'does not match'}")


# ----------------------------------------------------------------------------------------------- toy


def toy_verify(completion: str, answer: str) -> Verdict:
    """Exact match of the first line of the text after the last `Answer:`."""
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


def _answer_region(completion: str) -> tuple[str, tuple]:
    """The part of the completion holding the final answer and the math-verify configs to extract it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    boxed = completion.rfind("\\boxed")
    if boxed >= 0:
        # Only the last \boxed counts: an empty one is no answer, not a cue to grab an earlier number.
        return completion[boxed:], (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    hashes = completion.rfind("####")
    if hashes >= 0:  # GSM8K style: the answer is the rest of that line
        return completion[hashes + 4:].strip().split("\n", 1)[0], (LatexExtractionConfig(), ExprExtractionConfig())
    # math-verify's own priorities: "final answer is", "answer:", then the last LaTeX or number.
    return completion, (LatexExtractionConfig(), ExprExtractionConfig())


def _math_compare(completion: str, answer: str) -> Verdict:
    """Parse gold and predicted answers with math-verify and compare them (no timeout of its own)."""
    # Imported here: only the worker process pays for sympy.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as equivalent

    # Timeouts off: the worker's own alarm bounds the whole call (the library's would swallow timeouts).
    gold = parse(f"\\boxed{{{answer}}}", extraction_config=(LatexExtractionConfig(), ExprExtractionConfig()),
                 parsing_timeout=None)
    if not gold:
        return Verdict(0.0, False, f"verifier error: cannot parse gold answer {_shown(answer)}")
    region, configs = _answer_region(completion)
    pred = parse(region, extraction_config=configs, parsing_timeout=None)
    if not pred:
        return Verdict(0.0, False, "no final answer found")
    # With the default fallback mode, the last element is the extracted text as written.
    return _answer_verdict(equivalent(gold, pred, timeout_seconds=None), str(pred[-1]))


def _math_with_deadline(completion: str, answer: str, timeout_s: float) -> Verdict:
    """`_math_compare` under a SIGALRM deadline; timeouts and errors become reward-0 verdicts."""

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _math_compare(completion, answer)
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
        try:
            verdict = _math_with_deadline(request["completion"], request["answer"], request["timeout_s"])
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

    def call(self, completion: str, answer: str, timeout_s: float) -> Verdict:
        """One verdict from the worker, waiting at most `timeout_s` plus a grace period."""
        with self.lock:
            proc = self._ensure()
            request = json.dumps({"completion": completion, "answer": answer, "timeout_s": timeout_s})
            try:
                proc.stdin.write(request.encode() + b"\n")
                proc.stdin.flush()
            except OSError:
                line = b""
            else:
                line = self._read_line(time.monotonic() + timeout_s + MATH_GRACE_S)
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
        self.owner, self.pending = os.getpid(), b""
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


def math_verify(completion: str, answer: str, timeout_s: float = 5.0) -> Verdict:
    """Is the completion's final answer (last \\boxed, else `####`, else "answer is"/last number) equal to `answer`?"""
    return _MATH_WORKER.call(completion, answer, timeout_s)


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
import ctypes, json, os, posix, re, resource, signal, sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE = 1 << 18
LOCKED_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid nodev noexec *atime: a user namespace must keep them
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
BLOCKED_CALLS = ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid",
                 "setpgrp")
BLOCKED_MODULES = ("subprocess", "_posixsubprocess", "socket", "_socket", "multiprocessing", "_multiprocessing",
                   "ctypes", "_ctypes", "asyncio", "pty")


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


def lock_down(libc):
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after the uid change, which clears it

    def blocked(*args, **kwargs):
        raise PermissionError("operation not permitted in the sandbox")

    for name in BLOCKED_CALLS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, blocked)
    for name in BLOCKED_MODULES:
        sys.modules[name] = None
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


def run(code, tests):
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as e:  # SystemExit included: exiting early must not skip the tests as passed
        return {"passed": 0, "total": len(tests), "error": "the program raised " + describe(e, "")}
    passed, first = 0, None
    for test in tests:
        try:
            exec(compile(test, "test", "exec"), namespace)
            passed += 1
        except BaseException as e:
            first = first or describe(e, test.strip())
    return {"passed": passed, "total": len(tests), "error": first}


def main():
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    write, dumps, exit_now, fd = os.write, json.dumps, os._exit, job["result_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    work, pid_namespace = isolate(libc, job["tmpfs_mb"], dropping=job["uid"] is not None)
    if pid_namespace:
        enter_pid_namespace(libc)
    limit(job)
    if job["uid"] is not None:
        drop_privileges(job["uid"], work)
    os.chdir(work)
    lock_down(libc)
    result = run(job.pop("code"), job.pop("tests"))
    write(fd, (job.pop("nonce") + " " + dumps(result) + "\n").encode())
    exit_now(0)  # skip atexit handlers and finalizers the program may have registered


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
        job = {"code": code, "tests": tests, "nonce": nonce, "result_fd": write_fd, "uid": uid,
               "cpu_s": int(timeout_s) + 1, "memory_bytes": memory_mb << 20, "fsize_bytes": FSIZE_BYTES,
               "max_procs": MAX_PROCS, "tmpfs_mb": TMPFS_MB}
        output = os.path.join(workdir, "output.txt")
        with open(output, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _HARNESS], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=SANDBOX_ENV,
                                    pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        try:
            proc.communicate(json.dumps(job).encode(), timeout=timeout_s)
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


def _failure(run: _Run, timeout_s: float) -> str | None:
    """Why a run's report can't be trusted, as feedback; None if it can."""
    if run.timed_out:
        return f"timed out after {timeout_s:g}s"
    if run.returncode < 0:
        why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGKILL: " (CPU or memory limit?)",
               signal.SIGSEGV: " (stack overflow or memory limit?)"}.get(-run.returncode, "")
        try:
            name = signal.Signals(-run.returncode).name
        except ValueError:  # real-time signals have no name
            name = f"signal {-run.returncode}"
        return f"killed by {name}{why}"
    if run.returncode != 0 or run.result is None:
        last = next((line for line in reversed(run.output_tail.splitlines()) if line.strip()), "")
        reason = f"exited with code {run.returncode} before reporting results"
        return f"{reason}: {_shown(last, 200)}" if last else reason
    return None


def code_verify(completion: str, tests: list[str], timeout_s: float = 5.0, memory_mb: int = 512) -> Verdict:
    """Fraction of assert `tests` that the completion's last Python block passes, run in the sandbox."""
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
