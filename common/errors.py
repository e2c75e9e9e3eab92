"""Errors a user can fix, and how a script run from the command line reports them and a Ctrl-C.

`cli()` installs `report` as `sys.excepthook`: a `UserError` (a bad flag, dataset or model path) prints one
line `error: ...` and exits with code 2, as a bad flag does; Ctrl-C prints one line naming the last
checkpoint and the command that resumes it, and exits with 130; any other exception is a bug and keeps
its traceback. `CLEANSD_TRACEBACK=1` keeps every traceback.
"""
from __future__ import annotations

import atexit
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRACEBACK_ENV = "CLEANSD_TRACEBACK"


class UserError(ValueError):
    """A problem the user can fix (a flag, a dataset, a model path); its message is one line that names the fix."""


class ModelNotFound(UserError, FileNotFoundError):
    """A model name or path that does not load."""


_interrupt_note = "nothing was written yet"


def set_interrupt_note(note: str) -> None:
    """What a Ctrl-C reports after `interrupted: ` (the run keeps it current: its last checkpoint)."""
    global _interrupt_note
    _interrupt_note = note


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then interrupt as usual (an ignored SIGINT stays ignored)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def resume_command(out_dir: Path | str, argv: list[str] | None = None, world_size: int = 1) -> str:
    """The command line that continues this run from its checkpoint in `out_dir`."""
    argv = [a for a in (sys.argv if argv is None else argv) if a not in ("--resume", "--overwrite")]
    script, flags = Path(argv[0]).name, argv[1:]
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in flags):
        flags += ["--output-dir", str(out_dir)]
    launcher = "python" if world_size == 1 else "torchrun <the same torchrun options>"
    return f"{launcher} {script} {shlex.join([*flags, '--resume'])}"


def report(exc_type: type[BaseException], exc: BaseException, tb) -> None:
    """sys.excepthook of a script: a UserError or Ctrl-C as one line (exit 2 / 130), any other exception as usual."""
    if os.environ.get(TRACEBACK_ENV) or not issubclass(exc_type, (UserError, KeyboardInterrupt)):
        sys.__excepthook__(exc_type, exc, tb)
        return
    if issubclass(exc_type, KeyboardInterrupt):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ninterrupted: {_interrupt_note}", file=sys.stderr)
        code = 130
    else:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # what a normal exit runs; os._exit alone would skip it
    os._exit(code)
