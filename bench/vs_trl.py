"""Step time and peak memory of `grpo.py` against TRL's `GRPOTrainer` on the same GRPO configuration.

What: both sides train the same toy model (the shipped `assets/toy-base/`, else a freshly seeded one,
or `--model DIR`) with the same tokenizer and chat template, the toy training prompts, P prompts x G
generations, the same max new tokens, learning rate (constant, no warm-up), seed, sampling
(temperature 1.0, top-p 1, top-k off), loss (DAPO token-mean aggregation = TRL `loss_type="dapo"`,
eps 0.2 / 0.28, beta 0, group std scaling), fp32 on CPU, one optimizer step per rollout batch, no
gradient checkpointing, no evaluation and no saving during the timed steps.

How: rounds alternate (TRL, then grpo.py, R times) to spread machine noise; every side runs in its own
subprocess per round, so its peak RSS (ru_maxrss from os.wait4) is its own. Each run does `--warmup`
untimed steps then `--steps` timed ones. TRL's step is on_step_begin -> on_step_end of a
TrainerCallback (generation, rewards, forward/backward, clipping, optimizer step; not the logging
that follows). grpo.py's step is `perf/step_s` from its metrics.jsonl (rollout, verification, old
log-prob pass, update, step statistics; not the metrics write). Both sides use this interpreter and
`--threads` OpenMP/MKL threads (default 1: on a shared machine, spin-waiting threads make both sides
several times slower and noisy). Prints the median step time of each, the ratio grpo/TRL, and the
peak RSS of each. The issue's goal is grpo.py <= 0.7x TRL's step time.

`--learning` checks instead that grpo.py learns as TRL does: both sides train the toy default recipe (lr
3e-4, P 8 x G 8, 48 new tokens, DAPO loss) for 60 steps from the same base, once per seed, and the driver
scores both final policies with the project's own held-out evaluation (the toy's 200 test problems,
avg@4 at temperature 1, the same random draws for both); it also prints the mean training reward over
the last 20 steps of each side.

TRL is an optional dependency, not in requirements.txt:
    pip install trl==1.16.0          # into the environment that runs this script (CPU torch pinned)
    python bench/vs_trl.py                       # 3 rounds x (2 warm-up + 10 timed steps) per side
    python bench/vs_trl.py --rounds 1 --steps 5  # quick look
    python bench/vs_trl.py --model smollm2-135m --num-prompts 4 --group-size 8 --max-new-tokens 32 \\
        --rounds 2 --steps 3 --warmup 1          # the real model (toy prompts; step time only)
    python bench/vs_trl.py --learning            # learning parity: 3 seeds x 60 steps per side
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INSTALL_HINT = ("bench/vs_trl.py needs TRL, an optional dependency that is not in requirements.txt.\n"
                "Install it into the interpreter that runs this script, for example:\n"
                "    python -m pip install trl==1.16.0 -c .ci/cpu-constraints.txt\n"
                f"(this interpreter: {sys.executable})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory, `toy` or `smollm2-135m` (default: assets/toy-base, "
                                                 "else a random toy model)")
    p.add_argument("--num-prompts", type=int, default=8, help="P")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (one TRL run + one grpo.py run each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads of both sides (0: torch's default; on a busy machine spin-waiting threads "
                        "make both sides several times slower and noisy)")
    p.add_argument("--learning", action="store_true",
                   help="learning parity instead of step time: the toy default recipe for --steps 60 per seed, "
                        "both final policies scored by the project's held-out evaluation")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="--learning: one run per side per seed")
    p.add_argument("--worker", choices=["trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].learning:  # the toy default recipe unless the command line says otherwise
        p.set_defaults(**LEARNING)
    return p.parse_args(argv)


LEARNING = {"num_prompts": 8, "group_size": 8, "max_new_tokens": 48, "learning_rate": 3e-4, "steps": 60, "warmup": 0}
"""--learning's settings: the toy default recipe (P, G, tokens and lr of grpo.py's toy runs) for 60 steps."""


# ---------------------------------------------------------------------------------------------------
# TRL side (runs in its own subprocess: `--worker trl`).


def trl_worker(a: argparse.Namespace) -> None:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from common.data import load_examples
    from common.verifiers import toy_verify

    tokenizer = transformers.AutoTokenizer.from_pretrained(a.model)
    tokenizer.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    examples = load_examples("toy", "train")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer}
                                 for e in examples])

    def toy_reward(completions, answer, **kwargs) -> list[float]:
        return [toy_verify(c[0]["content"], ans).reward for c, ans in zip(completions, answer)]

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.t0, self.steps, self.cycles, self.last_end = 0.0, [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append(now - self.t0)
            if self.last_end is not None:  # step end to step end: adds logging and data loading
                self.cycles.append(now - self.last_end)
            self.last_end = now

    P, G = a.num_prompts, a.group_size
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=a.seed, data_seed=a.seed,
            per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
            max_completion_length=a.max_new_tokens, max_steps=a.warmup + a.steps, num_iterations=1,
            learning_rate=a.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
            temperature=1.0, top_p=1.0, top_k=0, gradient_checkpointing=False,
            save_strategy="no", eval_strategy="no", report_to=[], logging_steps=1, log_completions=False,
            disable_tqdm=True, dataloader_num_workers=0)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=toy_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        if a.learning:  # the final policy, for the driver's held-out evaluation
            trainer.save_model(str(Path(a.out).with_suffix("")))
            tokenizer.save_pretrained(str(Path(a.out).with_suffix("")))
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    Path(a.out).write_text(json.dumps({"step_s": timer.steps[a.warmup:], "cycle_s": timer.cycles[a.warmup:],
                                       "rewards": rewards}))


# ---------------------------------------------------------------------------------------------------
# Driver.


def run_child(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Run `cmd` to completion; returns (exit code, that child's peak RSS in MiB from os.wait4)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if threads > 0:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB


def fail(side: str, log: Path) -> None:
    tail = "\n".join(log.read_text().splitlines()[-30:])
    sys.exit(f"{side} run failed; last lines of its log:\n{tail}")


def resolve_model(a: argparse.Namespace, tmp: Path) -> str:
    if a.model:
        from common.models import resolve_model_path

        path = Path(resolve_model_path(a.model))  # `toy`, `smollm2-135m` (converted offline once) or a directory
        if not (path / "config.json").exists():
            sys.exit(f"--model {a.model}: no config.json in {path}")
        return str(path.resolve())
    from common import toy

    if (toy.TOY_MODEL_DIR / "config.json").exists():
        return str(toy.TOY_MODEL_DIR)
    print(f"note: {toy.TOY_MODEL_DIR} missing; using a randomly initialised toy model (seed 0)", flush=True)
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, 0)
    model.save_pretrained(tmp / "toy-random")
    tok.save_pretrained(tmp / "toy-random")
    return str(tmp / "toy-random")


def grpo_command(shared: list[str], steps: int, run_dir: Path) -> list[str]:
    """grpo.py on the configuration TRL runs (DAPO's token-mean loss, group std, no KL, plain sampling)."""
    return [sys.executable, "grpo.py", *shared, "--loss-agg", "token", "--adv-scale", "group", "--eps-low", "0.2",
            "--eps-high", "0.28", "--beta", "0", "--temperature", "1.0", "--top-p", "1.0", "--total-steps", str(steps),
            "--eval-every", "0", "--sample-every", "0", "--output-dir", str(run_dir)]


def held_out_accuracy(model_dir: str, seed: int, max_new_tokens: int) -> float:
    """The project's held-out evaluation of a saved policy: the toy's test problems with a training run's eval
    defaults (200 problems, avg@4 at temperature 1), the random draws seeded by `seed`."""
    import torch

    from common.args import TrainArgs
    from common.data import load_examples
    from common.dist import Dist
    from common.evaluation import evaluate
    from common.models import load_policy, load_tokenizer

    policy = load_policy(model_dir, torch.device("cpu")).eval()
    torch.manual_seed(seed)
    metrics, _, _ = evaluate(policy, load_tokenizer(model_dir), load_examples("toy", "test")[:TrainArgs.eval_size],
                             Dist(), max_new_tokens, TrainArgs.eval_samples, TrainArgs.eval_temperature,
                             TrainArgs.eval_batch_prompts)
    return metrics["eval/accuracy"]


def learning(a: argparse.Namespace, model: str, tmp: Path) -> None:
    """Both sides train --steps steps per seed; both final policies get the same held-out evaluation."""
    rows = []
    for seed in a.seeds:
        shared = ["--num-prompts", str(a.num_prompts), "--group-size", str(a.group_size), "--max-new-tokens",
                  str(a.max_new_tokens), "--learning-rate", str(a.learning_rate), "--seed", str(seed), "--model", model]
        out, log = tmp / f"trl{seed}.json", tmp / f"trl{seed}.log"
        code, _ = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--learning", *shared,
                             "--steps", str(a.steps), "--warmup", "0", "--out", str(out)], log, a.threads)
        if code != 0 or not out.exists():
            fail("TRL", log)
        run_dir, log = tmp / f"grpo{seed}", tmp / f"grpo{seed}.log"
        code, _ = run_child(grpo_command(shared, a.steps, run_dir), log, a.threads)
        if code != 0 or not (run_dir / "metrics.jsonl").exists():
            fail("grpo.py", log)
        rewards = {"trl": json.loads(out.read_text())["rewards"],
                   "grpo": [json.loads(line)["reward/mean"] for line in (run_dir / "metrics.jsonl").read_text()
                            .splitlines() if line.strip()]}
        accuracy = {"trl": held_out_accuracy(str(out.with_suffix("")), seed, a.max_new_tokens),
                    "grpo": held_out_accuracy(str(run_dir / "checkpoint" / "model"), seed, a.max_new_tokens)}
        last = {k: statistics.mean(v[-20:]) for k, v in rewards.items()}
        rows.append((seed, accuracy, last))
        print(f"seed {seed}: held-out accuracy grpo.py {accuracy['grpo']:.3f}, TRL {accuracy['trl']:.3f}; mean "
              f"training reward over the last 20 steps grpo.py {last['grpo']:.3f}, TRL {last['trl']:.3f}", flush=True)

    def summary(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    diffs = [acc["grpo"] - acc["trl"] for _, acc, _ in rows]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(f"\n{a.steps} steps, seeds {a.seeds}: held-out accuracy (avg@4 at T=1), mean ± std")
    for key, name in (("grpo", "grpo.py"), ("trl", "TRL")):
        print(f"{name:<8} accuracy {summary([acc[key] for _, acc, _ in rows])}   last-20 training reward "
              f"{summary([last[key] for _, _, last in rows])}")
    print(f"grpo.py - TRL: {statistics.mean(diffs):+.3f} (paired standard error over seeds {se:.3f})")


def main() -> None:
    a = parse_args()
    if a.worker == "trl":
        trl_worker(a)
        return
    if importlib.util.find_spec("trl") is None:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(1)
    import torch
    import trl

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(a, tmp)
        print(f"model {model} | P={a.num_prompts} G={a.group_size} max_new_tokens={a.max_new_tokens} "
              f"lr={a.learning_rate} seed={a.seed} | "
              + (f"seeds {a.seeds} x {a.steps} steps per side | " if a.learning else
                 f"{a.rounds} rounds x ({a.warmup} warm-up + {a.steps} timed steps) | ") +
              f"trl {trl.__version__}, torch {torch.__version__}, "
              f"{a.threads if a.threads > 0 else torch.get_num_threads()} thread(s) per side", flush=True)
        if a.learning:
            learning(a, model, tmp)
            return
        shared = ["--num-prompts", str(a.num_prompts), "--group-size", str(a.group_size),
                  "--max-new-tokens", str(a.max_new_tokens), "--learning-rate", str(a.learning_rate),
                  "--seed", str(a.seed), "--model", model]
        times = {"trl": [], "grpo": []}
        cycles, breakdown, rss = [], [], {"trl": [], "grpo": []}
        for r in range(a.rounds):
            # TRL
            out, log = tmp / f"trl{r}.json", tmp / f"trl{r}.log"
            code, peak = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "trl", *shared,
                                    "--steps", str(a.steps), "--warmup", str(a.warmup), "--out", str(out)],
                                   log, a.threads)
            if code != 0 or not out.exists():
                fail("TRL", log)
            res = json.loads(out.read_text())
            times["trl"] += res["step_s"]
            cycles += res["cycle_s"]
            rss["trl"].append(peak)
            # grpo.py
            run_dir, log = tmp / f"grpo{r}", tmp / f"grpo{r}.log"
            code, peak = run_child(grpo_command(shared, a.warmup + a.steps, run_dir), log, a.threads)
            metrics = run_dir / "metrics.jsonl"
            if code != 0 or not metrics.exists():
                fail("grpo.py", log)
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()][a.warmup:]
            times["grpo"] += [row["perf/step_s"] for row in rows]
            breakdown += rows
            rss["grpo"].append(peak)
            print(f"round {r + 1}/{a.rounds}: TRL median {statistics.median(res['step_s']):.4f} s/step, "
                  f"grpo.py median {statistics.median(row['perf/step_s'] for row in rows):.4f} s/step", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["grpo"] / med["trl"]
    print(f"\n{'side':<8} {'median step s':>14} {'min':>8} {'max':>8} {'peak RSS MiB':>13}")
    for k, name in (("trl", "TRL"), ("grpo", "grpo.py")):
        print(f"{name:<8} {med[k]:>14.4f} {min(times[k]):>8.4f} {max(times[k]):>8.4f} {max(rss[k]):>13.0f}")
    if cycles:
        print(f"(TRL step-end to step-end, with its logging: median {statistics.median(cycles):.4f} s)")
    parts = {k: statistics.median(row[f"perf/{k}_s"] for row in breakdown) for k in ("generate", "score", "update")}
    print("grpo.py step parts (median s): " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    print(f"\nratio grpo.py / TRL step time: {ratio:.2f}x  (goal <= 0.70x: {'met' if ratio <= 0.7 else 'NOT met'})")
    print(f"peak RSS grpo.py / TRL: {max(rss['grpo']) / max(rss['trl']):.2f}x")


if __name__ == "__main__":
    main()
