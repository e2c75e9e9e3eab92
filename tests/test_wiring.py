"""Each script's update, pinned by hand: the loss and gradient of every optimizer step recomputed from the formulas.

A case runs one step of a script on the toy base (4 prompts x 4 rows) with two optimizer steps on the
batch (`--ppo-epochs 2`, so the second sees ratios away from 1, the clip ranges, the importance
weights and the KL to the initial model; HSD's current teacher allows one) and micro-batches of 3
rows (so every denominator spans micro-batches). It records the weights and the gradient at each
optimizer step, the batch and the teacher prompts. The test then recomputes each step's loss with a
plain full-vocabulary forward and explicit sums over rows and tokens, written from each paper's
formula, and compares the gradients. Weights are set off their defaults (lam, lam_sd, grpo_coef, ...)
so that dropping one changes the gradient; a sign, a weight, a normalisation, the clip or a mask that
moves fails here.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro
from transformers import AutoModelForCausalLM

import common.teacher
from common.args import apply_preset, cli
from common.models import resolve_model_path

FLAGS = ["--model", "toy", "--num-prompts", "4", "--group-size", "4", "--total-steps", "1", "--eval-every", "0",
         "--sample-every", "0", "--micro-batch-rows", "3", "--learning-rate", "1e-3", "--eps-low", "0.02",
         "--eps-high", "0.03"]
TWO_UPDATES = ["--ppo-epochs", "2"]
CASES = {
    "grpo": ("grpo", TWO_UPDATES),
    "grpo-preset-grpo": ("grpo", ["--preset", "grpo", "--beta", "0.3", *TWO_UPDATES]),
    "grpo-dr-grpo": ("grpo", ["--preset", "dr-grpo", *TWO_UPDATES]),
    "sd": ("sd", ["--lam", "0.7", "--grpo-coef", "0.8", "--beta", "0.3", *TWO_UPDATES]),
    "sd-logit": ("sd", ["--sd-loss", "logit", "--lam-sd", "0.6", "--grpo-coef", "0.8", "--is-clip", "1.01", "--topk",
                        "5", "--jsd-alpha", "0.3", *TWO_UPDATES]),
    "sd-sdpo": ("sd", ["--preset", "sdpo", "--lam-sd", "0.6", "--is-clip", "1.01", *TWO_UPDATES]),
    "sd-opsd": ("sd", ["--preset", "opsd", "--lam-sd", "0.6", "--jsd-alpha", "0.3", *TWO_UPDATES]),
    "credit": ("credit", ["--contrast-weight", "0.3", "--lam-sd", "0.6", "--is-clip", "1.01", "--grpo-coef", "0.5",
                          *TWO_UPDATES]),
    "antisd": ("antisd", ["--no-gate", "--lam-max", "0.7", "--grpo-coef", "0.8", "--beta", "0.3", *TWO_UPDATES]),
    "antisd-revkl": ("antisd", ["--no-gate", "--divergence", "revkl", "--lam-max", "0.7", *TWO_UPDATES]),
    "sd-one-update": ("sd", ["--lam", "0.7", "--grpo-coef", "0.8"]),
    "sd-opsd-one-update": ("sd", ["--preset", "opsd", "--lam-sd", "0.6", "--jsd-alpha", "0.3", "--grpo-coef", "0.5"]),
    "sd-sdpo-one-update": ("sd", ["--preset", "sdpo", "--lam-sd", "0.6", "--grpo-coef", "0.5"]),
    "sd-logit-one-update": ("sd", ["--sd-loss", "logit", "--lam-sd", "0.6", "--topk", "5", "--jsd-alpha", "0.3"]),
    "credit-one-update": ("credit", ["--contrast-weight", "0.3", "--lam-sd", "0.6", "--grpo-coef", "0.5"]),
    "antisd-one-update": ("antisd", ["--no-gate", "--lam-max", "0.7", "--grpo-coef", "0.8"]),
    "hsd": ("hsd", ["--lam-sd", "0.6", "--grpo-coef", "0.5"]),
    "hsd-initial": ("hsd", ["--teacher", "initial", "--beta", "0.3", "--kl-direction", "forward", "--on-success",
                            "skip", "--lam-sd", "0.6", *TWO_UPDATES]),
}
ROOT = Path(__file__).resolve().parent.parent
SEED = {"sd-sdpo": "3", "sd-sdpo-one-update": "3", "credit": "3", "credit-one-update": "3"}
"""Seeds whose batch distils some rows and not others under SDPO's masking (checked below)."""


def case_flags(name: str, out: Path) -> list[str]:
    """A case's command line, writing into `out`."""
    return [*FLAGS, "--seed", SEED.get(name, "1"), "--output-dir", str(out), *CASES[name][1]]


class Recorder:
    """What one step of a script did: its run, batch, teacher prompts, and (weights, gradient) per optimizer step."""

    def __init__(self, module, monkeypatch):
        self.run, self.batch, self.teacher_prompts, self.updates = None, None, [], []
        collect, inputs, clip = module.collect_batch, common.teacher.teacher_inputs, torch.nn.utils.clip_grad_norm_
        score, scored_rows = common.teacher.score_teacher, []

        def collect_batch(run, *args, **kwargs):
            self.run, self.batch = run, collect(run, *args, **kwargs)
            return self.batch

        def score_teacher(run, args, batch, messages, max_prompt_tokens, rows=None, *rest, **kwargs):
            scored_rows.append(list(range(len(messages))) if rows is None else list(rows))
            return score(run, args, batch, messages, max_prompt_tokens, rows, *rest, **kwargs)

        def teacher_inputs(*args, **kwargs):  # each scoring call's rows and teacher prompts, in the order scored
            out = inputs(*args, **kwargs)
            self.teacher_prompts.append((scored_rows.pop(), *out[:2]))
            return out

        def clip_grad_norm_(params, *args, **kwargs):
            named = list(self.run.policy.lm.named_parameters())
            grads = {n: full(p.grad) for n, p in named if p.grad is not None}
            self.updates.append(({n: full(p) for n, p in named}, grads))
            return clip(params, *args, **kwargs)

        monkeypatch.setattr(module, "collect_batch", collect_batch)
        monkeypatch.setattr(common.teacher, "score_teacher", score_teacher)
        if hasattr(module, "score_teacher"):
            monkeypatch.setattr(module, "score_teacher", score_teacher)
        monkeypatch.setattr(common.teacher, "teacher_inputs", teacher_inputs)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)


def teacher_prompts_by_row(calls: list, B: int) -> tuple[list, list]:
    """Each row's teacher prompt (ids, mask) and, for CREDIT, its contrast prompts, from the scoring calls: a row's
    first prompt is its own teacher's, the later ones its contrasts' (in the order scored)."""
    own, contrasts = [None] * B, [[] for _ in range(B)]
    for rows, ids, mask in calls:
        for j, i in enumerate(rows):
            prompt = (ids[j][mask[j].bool()], mask[j][mask[j].bool()])  # without the left padding
            if own[i] is None:
                own[i] = prompt
            else:
                contrasts[i].append(prompt)
    return own, contrasts


def left_padded(prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded (ids, mask) prompts as one left-padded batch."""
    width = max(len(ids) for ids, _ in prompts)
    ids = torch.stack([torch.cat([ids.new_zeros(width - len(ids)), ids]) for ids, _ in prompts])
    mask = torch.stack([torch.cat([m.new_zeros(width - len(m)), m]) for _, m in prompts])
    return ids, mask


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor, gathered from the ranks if FSDP2 shards it."""
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def model_with(weights: dict[str, torch.Tensor]):
    """The toy model holding `weights` (one optimizer step's, as recorded)."""
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy"), dtype=torch.float32,
                                              attn_implementation="sdpa")
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    assert not unexpected and all(k in weights or "lm_head" in k for k in missing), (missing, unexpected)
    return lm


def completion_logprobs(lm, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature) -> torch.Tensor:
    """[B, T, V] log pi(. | prompt, y_<t) / tau from one plain forward of the whole sequence (no sharing, no chunks)."""
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    logits = lm(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, -T - 1:-1]
    return torch.log_softmax(logits.float() / temperature, -1)


def group_advantages_by_hand(rewards: list[float], G: int, scale: str) -> list[float]:
    out = []
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        out += [(x - mean) / (std + 1e-4) if scale == "group" else x - mean for x in r]
    return out


def with_tail(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The k log-probs at `index` and the tail bucket: the log of the rest of the vocabulary's probability."""
    rest = torch.ones_like(logp, dtype=torch.bool)
    rest[index] = False
    return torch.cat([logp[index], torch.logsumexp(logp[rest], 0).reshape(1)])


def jsd(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized JSD of two log-prob vectors, written out: alpha 0 KL(T||S), 1 KL(S||T), else through the mixture."""
    ps, pt = s.exp(), t.exp()
    if alpha == 0:
        return (pt * (t - s)).sum()
    if alpha == 1:
        return (ps * (s - t)).sum()
    m = torch.log((1 - alpha) * ps + alpha * pt)
    return (1 - alpha) * (ps * (s - m)).sum() + alpha * (pt * (t - m)).sum()


def expected_loss(script: str, a, ctx: dict, lm, totals: dict | None = None) -> tuple[torch.Tensor, float]:
    """One optimizer step's loss written from the papers' formulas with explicit sums; and its clipped-ratio count.

    totals: the denominators (rows, tokens, distilled tokens) when `ctx` is one rank's part of a larger batch.
    """
    r = ctx["batch"].rollout
    logp = completion_logprobs(lm, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, a.temperature)
    s = logp.gather(-1, r.completion_ids[..., None])[..., 0]
    old, lengths = ctx["old"], ctx["lengths"]
    distilled = ctx.get("distilled", [])
    totals = totals or {"rows": len(lengths), "tokens": sum(lengths), "distilled": sum(lengths[i] for i in distilled)}
    B, n_tokens, n_distilled = totals["rows"], totals["tokens"], totals["distilled"]
    loss, clipped = torch.zeros(()), 0

    def aggregate(i: int, value: torch.Tensor) -> torch.Tensor:  # one token's share of the loss under --loss-agg
        if a.loss_agg == "token":
            return value / n_tokens
        if a.loss_agg == "sequence":
            return value / lengths[i] / B
        return value / (B * a.max_new_tokens)

    grpo_coef = getattr(a, "grpo_coef", 1.0)
    for i in range(len(lengths)):
        for t in range(lengths[i]):
            A = grpo_coef * ctx["adv"][i]
            u = float(ctx["teacher_s"][i, t] - old[i, t]) if "teacher_s" in ctx else 0.0
            if script == "sd" and a.sd_loss == "token":
                A += a.lam * u
            if script == "antisd":
                A += a.lam_max * (-0.5 * (math.log1p(math.exp(u)) - math.log(2)) if a.divergence == "jsd" else -u)
            rho = torch.exp(s[i, t] - old[i, t])
            clipped += int(rho.item() < 1 - a.eps_low or rho.item() > 1 + a.eps_high)
            loss = loss + aggregate(i, -torch.minimum(rho * A, rho.clamp(1 - a.eps_low, 1 + a.eps_high) * A))
            if a.beta > 0:
                d = old[i, t] - s[i, t]  # the reference is the initial model, which is pi_old here
                loss = loss + a.beta * aggregate(i, torch.exp(d) - d - 1)

    for i in distilled:
        for t in range(lengths[i]):
            if script == "hsd":  # Eq. 10: (1/B) sum_i (1/|o_i|) sum_t KL_t, full vocabulary, no importance weight
                S, T = logp[i, t], ctx["teacher_logp"][i, t]
                kl = (S.exp() * (S - T)).sum() if a.kl_direction == "reverse" else (T.exp() * (T - S)).sum()
                loss = loss + a.lam_sd * kl / lengths[i] / B
                continue
            weight = min(math.exp(float(s[i, t].detach() - old[i, t])), a.is_clip)
            if a.topk == 0:
                divergence = jsd(logp[i, t], ctx["teacher_logp"][i, t], a.jsd_alpha)
            else:
                index = ctx["topk"][i, t]
                target = with_tail(ctx["teacher_logp"][i, t], index)
                if script == "credit":  # Q ∝ T exp(-lam G) over the buckets, renormalised
                    target = target - a.contrast_weight * with_tail(ctx["contrast_logp"][i, t], index)
                    target = target - torch.logsumexp(target, 0)
                divergence = jsd(with_tail(logp[i, t], index), target, a.jsd_alpha)
            loss = loss + a.lam_sd * weight * divergence / n_distilled
    return loss, clipped


def context(script: str, args, batch, teacher_prompts: list, initial) -> dict:
    """What the loss by hand needs of one batch, from a plain forward of the initial weights (pi_old, the
    reference and, at step 0, every teacher): s_old, advantages, teacher log-probs, who is distilled."""
    G, r, rewards = args.group_size, batch.rollout, batch.rewards.tolist()
    with torch.no_grad():
        logp0 = completion_logprobs(initial, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                    args.temperature)
    lengths = r.completion_mask.sum(-1).long().tolist()
    ctx = {"batch": batch, "lengths": lengths, "old": logp0.gather(-1, r.completion_ids[..., None])[..., 0],
           "adv": group_advantages_by_hand(rewards, G, args.adv_scale)}
    if script == "grpo":
        return ctx
    B = len(lengths)
    own, contrasts = teacher_prompts_by_row(teacher_prompts, B)
    ids, mask = left_padded(own)
    with torch.no_grad():
        ctx["teacher_logp"] = completion_logprobs(initial, ids, mask, r.completion_ids, r.completion_mask,
                                                  args.temperature)
    ctx["teacher_s"] = ctx["teacher_logp"].gather(-1, r.completion_ids[..., None])[..., 0]
    correct = [v.correct for v in batch.verdicts]
    if script == "credit" or getattr(args, "context", None) == "sdpo":
        ctx["distilled"] = [i for i in range(B) if peer_exists(rewards, G, i)]
        assert script == "credit" or args.sd_loss == "logit"  # SDPO's mask also cuts token-mode credit: not used here
    elif script == "hsd" and args.on_success == "skip":
        ctx["distilled"] = [i for i in range(B) if not correct[i]]
    elif script == "hsd" or (script == "sd" and args.sd_loss == "logit"):
        ctx["distilled"] = list(range(B))
    if getattr(args, "topk", 0) > 0 and script in ("sd", "credit"):
        ctx["topk"] = logp0.topk(args.topk, dim=-1).indices
    if script == "credit":
        rows = ctx["distilled"]
        assert all(len(contrasts[i]) == (i in rows) for i in range(B))  # one contrast (C = 1) for distilled rows
        ids, mask = left_padded([contrasts[i][0] for i in rows])
        with torch.no_grad():
            contrast = completion_logprobs(initial, ids, mask, r.completion_ids[rows], r.completion_mask[rows],
                                           args.temperature)
        ctx["contrast_logp"] = torch.zeros_like(logp0)
        ctx["contrast_logp"][rows] = contrast
    return ctx


def peer_exists(rewards: list[float], G: int, i: int) -> bool:
    """SDPO's masking: another row of the group reached the success threshold 0.5."""
    return any(rewards[j] >= 0.5 for j in range(i - i % G, i - i % G + G) if j != i)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_matches_the_formula_by_hand(name, tmp_path, monkeypatch):
    script, extra = CASES[name]
    module = importlib.import_module(script)
    args = tyro.cli(module.Args, args=case_flags(name, tmp_path))
    args = apply_preset(args, getattr(module, "PRESETS", {}))
    recorder = Recorder(module, monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(args)
    finally:
        torch.set_num_threads(threads)
    assert len(recorder.updates) == args.ppo_epochs
    ctx = context(script, args, recorder.batch, recorder.teacher_prompts, model_with(recorder.updates[0][0]))
    assert any(x != 0 for x in ctx["adv"]), "the batch must have a group with mixed rewards"
    if "distilled" in ctx and (script == "credit" or getattr(args, "context", None) == "sdpo"):
        assert 0 < len(ctx["distilled"]) < len(ctx["lengths"]), "the case must distil some rows and not others"
    clipped = 0
    for weights, grads in recorder.updates:
        lm = model_with(weights)
        loss, n = expected_loss(script, args, ctx, lm)
        clipped += n
        loss.backward()
        assert_same_gradient(name, lm, grads)
    if args.ppo_epochs > 1:
        assert clipped > 0, "the second optimizer step must clip some ratios"


def assert_same_gradient(name: str, lm, grads: dict[str, torch.Tensor]) -> None:
    """The script's gradient (`grads`) against the one by hand (`lm`'s .grad), parameter by parameter."""
    for param_name, p in lm.named_parameters():
        got, want = grads.get(param_name), p.grad
        got = torch.zeros_like(p) if got is None else got
        want = torch.zeros_like(p) if want is None else want
        err = (got - want).norm() / max(want.norm(), got.norm(), 1e-12)
        assert err < 1e-3, f"{name}: {param_name} gradient off by {err:.2e} relative"


@pytest.mark.parametrize("script, flags, passes", [("grpo", [], 0), ("sd", [], 0), ("sd", ["--preset", "opsd"], 0),
                                                   ("antisd", [], 0), ("hsd", [], 0), ("sd", ["--preset", "sdpo"], 0),
                                                   ("credit", [], 0), ("sd", ["--ppo-epochs", "2"], 1),
                                                   ("credit", ["--ppo-epochs", "2"], 1)])
def test_one_update_per_batch_takes_s_old_from_the_update(script, flags, passes, tmp_path, monkeypatch):
    """With one update per batch the update's own forward is the rollout policy: no separate old-policy pass (its
    detached log-probs are s_old, its top-k the indices the teacher is scored at); with two, one."""
    module = importlib.import_module(script)
    calls, score = [], module.score_rollout
    monkeypatch.setattr(module, "score_rollout", lambda run, args, batch, model=None, **kw:
                        calls.append(model) or score(run, args, batch, model, **kw))
    args = tyro.cli(module.Args, args=[*FLAGS[:FLAGS.index("--micro-batch-rows")], "--output-dir", str(tmp_path),
                                       "--beta", "0", *flags])
    module.main(args)
    assert sum(model is None for model in calls) == passes  # model None: the policy's own (old-policy) pass


@pytest.mark.parametrize("script", ["grpo", "sd", "credit", "antisd", "hsd"])
def test_micro_batching_changes_no_metric(script, tmp_path):
    """Each default recipe logs the same metrics (to float rounding) with micro-batches of 4 rows and of 64."""
    module = importlib.import_module(script)
    logged = []
    for rows in ("4", "64"):
        out = tmp_path / rows
        flags = [*FLAGS[:FLAGS.index("--micro-batch-rows")], "--total-steps", "2", "--seed", "3",
                 "--output-dir", str(out), "--micro-batch-rows", rows]
        torch.manual_seed(0)
        module.main(tyro.cli(module.Args, args=flags))
        logged.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    for first, second in zip(*logged):
        keys = [k for k in first if not k.startswith("perf/") and isinstance(first[k], float)]
        assert keys and set(first) == set(second)
        assert {k: second[k] for k in keys} == pytest.approx({k: first[k] for k in keys}, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["grpo-preset-grpo", "sd-sdpo", "sd-logit-one-update", "hsd"])
def test_two_ranks_give_the_gradient_of_their_whole_batch(name, tmp_path):
    """torchrun with 2 ranks (FSDP2 over gloo): the averaged gradient is the loss by hand over both ranks' rows
    with the global denominators (rows, tokens, distilled tokens), as one process with the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29620 + list(CASES).index(name)), __file__, name, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script, extra = CASES[name]
    module = importlib.import_module(script)
    args = tyro.cli(module.Args, args=case_flags(name, tmp_path / "run"))
    args = apply_preset(args, getattr(module, "PRESETS", {}))
    records = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    initial = model_with(records[0]["updates"][0][0])
    ctxs = [context(script, args, rec["batch"], rec["teacher_prompts"], initial) for rec in records]
    lengths = [n for c in ctxs for n in c["lengths"]]
    totals = {"rows": len(lengths), "tokens": sum(lengths),
              "distilled": sum(c["lengths"][i] for c in ctxs for i in c.get("distilled", []))}
    assert len(records[0]["updates"]) == args.ppo_epochs and any(x != 0 for c in ctxs for x in c["adv"])
    for weights, grads in records[0]["updates"]:
        lm = model_with(weights)
        sum(expected_loss(script, args, c, lm, totals)[0] for c in ctxs).backward()
        assert_same_gradient(name, lm, grads)


if __name__ == "__main__":  # under torchrun (the test above): run one case and save what this rank saw
    name, out = sys.argv[1], Path(sys.argv[2])
    module = importlib.import_module(CASES[name][0])

    class Patch:
        setattr = staticmethod(setattr)

    recorder = Recorder(module, Patch())
    module.main(cli(module.Args, args=case_flags(name, out / "run")))
    rank = int(os.environ["RANK"])
    torch.save({"batch": recorder.batch, "teacher_prompts": recorder.teacher_prompts, "updates": recorder.updates},
               out / f"rank{rank}.pt")
