"""The code sandbox: `code_verify` runs a completion's last Python block against assert tests in a child process.

The child (`harness.py`) runs the program in one process under a seccomp filter and the tests in another that
receives only plain values from it, both inside new PID, network and mount namespaces (read-only mounts, private
tmpfs), as a fresh uid when the parent is root, under per-process rlimits. It does not hide what the program's
uid may read and has no cgroup (CPU and memory are bounded per process by rlimits and the timeout); where the
kernel refuses a layer (user namespaces, seccomp) the others are all that is left, so without root and user
namespaces the program can write the user's files. The details follow.

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

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.example import Verdict, one_line

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n`]*\n(.*?)```", re.DOTALL)

FSIZE_BYTES = 10 << 20
"""Largest file (stdout/stderr included) the sandboxed program may write."""
MAX_PROCS = 8
"""RLIMIT_NPROC of the sandbox (processes and threads; per sandbox only when a fresh uid is used)."""
TMPFS_MB = 16
"""Size of each private tmpfs (the working directory lives in the one on /tmp)."""
OUTPUT_TAIL_BYTES = 64 << 10
"""How much of the end of the child's stdout and stderr is read back (for a crash's feedback line)."""
RESULT_CAP_BYTES = 1 << 20
"""Most bytes read from the result pipe."""
SANDBOX_ENV = {"PATH": "/usr/bin:/bin"}
"""The child's whole environment."""

HARNESS = Path(__file__).with_name("harness.py")
"""The sandbox child, a stdlib-only script: its text runs as `python -I -S -B -c`, with the job as JSON on stdin."""
_HARNESS_SOURCE = HARNESS.read_text(encoding="utf-8")


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
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _HARNESS_SOURCE],
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                    env=SANDBOX_ENV, pass_fds=(write_fd,), start_new_session=True)
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
    """Feedback for a process killed by `signum`, with the limit that likely did it."""
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
        return f"{reason}: {one_line(last, 200)}" if last else reason
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
