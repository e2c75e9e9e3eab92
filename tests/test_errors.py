"""common/errors.py, run as a user runs a script: a mistake is one `error:` line and exit 2; Ctrl-C names the resume.

Each case starts the script in a subprocess, as `python grpo.py ...` from a shell, and reads its exit code
and stderr (which also holds the libraries' progress bars, so the test reads its last line).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from common import errors
from common import run as run_module
from common.errors import ctrl_c_held, resume_command

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
ENV.pop("CLEANSD_TRACEBACK", None)


def run(script: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script, flags, message", [
    ("grpo.py", ["--dataset", "rg:no_such_task"], "error: rg:no_such_task: unknown reasoning-gym task 'no_such_task'"),
    ("grpo.py", ["--model", "./no-such-model"], "error: model path not found: ./no-such-model"),
    ("grpo.py", ["--lora-alpha", "16"], "error: --lora-alpha must be given only with --lora-rank (got 16.0)"),
    ("credit.py", ["--num-prompts", "1"], "error: --num-prompts must be >= 2 (got 1): CREDIT contrasts each prompt"),
    ("hsd.py", ["--num-minibatches", "2"], "error: --teacher current: the KL reads the teacher's LM head"),
])
def test_a_users_mistake_is_one_error_line_and_exit_2(script, flags, message, tmp_path):
    proc = run(script, *flags, "--output-dir", str(tmp_path / "run"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_the_traceback_stays_for_who_asks(tmp_path):
    proc = run("grpo.py", "--model", "./no-such-model", "--output-dir", str(tmp_path / "run"),
               env={**ENV, "CLEANSD_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelNotFound: model path not found" in proc.stderr


def test_resume_command_keeps_the_flags_and_names_the_directory():
    assert resume_command("runs/x", ["grpo.py", "--seed", "2", "--overwrite"]) == \
        "python grpo.py --seed 2 --output-dir runs/x --resume"
    assert resume_command("runs/x", ["/a/sd.py", "--output-dir=o d", "--resume"], world_size=2) == \
        "torchrun <the same torchrun options> sd.py '--output-dir=o d' --resume"


def test_a_ctrl_c_during_a_save_interrupts_after_it():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, whatever the worker has
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the signal arrives inside the block
                finished.append("checkpoint and note")
        assert finished == ["checkpoint and note"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup's: held or not, the press is ignored
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_lands_in_a_save_reports_the_checkpoint_it_wrote(monkeypatch, tmp_path):
    def save_then_press(*args, **kwargs):  # the press lands after the new checkpoint is in place
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)

    monkeypatch.setattr(run_module.checkpoint, "save", save_then_press)
    stub = types.SimpleNamespace(out_dir=tmp_path, policy=None, optimizer=None, tokenizer=None, saved_teacher=None,
                                 sampler=types.SimpleNamespace(state_dict=dict), d=types.SimpleNamespace(world_size=1))
    stub.note_checkpoint = types.MethodType(run_module.Run.note_checkpoint, stub)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_module.Run.save(stub, 7)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert errors._interrupt_note.startswith("the last checkpoint (after step 7)")


def test_ctrl_c_names_the_last_checkpoint_and_its_resume_command_works(tmp_path):
    out = tmp_path / "run"
    flags = ["--total-steps", "500", "--save-every", "1", "--eval-every", "0", "--num-prompts", "2",
             "--group-size", "2", "--max-new-tokens", "8", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "grpo.py", *flags], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,  # a terminal's Ctrl-C: not the ignored SIGINT of a
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # pytest-xdist worker
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # somewhere inside a later step
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and last.startswith("interrupted: the last checkpoint (after step "), stderr[-2000:]
    assert "Traceback" not in stderr
    command = shlex.split(last.split("continue with: ")[1])
    assert command[:2] == ["python", "grpo.py"] and command[-1] == "--resume"
    saved = int(last.split("(after step ")[1].split(")")[0])
    total = command.index("--total-steps") + 1
    command[total] = str(saved + 1)  # one more step than the checkpoint holds
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"at step {saved}" in resumed.stdout, resumed.stderr[-2000:]
