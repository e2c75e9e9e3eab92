"""Code sandbox: hostile programs score 0 with a clear feedback line and change nothing outside their temp dir."""
import hashlib
import os
import re
import socket
import tempfile
import textwrap
import time
from pathlib import Path
from string import Template

import pytest

from common.verifiers import code_verify

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 2.0
IS_ROOT = os.geteuid() == 0
TESTS = ["assert f() == 1"]

# What a determined program does first: re-import the modules the sandbox replaced by stubs.
UNSTUB = """
import sys
for name in ("ctypes", "_ctypes", "socket", "_socket"):
    sys.modules.pop(name, None)
import ctypes
libc = ctypes.CDLL(None)
"""

BACKGROUND_CHILD = UNSTUB + """
import time
child = libc.fork()
if child == 0:
    ESCAPE_GROUP
    libc.prctl(15, b"$comm", 0, 0, 0)  # PR_SET_NAME, so the test can look for it
    time.sleep(1000)
time.sleep(0.2)
def f(): return 0
raise SystemExit("forked" if child > 0 else "fork failed")
"""

# name -> (program, feedback regex, root only). f() == 1 holds only where the program escaped, and
# $placeholders are filled per test. Root-only cases are contained by the per-run uid or the PID
# namespace; without root the latter needs user namespaces, and where the host forbids them these
# programs would really kill the test process or leave a process behind, so they are skipped.
HOSTILE = {
    "fork_bomb": ("""
        import os
        def f(): return 1
        while True:
            os.fork()
        """, r"PermissionError: operation not permitted in the sandbox", False),
    "fork_bomb_unstubbed": (UNSTUB + textwrap.dedent("""
        def f(): return 1
        while True:
            libc.fork()
        """), r"timed out after 2s", False),
    "infinite_loop": ("""
        def f(): return 1
        while True:
            pass
        """, r"timed out after 2s", False),
    "infinite_loop_in_test": ("""
        def f():
            while True:
                pass
        """, r"timed out after 2s", False),
    "sleep_past_timeout": ("""
        import time
        def f(): return 1
        time.sleep(100)
        """, r"timed out after 2s", False),
    "memory_bomb": ("""
        def f(): return 1
        x = bytearray(10 * 1024 ** 3)
        """, r"MemoryError: memory limit exceeded", False),
    "memory_bomb_gradual": ("""
        def f(): return 1
        chunks = []
        while True:
            chunks.append(bytearray(10 ** 7))
        """, r"MemoryError", False),
    "huge_file": ("""
        def f(): return 1
        with open("big", "wb") as fh:
            while True:
                fh.write(b"x" * 2 ** 20)
        """, r"OSError: \[Errno 27\] File too large", False),
    "many_files": ("""
        def f(): return 1
        for i in range(10 ** 6):
            open(f"big{i}", "wb").write(b"x" * (5 << 20))
        """, r"OSError: \[Errno 28\] No space left on device", False),
    "print_gigabytes": ("""
        def f(): return 1
        while True:
            print("x" * 10 ** 6)
        """, r"OSError: \[Errno 27\] File too large", False),
    "write_outside": ("""
        def f(): return 0
        for path in ("$sentinel", "$escape", "$repo/common/data.py"):
            try:
                open(path, "a").write("pwned")
            except OSError:
                pass
        """, r"assert f\(\) == 1", False),
    "write_shared_tmp": ("""
        def f(): return 0
        open("$shared_tmp", "w").write("pwned")
        open("/dev/shm/$token", "w").write("pwned")
        """, r"assert f\(\) == 1", False),
    "delete_parent_dirs": ("""
        import shutil
        def f(): return 0
        for path in ("..", "../..", "$repo", "$sentinel_dir"):
            shutil.rmtree(path, ignore_errors=True)
        """, r"(assert f\(\) == 1|timed out)", False),
    "read_environment": ("""
        import os
        def seen():
            text = str(dict(os.environ))
            for pid in ("1", str(os.getppid()), "$parent_pid"):
                try:
                    text += open(f"/proc/{pid}/environ").read()
                except OSError:
                    pass
            return "hunter2" in text
        def f(): return 1 if seen() else 0
        """, r"assert f\(\) == 1", False),
    "socket_import": ("""
        import socket
        def f(): return 1
        """, r"ModuleNotFoundError: import of socket halted", False),
    "socket_connect_unstubbed": (UNSTUB + textwrap.dedent("""
        import socket
        def f(): return 1
        socket.create_connection(("127.0.0.1", $port), timeout=1)
        """), r"OSError", False),
    "os_system": ("""
        import os
        def f(): return 1
        os.system("touch $escape")
        """, r"PermissionError", False),
    "subprocess_run": ("""
        import subprocess
        def f(): return 1
        subprocess.run(["touch", "$escape"])
        """, r"ModuleNotFoundError: import of subprocess halted", False),
    "kill_parent": ("""
        import os
        def f(): return 1
        os.kill(os.getppid(), 9)
        """, r"PermissionError", False),
    "kill_parent_unstubbed": (UNSTUB + textwrap.dedent("""
        import os
        def f(): return 0
        libc.kill($parent_pid, 9)
        libc.kill(os.getppid(), 9)
        """), r"(assert f\(\) == 1|killed by SIGKILL)", True),
    "segfault": (UNSTUB + textwrap.dedent("""
        def f(): return 1
        ctypes.string_at(0)
        """), r"killed by SIGSEGV", False),
    "raise_own_limits": ("""
        import resource
        def f(): return 1
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        """, r"ValueError: not allowed to raise maximum limit", False),
    "deep_recursion": ("""
        def f(n=0):
            return f(n + 1)
        """, r"RecursionError", False),
    "deep_recursion_unlimited": ("""
        import sys
        sys.setrecursionlimit(10 ** 9)
        def f(n=0):
            return f(n + 1)
        """, r"(MemoryError|SIGSEGV|RecursionError|timed out)", False),
    "sys_exit_before_tests": ("""
        import sys
        def f(): return 1
        sys.exit(0)
        """, r"the program raised SystemExit: 0", False),
    "os_exit_before_tests": ("""
        import os
        def f(): return 1
        os._exit(0)
        """, r"exited with code 0 before reporting results", False),
    "forge_result": ("""
        import json, os
        def f(): return 1
        fake = json.dumps({"passed": 1, "total": 1, "error": None})
        for fd in range(1, 64):
            for nonce in ("", "0" * 32 + " "):
                try:
                    os.write(fd, (nonce + fake + "\\n").encode())
                except OSError:
                    pass
        os._exit(0)
        """, r"exited with code 0 before reporting results", False),
    "background_child": (BACKGROUND_CHILD.replace("ESCAPE_GROUP", "pass"), r"SystemExit: forked", False),
    "escaped_background_child": (BACKGROUND_CHILD.replace("ESCAPE_GROUP", "libc.setsid()"),
                                 r"SystemExit: forked", True),
}


def repo_files() -> set[str]:
    """Relative paths of the repository's files (other sessions may add files; none should vanish)."""
    skip = {".git", "__pycache__", ".pytest_cache"}
    return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)}


def named(comm: str) -> list[int]:
    """Live (non-zombie) processes whose name is `comm`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == comm and "State:\tZ" not in (proc / "status").read_text():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture()
def listener():
    """A TCP server on 127.0.0.1 that no sandboxed program should reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.fixture()
def sandbox_tmp(tmp_path, monkeypatch):
    """The parent-side temp dirs of the sandbox go here, to check that they are removed."""
    path = tmp_path / "sandboxes"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program(name, tmp_path, sandbox_tmp, monkeypatch, listener):
    program, feedback, root_only = HOSTILE[name]
    if root_only and not IS_ROOT:
        pytest.skip("contained by the per-run uid, which needs the parent to run as root")
    monkeypatch.setenv("CLEANSD_TEST_SECRET", "hunter2")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("original")
    token = f"cleansd-escape-{os.getpid()}-{name}"
    escape, shared_tmp, comm = ROOT / token, Path("/tmp") / token, f"sbx{os.getpid()}"[:15]
    source = Template(textwrap.dedent(program)).substitute(
        sentinel=sentinel, sentinel_dir=tmp_path, escape=escape, repo=ROOT, shared_tmp=shared_tmp, token=token,
        port=listener.getsockname()[1], parent_pid=os.getpid(), comm=comm)
    before, own_hash = repo_files(), hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    start = time.monotonic()
    v = code_verify(f"```python\n{source}\n```", TESTS, timeout_s=TIMEOUT_S, memory_mb=256)
    elapsed = time.monotonic() - start

    assert v.reward == 0.0 and not v.correct, v.feedback
    assert re.search(feedback, v.feedback), v.feedback
    assert "\n" not in v.feedback and len(v.feedback) < 400
    assert elapsed < TIMEOUT_S + 5
    assert sentinel.read_text() == "original"
    assert not escape.exists() and not shared_tmp.exists() and not Path("/dev/shm", token).exists()
    assert before - repo_files() == set()
    assert hashlib.sha256(Path(__file__).read_bytes()).hexdigest() == own_hash
    assert list(sandbox_tmp.iterdir()) == []
    with pytest.raises(socket.timeout):
        listener.accept()
    deadline = time.monotonic() + 2  # background children die with the sandbox
    while named(comm) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not named(comm)


SOLUTION = "Here you go:\n```python\ndef f(x):\n    return x * x\n```\n"


def test_correct_function_passes(sandbox_tmp):
    v = code_verify(SOLUTION, ["assert f(2) == 4", "assert f(-3) == 9", "assert f(0) == 0"])
    assert (v.reward, v.correct, v.feedback) == (1.0, True, "passed 3 of 3 tests")
    assert list(sandbox_tmp.iterdir()) == []


def test_partial_credit_names_first_failure():
    tests = ["assert f(2) == 4", "assert f(3) == 6", "assert f(1) == 1", "assert 1 / 0", "assert f(4) == 8"]
    v = code_verify(SOLUTION, tests)
    assert v.reward == pytest.approx(2 / 5) and not v.correct
    assert v.feedback == "passed 2 of 5 tests; first failure: AssertionError: assert f(3) == 6"


def test_error_message_is_reported():
    v = code_verify(SOLUTION, ["assert f(1) == 1", "assert g(1) == 1"])
    assert v.feedback == "passed 1 of 2 tests; first failure: NameError: name 'g' is not defined"


def test_program_may_print_use_files_and_stdlib():
    program = textwrap.dedent("""
        import collections, fractions, math
        print("debug output")
        open("scratch.txt", "w").write("5")
        def f():
            return math.isqrt(int(open("scratch.txt").read()) ** 2) + len(collections.Counter()) * fractions.Fraction(1)
        """)
    assert code_verify(f"```python\n{program}```", ["assert f() == 5"]).correct


def test_main_guard_does_not_run():
    assert code_verify("```python\ndef f(): return 1\nif __name__ == '__main__':\n    input()\n```", TESTS).correct


def test_no_tests():
    assert code_verify(SOLUTION, []).feedback == "no tests to run"


def test_missing_code_block_and_syntax_error():
    assert code_verify("def f(): return 1", TESTS) == code_verify("", TESTS)
    assert code_verify("def f(): return 1", TESTS).feedback == "no code block found"
    v = code_verify("```python\ndef f(:\n```", TESTS)
    assert v.reward == 0.0 and "the program raised SyntaxError" in v.feedback
