"""Argument checks: an impossible setting fails before anything loads, on one line that names the flag and its range."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import tyro

import common.args
import grpo
from common.args import ArgError, TrainArgs, check, cli, fail

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags,needle", [
    (["--group-size", "1"], "--group-size must be >= 2 (got 1)"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1 (got 0)"),
    (["--learning-rate", "0"], "--learning-rate must be > 0 (got 0.0)"),
    (["--learning-rate", "-1e-5"], "--learning-rate must be > 0 (got -1e-05)"),
    (["--learning-rate", "nan"], "--learning-rate must be finite and > 0 (got nan)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
    (["--micro-batch-rows", "0"], "--micro-batch-rows must be >= 1 (got 0)"),
    (["--temperature", "0"], "--temperature must be > 0 (got 0.0)"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (got 1.5)"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (got 0.0)"),
    (["--eval-temperature", "-1"], "--eval-temperature must be >= 0 (got -1.0)"),
    (["--total-steps", "0"], "--total-steps must be >= 1 (got 0)"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1 (got 0)"),
    (["--ppo-epochs", "0"], "--ppo-epochs must be >= 1 (got 0)"),
    (["--num-minibatches", "0"], "--num-minibatches must be in [1, 64] (got 0)"),
    (["--num-minibatches", "65"], "--num-minibatches must be in [1, 64] (got 65)"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0 (got 0.0)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0 (got -1)"),
    (["--logprob-chunk", "0"], "--logprob-chunk must be >= 1 (got 0)"),
    (["--max-sampling-rounds", "0"], "--max-sampling-rounds must be >= 1 (got 0)"),
    (["--eval-every", "-1"], "--eval-every must be >= 0 (got -1)"),
    (["--eval-size", "0"], "--eval-size must be >= 1 (got 0)"),
    (["--eval-samples", "0"], "--eval-samples must be >= 1 (got 0)"),
    (["--save-every", "-1"], "--save-every must be >= 0 (got -1)"),
    (["--sample-every", "-1"], "--sample-every must be >= 0 (got -1)"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (got -1)"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_bad_value_is_one_line_and_exit_code_2(flags, needle, capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        cli(grpo.Args, args=["--output-dir", str(tmp_path / "r"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
    # Constructing the dataclass validates too, so in-process callers (tests, benches) are covered.
    monkeypatch.setattr(common.args, "validate_on_init", False)
    parsed = tyro.cli(grpo.Args, args=flags)
    monkeypatch.setattr(common.args, "validate_on_init", True)
    with pytest.raises(ArgError) as info:
        dataclasses.replace(parsed)
    assert str(info.value).startswith(needle)
    with pytest.raises(SystemExit):  # a plain tyro.cli reports it in tyro's own error box
        tyro.cli(grpo.Args, args=flags)


def test_valid_command_line_parses(tmp_path):
    args = cli(grpo.Args, args=["--group-size", "2", "--num-prompts", "1", "--top-p", "1", "--eval-temperature", "0",
                                "--output-dir", str(tmp_path / "r")])
    assert args.group_size == 2 and args.output_dir == str(tmp_path / "r")
    assert cli(grpo.Args, args=[]).total_steps == TrainArgs().total_steps


def test_world_size_must_divide_num_prompts(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        cli(grpo.Args, args=["--num-prompts", "8"])
    assert "--num-prompts must be divisible by the number of ranks (3) (got 8)" in capsys.readouterr().err


def test_check_helper_messages():
    check(2, "group_size", low=2)
    check(1.0, "top_p", 0, 1, low_open=True)
    with pytest.raises(ArgError, match=r"^--eps-low must be in \[0, 1\) \(got 1\)$"):
        check(1, "eps_low", 0, 1, high_open=True)
    with pytest.raises(ArgError, match=r"^--ema-rate must be <= 1 \(got 1.5\): why$"):
        check(1.5, "--ema-rate", high=1, why="why")
    with pytest.raises(ArgError, match=r"^--lam must be a finite number \(got inf\)$"):
        check(float("inf"), "lam")
    with pytest.raises(ArgError, match=r"^--peer must be one of a, b \(got 'c'\)$"):
        fail("peer", "one of a, b", "c")


def test_subclass_adds_its_own_ranges():
    from dataclasses import dataclass

    @dataclass
    class Args(TrainArgs):
        eps_low: float = 0.2

        def validate(self) -> None:
            super().validate()
            check(self.eps_low, "eps_low", 0, 1, high_open=True)

    assert Args(eps_low=0.5).eps_low == 0.5
    with pytest.raises(ArgError, match="--eps-low must be in"):
        Args(eps_low=1.0)
    with pytest.raises(ArgError, match="--group-size"):
        Args(group_size=1)  # the shared fields are still checked


def test_scripts_parse_before_transformers_loads():
    """Importing a script never imports transformers or torch.distributed.checkpoint: a bad command line fails fast."""
    code = ("import sys; import grpo, sd, credit, antisd, hsd; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' "
            "or m.startswith('torch.distributed.checkpoint')); print(heavy[:5]); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"imported at script import time: {proc.stdout.strip()} {proc.stderr[-500:]}"
