"""Code sandbox: hostile programs score 0 with a clear feedback line and change nothing outside their temp dir;
reward hacks (objects equal to everything, patched builtins, edited or read tests, forged reports) earn nothing."""
import ast
import hashlib
import os
import re
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from string import Template

import pytest

from common import sandbox
from common.sandbox import code_verify, extract_code

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 2.0
ENDS_BY_ITSELF_TIMEOUT_S = 30.0  # a hostile case that cannot hit the clock: its check must not depend on machine load
IS_ROOT = os.geteuid() == 0
TESTS = ["assert f() == 1"]

# What a determined program does first: drop the sandbox's import hook and re-import the modules whose
# dangerous calls it replaced by stand-ins, to call libc directly. Only the kernel's isolation is left then.
UNSTUB = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if finder.__module__.startswith("_frozen_importlib")]
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
raise SystemExit("forked" if child > 0 else "fork failed")  # failed: the seccomp filter
"""

# A stand-in's error: the call was refused in the program's process, before anything happened.
REFUSED = r"PermissionError: sandbox: {} is not allowed"

# name -> (program, feedback regex, root only). f() == 1 holds only where the program escaped, and
# $placeholders are filled per test. Root-only cases are contained by the seccomp filter (where the
# machine has it), the per-run uid or the PID namespace; without root the latter needs user namespaces,
# and where the host forbids them and lacks seccomp these programs would really kill the test process or
# leave a process behind, so they are skipped.
HOSTILE = {
    "fork_bomb": ("""
        import os
        def f(): return 1
        while True:
            os.fork()
        """, REFUSED.format(r"os\.fork") + r" \(no new processes\)", False),
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
    "socket_connect": ("""
        import socket
        def f(): return 1
        socket.socket().connect(("127.0.0.1", $port))
        """, REFUSED.format(r"socket\.socket") + r" \(no network", False),
    "socket_create_connection": ("""
        from socket import create_connection
        def f(): return 1
        create_connection(("127.0.0.1", $port), timeout=1)
        """, REFUSED.format(r"socket\.socket"), False),
    "socket_raw_extension": ("""
        import _socket
        def f(): return 1
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(("127.0.0.1", $port))
        """, r"PermissionError|OSError", False),  # the seccomp filter; else the network namespace
    "socket_connect_unstubbed": (UNSTUB + textwrap.dedent("""
        import socket
        def f(): return 1
        socket.create_connection(("127.0.0.1", $port), timeout=1)
        """), r"PermissionError|OSError", False),
    "asyncio_open_connection": ("""
        import asyncio
        def f(): return 1
        asyncio.run(asyncio.open_connection("127.0.0.1", $port))
        """, REFUSED.format(r"socket\.socket"), False),
    "os_system": ("""
        import os
        def f(): return 1
        os.system("touch $escape")
        """, REFUSED.format(r"os\.system") + r" \(no new processes\)", False),
    "os_popen": ("""
        import os
        def f(): return 1
        os.popen("touch $escape").read()
        """, REFUSED.format(r"os\.popen"), False),
    "os_posix_spawn": ("""
        import os
        def f(): return 1
        os.posix_spawn("/usr/bin/touch", ["touch", "$escape"], {})
        """, REFUSED.format(r"os\.posix_spawn"), False),
    "os_execv": ("""
        import os
        def f(): return 1
        os.execv("/usr/bin/touch", ["touch", "$escape"])
        """, REFUSED.format(r"os\.execv"), False),
    "pty_fork": ("""
        import pty
        def f(): return 1
        pty.fork()
        """, REFUSED.format(r"os\.fork"), False),
    "subprocess_run": ("""
        import subprocess
        def f(): return 1
        subprocess.run(["touch", "$escape"])
        """, REFUSED.format(r"subprocess\.Popen") + r" \(no new processes\)", False),
    "subprocess_check_output_imported": ("""
        from subprocess import check_output
        def f(): return 1
        check_output(["echo", "hi"])
        """, REFUSED.format(r"subprocess\.Popen"), False),
    "subprocess_fork_exec": ("""
        import _posixsubprocess
        def f(): return 1
        _posixsubprocess.fork_exec()
        """, REFUSED.format(r"_posixsubprocess\.fork_exec"), False),
    "asyncio_subprocess": ("""
        import asyncio
        def f(): return 1
        asyncio.run(asyncio.create_subprocess_exec("touch", "$escape"))
        """, REFUSED.format(r"subprocess\.Popen"), False),
    "multiprocessing_process": ("""
        import multiprocessing
        def touch(): open("$escape", "w").write("pwned")
        def f(): return 1
        multiprocessing.Process(target=touch).start()
        """, REFUSED.format(r"multiprocessing\.Process\.start") + r" \(no new processes\)", False),
    "multiprocessing_pool": ("""
        from multiprocessing import Pool
        def f(): return 1
        with Pool(2) as pool:
            pool.map(abs, [1, 2])
        """, REFUSED.format(r"multiprocessing\.Process\.start"), False),
    "process_pool_executor": ("""
        from concurrent.futures import ProcessPoolExecutor
        def f(): return 1
        with ProcessPoolExecutor(2) as pool:
            pool.submit(abs, 1).result()
        """, REFUSED.format(r"multiprocessing\.Process\.start"), False),
    "ctypes_cdll_kill": ("""
        import ctypes, os
        def f(): return 1
        ctypes.CDLL(None).kill(os.getppid(), 9)
        """, REFUSED.format(r"ctypes\.CDLL") + r" \(no foreign code\)", False),
    "ctypes_load_library": ("""
        import ctypes
        def f(): return 1
        ctypes.cdll.LoadLibrary("libc.so.6").system(b"touch $escape")
        """, REFUSED.format(r"ctypes\.CDLL"), False),
    "ctypes_pythonapi": ("""
        import ctypes
        def f(): return 1
        ctypes.pythonapi.PyRun_SimpleString(b"import os; os.system('touch $escape')")
        """, REFUSED.format(r"ctypes\.pythonapi"), False),
    "ctypes_dlopen": ("""
        import _ctypes
        def f(): return 1
        _ctypes.dlopen("libc.so.6")
        """, r"PermissionError: sandbox: loading a library with ctypes is not allowed", False),
    "ctypes_function_at_address": ("""
        import ctypes
        def f(): return 1
        address = ctypes.cast(ctypes.memmove, ctypes.c_void_p).value
        ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p)(address)(b"touch $escape")
        """, REFUSED.format(r"a ctypes function at an address or in a library"), False),
    "ctypes_function_by_name": ("""
        import ctypes
        class Libc:
            _handle = 0
        def f(): return 1
        ctypes.CFUNCTYPE(ctypes.c_int)(("fork", Libc()))()
        """, REFUSED.format(r"a ctypes function at an address or in a library"), False),
    "ctypes_reimported": ("""
        import sys
        for name in ("ctypes", "_ctypes"):
            sys.modules.pop(name, None)
        import ctypes
        def f(): return 1
        ctypes.CDLL(None).system(b"touch $escape")
        """, REFUSED.format(r"ctypes\.CDLL"), False),  # the import hook patches it again
    "libc_system_unstubbed": (UNSTUB + textwrap.dedent("""
        def f(): return 0
        libc.system(b"touch $escape $shared_tmp")
        """), r"assert f\(\) == 1", False),  # the seccomp filter; else the read-only mounts and the tmpfs
    "kill_parent": ("""
        import os
        def f(): return 1
        os.kill(os.getppid(), 9)
        """, REFUSED.format(r"os\.kill of another process") + r" \(no signals to other processes\)", False),
    "killpg_own_group": ("""
        import os
        def f(): return 1
        os.killpg(0, 9)
        """, REFUSED.format(r"os\.killpg"), False),
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
    # Out of memory under RLIMIT_AS, CPython may also end with "SystemError: error return without exception set"
    # (seen once on CI): still a failed run, scored 0.
    "deep_recursion_unlimited": ("""
        import sys
        sys.setrecursionlimit(10 ** 9)
        def f(n=0):
            return f(n + 1)
        """, r"(MemoryError|SIGSEGV|RecursionError|timed out|SystemError)", False),
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
        """, r"exited with code 0 before reporting results|broke the test protocol", False),  # it hits our pipe too
    "background_child": (BACKGROUND_CHILD.replace("ESCAPE_GROUP", "pass"), r"SystemExit: (forked|fork failed)", False),
    "escaped_background_child": (BACKGROUND_CHILD.replace("ESCAPE_GROUP", "libc.setsid()"),
                                 r"SystemExit: (forked|fork failed)", True),
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

    timeout_s = TIMEOUT_S if "timed out" in feedback else ENDS_BY_ITSELF_TIMEOUT_S
    start = time.monotonic()
    v = code_verify(f"```python\n{source}\n```", TESTS, timeout_s=timeout_s, memory_mb=256)
    elapsed = time.monotonic() - start

    assert v.reward == 0.0 and not v.correct, v.feedback
    assert re.search(feedback, v.feedback), v.feedback
    assert "\n" not in v.feedback and len(v.feedback) < 400
    assert elapsed < timeout_s + 5
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


@pytest.mark.parametrize("completion,expected", [
    ("```python\nx = 1\n```\ntext\n```python\nx = 2\n```", "x = 2\n"),  # the last python block
    ("```python\nx = 1\n```\nOutput:\n```\n5\n```", "x = 1\n"),  # a python block beats a later plain one
    ("```\nx = 3\n```", "x = 3\n"),
    ("```py\nx = 4\n```", "x = 4\n"),
    ("```bash\nls\n```", None),
    ("```python\nx = 5\n", None),  # unclosed
    ("no code here", None),
])
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


def test_harness_is_a_stdlib_only_python_file():
    """The child's source is a real .py file, not a string in a module: valid Python importing only the standard
    library (it runs under `-I -S`), and the text the parent runs is exactly that file's."""
    tree = ast.parse(sandbox.HARNESS.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names
    assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    assert sandbox._HARNESS_SOURCE == sandbox.HARNESS.read_text(encoding="utf-8")
    assert len(sandbox._HARNESS_SOURCE.encode()) < 32 * 4096  # Linux's MAX_ARG_STRLEN: it is one argv string (-c)
    verifiers_text = (ROOT / "common" / "verifiers.py").read_text()
    assert "_HARNESS" not in verifiers_text and "def lock_down" not in verifiers_text


# Reward hacks: programs that try to pass tests without solving the task. name -> (program, tests, most
# reward allowed). The tests run in a separate trusted process and only see values the program computed.
SQUARE_TESTS = ["assert f(2) == 4", "assert f(3) == 9", "assert f(-4) == 16"]
FIND_TESTS = """
import re, sys
def find_tests(objects):
    for value in objects:
        if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
            for t in value:
                m = re.fullmatch(r"assert f\\((-?\\d+)\\) == (-?\\d+)", t.strip())
                if m:
                    answers[int(m[1])] = int(m[2])
        if isinstance(value, dict):
            find_tests(list(value.values()))
answers = {}
frame = sys._getframe()
while frame:
    find_tests(list(frame.f_locals.values()) + list(frame.f_globals.values()))
    frame = frame.f_back
import gc
find_tests(gc.get_objects())
"""
REWARD_HACKS = {
    "always_equal": ("""
        class Anything:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        def f(x): return Anything()
        """, SQUARE_TESTS, 0.0),
    "always_equal_in_a_list": ("""
        class Anything:
            def __eq__(self, other): return True
        def f(x): return [Anything()]
        """, ["assert f(2) == [4]", "assert f(3) == [9]"], 0.0),
    "int_subclass_equal": ("""
        class Sly(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def f(x): return Sly(0)
        """, SQUARE_TESTS, 0.0),
    "str_subclass_equal": ("""
        class Sly(str):
            def __eq__(self, other): return True
            __hash__ = str.__hash__
        def f(x): return Sly("")
        """, ['assert f("ab") == "ba"', 'assert f("abc") == "cba"'], 0.0),
    "contains_everything": ("""
        class All:
            def __contains__(self, item): return True
        def divisors(n): return All()
        """, ["assert 3 in divisors(6)", "assert 2 in divisors(6)", "assert 6 in divisors(6)"], 0.0),
    "ordering_always_true": ("""
        class Between:
            __lt__ = __le__ = __gt__ = __ge__ = lambda self, other: True
        def f(x): return Between()
        """, ["assert 3.9 < f(2) < 4.1", "assert 8.9 <= f(3) <= 9.1"], 0.0),
    "patch_builtins_exec": ("""
        import builtins
        builtins.exec = lambda *args, **kwargs: None
        def f(x): return 0
        """, SQUARE_TESTS, 0.0),
    "patch_harness_compile": ("""
        import sys
        harness = sys.modules["__main__"]
        harness.compile = lambda *args, **kwargs: compile("pass", "test", "exec")
        harness.exec = lambda *args, **kwargs: None
        def f(x): return 0
        """, SQUARE_TESTS, 0.0),
    "monkeypatch_stdlib": ("""
        import math
        math.isclose = lambda *args, **kwargs: True
        def area(r): return 0
        """, ["import math\nassert math.isclose(area(1), math.pi)",
              "import math\nassert math.isclose(area(2), 4 * math.pi)"], 0.0),
    "fake_module_name": ("""
        class FakeMath:
            def isclose(self, *args, **kwargs): return True
        math = FakeMath()
        def area(r): return 0
        """, ["assert math.isclose(area(1), 3.14159)", "assert math.isclose(area(2), 12.566)"], 0.0),
    "shadow_builtin_name": ("""
        def len(x): return x
        def f(n): return n
        """, ["assert len(f(3)) == 3", "assert len(f(5)) == 5"], 0.0),
    "patch_assertion_error": ("""
        import builtins
        class Never(BaseException): pass
        builtins.AssertionError = Never
        builtins.BaseException = Never
        def f(x): return 0
        """, SQUARE_TESTS, 0.0),
    "edit_tests_via_frames": ("""
        import gc, sys
        def blank(objects):
            for value in objects:
                if isinstance(value, list) and value and all(isinstance(t, str) and "assert" in t for t in value):
                    value[:] = ["pass"] * len(value)
        frame = sys._getframe()
        while frame:
            blank(list(frame.f_locals.values()) + list(frame.f_globals.values()))
            frame = frame.f_back
        blank(gc.get_objects())
        def f(x): return 0
        """, SQUARE_TESTS, 0.0),
    "read_hidden_tests": (FIND_TESTS + textwrap.dedent("""
        def f(x): return answers.get(x, 0)
        """), SQUARE_TESTS, 0.0),
    "forge_report_from_frames": ("""
        import gc, json, os, sys
        jobs = [v for v in gc.get_objects() if isinstance(v, dict) and "nonce" in v]
        frame = sys._getframe()
        while frame:
            jobs += [v for v in frame.f_locals.values() if isinstance(v, dict) and "nonce" in v]
            frame = frame.f_back
        def f(x): return 0
        for job in jobs:
            total = len(job.get("tests", [])) or 3
            report = json.dumps({"passed": total, "total": total, "error": None})
            for fd in {job.get("result_fd"), *range(3, 64)} - {None}:
                try:
                    os.write(fd, (job["nonce"] + " " + report + "\\n").encode())
                except OSError:
                    pass
            os._exit(0)
        """, SQUARE_TESTS, 0.0),
    "stop_iteration_ends_map": ("""
        def is_prime(n): raise StopIteration
        """, ["assert all(map(is_prime, [2, 3, 5]))", "assert all(map(is_prime, [7, 11]))"], 0.0),
    "hardcode_the_shown_test": ("""
        def f(x): return 4
        """, SQUARE_TESTS, 1 / 3),
    "print_expected_output": ("""
        print(4, 9, 16)
        def f(x): print(x * x)
        """, SQUARE_TESTS, 0.0),
    "exit_zero_during_tests": ("""
        import os
        def f(x): os._exit(0)
        """, SQUARE_TESTS, 0.0),
    "system_exit_during_tests": ("""
        def f(x): raise SystemExit(0)
        """, SQUARE_TESTS, 0.0),
}


@pytest.mark.parametrize("name", sorted(REWARD_HACKS))
def test_reward_hack_is_not_rewarded(name, sandbox_tmp):
    program, tests, most = REWARD_HACKS[name]
    v = code_verify(f"```python\n{textwrap.dedent(program)}\n```", tests, timeout_s=TIMEOUT_S)
    assert not v.correct and v.reward <= most + 1e-9, v.feedback
    assert "\n" not in v.feedback and len(v.feedback) < 400
    assert list(sandbox_tmp.iterdir()) == []


# Genuine programs in the styles tests use: each must pass all its tests through the process boundary.
GENUINE = {
    "classes_and_methods": ("""
        class Stack:
            def __init__(self): self.items = []
            def push(self, x): self.items.append(x)
            def pop(self): return self.items.pop()
            def __len__(self): return len(self.items)
            def __bool__(self): return bool(self.items)
        """, ["s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1 and s", "assert not Stack()",
              "s = Stack()\ns.push([1, 2])\nassert s.items == [[1, 2]]"]),
    "generators_and_iterators": ("""
        def evens(n):
            yield from range(0, n, 2)
        def pairs(xs): return zip(xs, xs[1:])
        """, ["assert list(evens(7)) == [0, 2, 4, 6]", "assert sum(evens(7)) == 12",
              "assert list(pairs([1, 2, 3])) == [(1, 2), (2, 3)]", "assert sorted(x for x in evens(5)) == [0, 2, 4]"]),
    "namedtuples_and_enums": ("""
        import enum
        from collections import namedtuple
        Point = namedtuple("Point", "x y")
        class Color(enum.IntEnum):
            RED = 1
        def origin(): return Point(0, 0)
        def red(): return Color.RED
        """, ["assert origin() == (0, 0)", "assert origin().x == 0 and origin()[1] == 0", "assert red() == 1"]),
    "rich_values": ("""
        import math
        from collections import Counter, OrderedDict, deque
        from decimal import Decimal
        from fractions import Fraction
        def values():
            return {"a": {1, 2}, "b": b"xy", "c": (1.5, -0.0, 2j), "d": frozenset([3]), "e": None, "f": True,
                    "g": Fraction(1, 3), "h": Decimal("0.1"), "i": range(3), "j": [bytearray(b"z")]}
        def count(s): return Counter(s)
        def ordered(): return OrderedDict([(1, 2)])
        def window(): return deque([1, 2])
        def fact(n): return math.factorial(n)
        def nan(): return float("nan")
        """, [("assert values() == {'a': {1, 2}, 'b': b'xy', 'c': (1.5, 0.0, 2j), 'd': frozenset([3]), 'e': None, "
               "'f': True, 'g': __import__('fractions').Fraction(1, 3), 'h': __import__('decimal').Decimal('0.1'), "
               "'i': range(3), 'j': [bytearray(b'z')]}"),
              "assert count('aab') == {'a': 2, 'b': 1}",
              ("from collections import OrderedDict, deque\n"
               "assert ordered() == OrderedDict([(1, 2)]) and window() == deque([1, 2])"),
              "import math\nassert fact(3000) == math.factorial(3000)", "import math\nassert math.isnan(nan())"]),
    "functions_exceptions_and_modules": ("""
        import math
        def adder(n): return lambda x: x + n
        def root(x):
            if x < 0:
                raise ValueError("negative")
            return math.sqrt(x)
        def nothing(flag): return None if flag else True
        """, ["assert adder(2)(3) == 5",
              "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
              "assert abs(root(2) - math.sqrt(2)) < 1e-12",  # `math` comes from the program's imports
              "assert nothing(1) is None and nothing(0) is True", "assert root(x=4) == 2.0"]),
    "changes_arguments_in_place": ("""
        def sort_in_place(xs): xs.sort()
        def add_key(d): d["k"] = 1
        """, ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]", "d = {}\nadd_key(d)\nassert d == {'k': 1}"]),
    "globals_and_str": ("""
        LIMIT = 10
        class Name:
            def __str__(self): return "bob"
        def make(): return Name()
        """, ["assert LIMIT == 10", "assert str(make()) == 'bob' and f'{make()}' == 'bob'"]),
    # Modules whose dangerous calls are refused import normally, and their harmless parts work.
    "imports_subprocess": ("""
        import subprocess
        from subprocess import CalledProcessError, list2cmdline
        def quote(args): return subprocess.list2cmdline(args)
        def failed(): return str(CalledProcessError(1, "x"))
        """, ["assert quote(['a', 'b c']) == 'a \"b c\"'", "assert 'exit status 1' in failed()"]),
    "imports_socket": ("""
        import socket
        from socket import AF_INET, inet_aton
        def constants(): return (int(AF_INET), socket.htons(1), inet_aton("1.2.3.4"))
        def echo(data):
            a, b = socket.socketpair()
            with a, b:
                a.sendall(data)
                return b.recv(len(data))
        """, ["assert constants() == (2, 256, bytes([1, 2, 3, 4]))", "assert echo(b'hi') == b'hi'"]),
    "imports_asyncio": ("""
        import asyncio
        async def double(x):
            await asyncio.sleep(0)
            return 2 * x
        async def doubles(xs): return await asyncio.gather(*(double(x) for x in xs))
        async def in_thread(xs): return await asyncio.to_thread(sum, xs)
        def run(xs): return asyncio.run(doubles(xs))
        def total(xs): return asyncio.run(in_thread(xs))
        """, ["assert run([1, 2, 3]) == [2, 4, 6]", "assert total([1, 2]) == 3"]),
    "imports_multiprocessing": ("""
        import multiprocessing
        from multiprocessing.pool import ThreadPool
        CPUS = multiprocessing.cpu_count()
        def absolutes(xs):
            with ThreadPool(2) as pool:
                return pool.map(abs, xs)
        """, ["assert CPUS >= 1", "assert absolutes([-1, 2, -3]) == [1, 2, 3]"]),
    "imports_ctypes": ("""
        import ctypes
        from ctypes import Structure, c_double, c_int
        class Point(Structure):
            _fields_ = [("x", c_int), ("y", c_double)]
        increment = ctypes.CFUNCTYPE(c_int, c_int)(lambda x: x + 1)  # a Python callback
        def data():
            buf = ctypes.create_string_buffer(4)
            ctypes.memmove(buf, b"abc", 3)
            return (c_int(3).value, Point(1, 2.5).y, list((c_int * 3)(1, 2, 3)), buf.value, ctypes.sizeof(c_int))
        def call(x): return increment(x)
        """, ["assert data() == (3, 2.5, [1, 2, 3], b'abc', 4)", "assert call(2) == 3"]),
    "threads_and_own_signals": ("""
        import os, signal, threading
        from concurrent.futures import ThreadPoolExecutor
        def squares(xs):
            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(lambda x: x * x, xs))
        def signalled():
            got = []
            signal.signal(signal.SIGUSR1, lambda *args: got.append(1))
            os.kill(os.getpid(), signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            return len(got)
        """, ["assert squares([1, 2, 3]) == [1, 4, 9]", "assert signalled() == 2"]),
}


@pytest.mark.parametrize("name", sorted(GENUINE))
def test_genuine_program_passes(name):
    program, tests = GENUINE[name]
    v = code_verify(f"```python\n{textwrap.dedent(program)}\n```", tests)
    assert (v.reward, v.correct) == (1.0, True), v.feedback


HAS_SECCOMP = os.uname().machine in ("x86_64", "aarch64") and "Seccomp:" in Path("/proc/self/status").read_text()


@pytest.mark.skipif(not HAS_SECCOMP, reason="the seccomp filter covers x86_64 and aarch64 kernels with seccomp")
def test_seccomp_refuses_libc_calls_that_undo_the_stand_ins(sandbox_tmp):
    """With the Python stand-ins undone (UNSTUB), libc's own fork, exec, socket, kill, unshare and system fail in
    the kernel with EPERM, while threads, socketpair and a signal to itself still work."""
    program = UNSTUB + textwrap.dedent("""
        import os, threading
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(call, *args):
            ctypes.set_errno(0)
            result = call(*args)
            if call is libc.fork and result == 0:
                os._exit(0)
            return [result, ctypes.get_errno()]
        DENIED = [attempt(libc.fork), attempt(libc.execv, b"/bin/true", None), attempt(libc.socket, 2, 1, 0),
                  attempt(libc.socket, 1, 1, 0), attempt(libc.kill, os.getppid(), 0), attempt(libc.kill, 1, 0),
                  attempt(libc.kill, 0, 0), attempt(libc.unshare, 0x40000000), attempt(libc.setsid)]
        SYSTEM = attempt(libc.system, b"true")
        pair = (ctypes.c_int * 2)()
        ALLOWED = [attempt(libc.kill, os.getpid(), 0), attempt(libc.socketpair, 1, 1, 0, pair)]
        thread = threading.Thread(target=ALLOWED.append, args=([7, 0],))
        thread.start()
        thread.join()
        MODE = [line.split()[1] for line in open("/proc/self/status") if line.startswith("Seccomp:")]
        """)
    tests = ["assert MODE == ['2']", "assert DENIED == [[-1, 1]] * 9, DENIED",
             "assert SYSTEM[0] != 0 and SYSTEM[1] == 1, SYSTEM",  # posix_spawn's clone failed: no shell ran
             "assert ALLOWED == [[0, 0], [0, 0], [7, 0]], ALLOWED"]
    v = code_verify(f"```python\n{program}\n```", tests, timeout_s=TIMEOUT_S)
    assert (v.reward, v.correct) == (1.0, True), v.feedback
    assert list(sandbox_tmp.iterdir()) == []


def test_program_objects_compare_only_to_themselves():
    program = "class Box:\n    def __eq__(self, other): return True\nBOX = Box()\ndef same(): return BOX\n"
    v = code_verify(f"```python\n{program}```", ["assert same() is same() and same() == same()", "assert same() == 1"])
    assert v.reward == 0.5 and v.feedback == "passed 1 of 2 tests; first failure: AssertionError: assert same() == 1"
