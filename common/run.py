"""Run setup and the end of a step, shared by the five scripts: dist, seed, models, data, optimizer, resume,
tracking, evaluation, checkpoints."""
from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import checkpoint, errors
from common.args import TrainArgs, finalize, seed_everything
from common.batch import Batch, batch_metrics
from common.data import HOLDOUT_FRACTION, DataError, PromptSampler, holdout_split, is_local_file, load_examples
from common.dist import Dist, all_reduce, cleanup, init_dist, shard
from common.evaluation import evaluate
from common.example import Example
from common.models import Policy, WithoutAdapters, load_policy, load_tokenizer
from common.prompts import render_prompts
from common.tracking import Tracker


def prompt_fits(tokenizer, examples: list[Example], max_tokens: int,
                enable_thinking: bool) -> tuple[list[Example], int]:
    """Keep the examples whose rendered prompt fits in `max_tokens`; returns (kept, skipped count)."""
    rendered = render_prompts(tokenizer, [e.prompt for e in examples], enable_thinking)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False).input_ids]
    kept = [e for e, n in zip(examples, lengths) if n <= max_tokens]
    return kept, len(examples) - len(kept)


def peak_memory() -> str:
    """This process's peak resident memory (and the GPU's peak allocation when there is one), for the last line."""
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    return f"peak RSS {rss_gib:.2f} GiB{gpu}"


@dataclass
class Run:
    """Everything a training loop needs besides its algorithm."""

    args: TrainArgs
    d: Dist
    out_dir: Path
    tokenizer: object
    policy: Policy
    optimizer: torch.optim.Optimizer
    sampler: PromptSampler
    eval_set: list[Example]
    tracker: Tracker
    teacher: Policy | WithoutAdapters | None = None
    """A separate teacher copy (EMA or frozen initial weights; under LoRA the initial weights are the policy
    without its adapters); None when the policy teaches itself."""
    reference: Policy | WithoutAdapters | None = None
    """The frozen initial policy of the KL term (None without one)."""
    start_step: int = 0
    extra: dict = field(default_factory=dict)
    skipped_prompts: int = 0
    started: float = field(default_factory=time.perf_counter)
    steps_run: int = 0
    """Steps this process ran (a resumed run counts from its start step)."""
    updates: int = 0
    """Optimizer steps this process took (an update skipped for a non-finite gradient is not one)."""
    skipped_updates: int = 0
    """Updates skipped for a non-finite gradient norm (`train/skipped_updates` summed over the steps run)."""

    @property
    def teacher_model(self) -> Policy:
        """The network that scores as teacher: the separate copy if there is one, else the policy itself."""
        return self.teacher if self.teacher is not None else self.policy

    @property
    def local_prompts(self) -> int:
        return self.args.num_prompts // self.d.world_size

    def set_lr(self, optimizer_step: int) -> float:
        """Linear warm-up to the base learning rate, then constant."""
        lr = self.args.learning_rate * min(1.0, (optimizer_step + 1) / max(1, self.args.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def is_eval_step(self, step: int) -> bool:
        if self.args.eval_every <= 0 or not self.eval_set:
            return False
        return step % self.args.eval_every == 0 or step == self.args.total_steps - 1

    def evaluate_before(self, step: int) -> dict[str, float]:
        """Eval metrics of the policy before this step's update (eval steps except the last), else {}."""
        return self.evaluate(step) if self.is_eval_step(step) and step < self.args.total_steps - 1 else {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics; sample rows go to samples.jsonl."""
        a = self.args
        t0 = time.perf_counter()
        # Its own random stream, seeded by (seed, rank, step): evaluating never shifts the training samples
        # (so --eval-every leaves the run unchanged), and every algorithm is evaluated with the same draws.
        with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
            torch.manual_seed(hash((a.seed, self.d.rank, step)) % 2**63)
            metrics, table, scores = evaluate(self.policy, self.tokenizer, self.eval_set, self.d,
                                              a.eval_max_new_tokens or a.max_new_tokens, a.eval_samples,
                                              a.eval_temperature, a.eval_batch_prompts,
                                              enable_thinking=a.enable_thinking, top_p=a.eval_top_p)
        self.tracker.samples(step, [{"split": "eval", **row} for row in table])
        self.tracker.eval_scores(step, scores)
        return {**metrics, "perf/eval_s": time.perf_counter() - t0}

    def save(self, step: int, extra: dict | None = None) -> None:
        """Checkpoint after `step` completed steps (all ranks call)."""
        with errors.ctrl_c_held():  # a Ctrl-C between the two would name the checkpoint the save replaced
            checkpoint.save(self.out_dir, self.policy, self.optimizer, self.tokenizer, step,
                            {"sampler": self.sampler.state_dict(), **(extra or {})}, self.saved_teacher)
            self.note_checkpoint(step)

    def note_checkpoint(self, step: int) -> None:
        """Name the last checkpoint and its resume command in what a Ctrl-C prints."""
        errors.set_interrupt_note(f"the last checkpoint (after step {step}) is in {self.out_dir / 'checkpoint'}; "
                                  f"continue with: {errors.resume_command(self.out_dir, world_size=self.d.world_size)}")

    @property
    def saved_teacher(self) -> torch.nn.Module | None:
        """The teacher weights a checkpoint holds: a separate copy, never the policy seen without adapters."""
        return None if isinstance(self.teacher, WithoutAdapters) else self.teacher

    def close(self) -> None:
        """Finish tracking, report peak memory, leave the process group; exit non-zero if every update was skipped."""
        self.tracker.finish()
        if self.d.is_main:
            print(f"done: {self.steps_run} step(s) in {time.perf_counter() - self.started:.0f}s; {peak_memory()}",
                  flush=True)
        cleanup()
        if self.skipped_updates and self.d.is_main:
            print(f"warning: {self.skipped_updates} update(s) skipped for a non-finite gradient norm "
                  f"({self.updates} taken)", file=sys.stderr, flush=True)
        if self.steps_run and not self.updates:
            raise SystemExit(f"error: every update of this run was skipped ({self.skipped_updates} with a non-finite "
                             f"gradient norm over {self.steps_run} step(s)): nothing was trained; the loss is NaN or "
                             f"inf (metrics in {self.out_dir / 'metrics.jsonl'}, train/skipped_updates)")

    def should_save(self, step: int) -> bool:
        last = step == self.args.total_steps - 1
        return last or (self.args.save_every > 0 and (step + 1) % self.args.save_every == 0)

    def end_step(self, step: int, t0: float, metrics: dict, batch: Batch, advantages: torch.Tensor,
                 entropy: torch.Tensor, state: dict | None = None) -> None:
        """The tail of every step: rollout statistics, final eval, samples, the metrics line, checkpoint.

        `advantages` [B] are the sequence advantages; `entropy` [B, T] the policy's per-token entropy;
        `state` is the script's own state to checkpoint (e.g. a gate).
        """
        a, mask = self.args, batch.rollout.completion_mask.float()
        metrics |= batch_metrics(self, batch, advantages.cpu())
        metrics["policy/entropy"] = (all_reduce((entropy * mask).sum()) / all_reduce(mask.sum())).item()
        metrics["perf/step_s"] = time.perf_counter() - t0  # training only: evaluation is perf/eval_s
        metrics["perf/tokens_per_s"] = float(all_reduce(mask.sum())) / metrics["perf/step_s"]
        if step == a.total_steps - 1 and self.is_eval_step(step):
            metrics |= self.evaluate(step)  # the last step reports the final policy
        if a.sample_every > 0 and step % a.sample_every == 0:
            self.tracker.samples(step, [{"split": "train", "prompt": e.prompt, "completion": t, "reward": float(r)}
                                        for e, t, r in list(zip(batch.examples, batch.rollout.texts,
                                                                batch.rewards))[:4]])
        self.steps_run += 1
        self.skipped_updates += int(metrics.get("train/skipped_updates", 0))
        self.tracker.log(step, metrics)
        if self.should_save(step):
            self.save(step + 1, state)


def load_splits(args: TrainArgs, tokenizer) -> tuple[list[Example], list[Example], int, str]:
    """Train and eval examples with over-long prompts skipped (the count is returned and logged), and a note
    saying where the eval prompts come from (for the start-up line).

    A local file without --eval-dataset is split: a deterministic held-out part (`holdout_split`) is the eval
    set and never trained on. Registered datasets evaluate on their test split, the toy task on its own, an
    `rg:` task on its seeded test split (whose questions its train split never holds).
    """
    source = f"eval: the test split of {args.eval_dataset or args.dataset}"
    if args.eval_dataset is None and is_local_file(args.dataset):
        rows = load_examples(args.dataset, "train")
        train, evals = holdout_split(rows, args.eval_size)
        source = (f"eval: {len(evals)} of the {len(rows)} rows of {args.dataset} held out, never trained on "
                  f"(deterministic {HOLDOUT_FRACTION:.0%}, at most --eval-size; --eval-dataset to use another file)"
                  if evals else f"no eval: {args.dataset} has one distinct prompt to hold out; pass --eval-dataset")
    else:
        train = load_examples(args.dataset, "train")
        evals = load_examples(args.eval_dataset or args.dataset, "test")[: args.eval_size]
        if args.eval_dataset is not None and is_local_file(args.eval_dataset) and is_local_file(args.dataset) \
                and Path(args.eval_dataset).resolve() == Path(args.dataset).resolve():
            print(f"warning: --eval-dataset is the training file {args.dataset}: eval metrics are on training rows, "
                  f"not held out (omit --eval-dataset to hold out part of the file)", flush=True)
    train, skipped = prompt_fits(tokenizer, train, args.max_prompt_tokens, args.enable_thinking)
    evals, skipped_eval = prompt_fits(tokenizer, evals, args.max_prompt_tokens, args.enable_thinking)
    if not train:
        raise DataError(f"every training prompt is longer than --max-prompt-tokens {args.max_prompt_tokens}")
    return train, evals, skipped + skipped_eval, source


def setup(args: TrainArgs, script: str, teacher_weights: str = "current", reference: bool = False) -> Run:
    """Process group, seeds, models, data, optimizer, resume, tracker.

    teacher_weights: `current` (the policy teaches itself), `ema` or `initial` (a separate copy of the initial
    weights, which the script updates or keeps frozen). reference: load the frozen initial policy for
    a KL term (shared with an `initial` teacher, which holds the same weights).
    """
    out_dir = finalize(args, script)  # validates the arguments and refuses to replace a run, before anything loads
    d = init_dist()
    found = checkpoint.find(out_dir) if args.resume else None
    if args.resume and found is None and d.is_main:
        where = "the directory does not exist" if not out_dir.exists() else "it holds no checkpoint/"
        print(f"warning: --resume: no checkpoint in {out_dir} ({where}); starting a fresh run at step 0",
              file=sys.stderr, flush=True)
    seed_everything(args.seed + d.rank)
    tokenizer = load_tokenizer(args.model)
    policy = load_policy(args.model, d.device, args.gradient_checkpointing, args.lora_rank, args.lora_alpha,
                         args.lora_targets)
    # Under LoRA the initial weights are the policy with its adapters off: no copy for an `initial` teacher.
    copied = teacher_weights == "ema" or teacher_weights == "initial" and not args.lora_rank
    teacher = copy.deepcopy(policy).requires_grad_(False).eval() if copied else None
    policy, teacher = shard(policy, d), shard(teacher, d) if teacher is not None else None
    if teacher_weights == "initial" and args.lora_rank:
        teacher = WithoutAdapters(policy)
    trained = [p for p in policy.parameters() if p.requires_grad]  # the adapters only, under LoRA
    # fused: one kernel per parameter group instead of a dozen per tensor (5x faster for SmolLM2 on a CPU)
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    train, evals, skipped, source = load_splits(args, tokenizer)
    sampler = PromptSampler(train, args.seed + d.rank)
    start, extra = 0, {}
    if found is not None:
        start, extra = checkpoint.load(found, policy, optimizer,
                                       None if isinstance(teacher, WithoutAdapters) else teacher)
        sampler.load_state_dict(extra["sampler"])
        if d.is_main:
            print(f"resumed from {found} at step {start}", flush=True)
    if found is None and d.is_main:
        checkpoint.clear(out_dir)  # --overwrite (or --resume without a checkpoint): no older weights survive
    tracker = Tracker(out_dir, args, out_dir.name, d.is_main, resume_step=start if found else None)
    if d.is_main:
        print(f"{script}: {len(train)} train / {len(evals)} eval prompts ({skipped} over-long skipped; "
              f"{source}), "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params "
              f"({sum(p.numel() for p in trained) / 1e6:.2f}M trained), {d.world_size} rank(s), "
              f"{d.device.type}; writing to {out_dir}", flush=True)
    frozen = None
    if reference:  # the frozen initial policy, sharing nothing with the trained weights (an `initial` teacher is one)
        if teacher_weights == "initial":
            frozen = teacher
        elif args.lora_rank:
            frozen = WithoutAdapters(policy)
        else:
            frozen = shard(load_policy(args.model, d.device).requires_grad_(False).eval(), d)
    run = Run(args, d, out_dir, tokenizer, policy, optimizer, sampler, evals, tracker, teacher, frozen, start, extra,
              skipped)

    def count_update(*_) -> None:
        run.updates += 1

    optimizer.register_step_post_hook(count_update)  # Update.step() skips optimizer.step() for a non-finite gradient
    if found is not None:
        run.note_checkpoint(start)
    else:
        errors.set_interrupt_note(f"no checkpoint yet (--save-every N writes one every N steps); the metrics so far "
                                  f"are in {out_dir / 'metrics.jsonl'}")
    return run
