"""The `TrainArgs` fields every script shares (model, data, batch, optimisation, eval, logging)."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class TrainArgs:
    # run
    exp_name: str = ""
    """Name of this experiment (defaults to the script's name)."""
    seed: int = 1
    """Seed of python, numpy and torch; the same seed gives the same metrics on CPU."""
    output_dir: str | None = None
    """Run directory (args, metrics, samples, checkpoint); default `runs/{script}__{dataset}__{seed}__{time}`."""
    resume: bool = False
    """Resume from the checkpoint in `--output-dir` (starts fresh when there is none)."""
    track: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline to log without network)."""
    wandb_project: str = "cleansd"
    """wandb project name."""
    wandb_entity: str | None = None
    """wandb entity (team)."""

    # model and data
    model: str = "toy"
    """`toy` (the shipped tiny model), a local Hugging Face directory, or a hub id such as Qwen/Qwen3-0.6B."""
    dataset: str = "toy"
    """A registered dataset name or a local .jsonl/.parquet file (fields: prompt, answer[, solution, tests, task])."""
    eval_dataset: str | None = None
    """Dataset for evaluation (default: the test split of `--dataset`)."""
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

    # evaluation and logging
    eval_every: int = 10
    """Evaluate every N steps (and at step 0 and the last step); 0 turns evaluation off."""
    eval_size: int = 200
    """Number of evaluation prompts."""
    eval_samples: int = 4
    """Samples per eval prompt (k of avg@k / pass@k)."""
    eval_temperature: float = 1.0
    """Eval sampling temperature (0 = greedy)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    sample_every: int = 10
    """Write completion samples to samples.jsonl every N steps."""


def finalize(args: TrainArgs, script: str) -> Path:
    """Fill defaults that depend on the script; returns the run directory."""
    args.exp_name = args.exp_name or script
    if args.output_dir is None:
        dataset = Path(args.dataset).stem if args.dataset.endswith((".jsonl", ".parquet")) else args.dataset.replace("/", "-")
        args.output_dir = f"runs/{args.exp_name}__{dataset}__{args.seed}__{int(time.time())}"
    if args.num_prompts % int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"--num-prompts {args.num_prompts} must be divisible by the number of ranks")
    return Path(args.output_dir)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels where it can."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
