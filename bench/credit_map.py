"""The per-token credit map: which tokens a self-teacher pushes up or down, on one sampled batch.

Samples one batch (P prompts x G completions) with a self-distillation script's own rollout, verifies it,
builds each row's teacher message with the script's own template and scores the same completion tokens
under the student (its own prompt) and the teacher (the same weights after the teacher message, as every
teacher is at step 0) with the scripts' scoring functions. The credit is u_t = log pi_T(y_t) - log pi_S(y_t)
on distilled tokens (0 elsewhere). It writes into --output-dir:

    credit_map.html   each rollout's tokens coloured by u_t (green up, red down), the values on hover (and the
                      script's per-token advantage where it has one), its teacher message beside it; no network
    heatmap.png       the tokens of the batch over (pi_S, pi_T): their count and their mean u_t (AntiSD Fig. 2b)
    tokens.md         the tokens with the most positive and the most negative mean u_t
    credit_map.json   every value shown

The script is `sd`, `antisd` or `hsd` (CREDIT's context is SDPO's: `sd --preset sdpo`); every other flag is
that script's own, so the map shows exactly a configuration it trains with:

    python bench/credit_map.py antisd                                    # the toy model and task, AntiSD's context
    python bench/credit_map.py sd --preset sdpo --model smollm2-135m --dataset "rg:chain_sum" \\
        --num-prompts 4 --group-size 8 --max-new-tokens 96 --temperature 0.7 --output-dir maps/sdpo
    python bench/credit_map.py hsd --model runs/my-run/checkpoint/model  # a run's saved policy
"""
from __future__ import annotations

import html
import importlib
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.args import apply_preset  # noqa: E402
from common.batch import collect_batch, score_rollout  # noqa: E402
from common.data import PromptSampler, load_examples  # noqa: E402
from common.dist import Dist  # noqa: E402
from common.models import load_policy, load_tokenizer  # noqa: E402
from common.teacher import score_teacher  # noqa: E402

SCRIPTS = ("sd", "antisd", "hsd")
BINS = 20
"""Bins per axis of the (pi_S, pi_T) heatmap."""


def parse(argv: list[str]):
    """(script module, its Args) from `SCRIPT [its flags]`; presets applied."""
    if not argv or argv[0] not in SCRIPTS:
        raise SystemExit(f"usage: credit_map.py {{{','.join(SCRIPTS)}}} [the script's flags]  (got {argv[:1]})")
    module = importlib.import_module(argv[0])
    args = tyro.cli(module.Args, args=argv[1:], prog=f"credit_map.py {argv[0]}")
    return module, apply_preset(args, getattr(module, "PRESETS", {}))


def teacher_messages(module, args, batch, generator: torch.Generator) -> tuple[list, torch.Tensor]:
    """Each row's teacher message by the script's own function, and which rows it distils."""
    correct = torch.tensor([v.correct for v in batch.verdicts])
    if module.__name__ == "sd":
        return module.teacher_messages(batch, args, generator)
    if module.__name__ == "antisd":
        return module.teacher_messages(batch, args, generator)[0], torch.ones_like(correct)
    messages, _ = module.teacher_messages(batch, correct, args, generator)
    return messages, ~correct if args.on_success == "skip" else torch.ones_like(correct)


def token_advantages(module, args, batch, credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The script's per-token advantage where its loss has one: sd.py's token mode A_i + lam u, AntiSD's
    A_i + lam_max (-phi(u)) with the gate on (g = 1, after warm-up); None for the logit-level losses."""
    advantages = args.grpo_coef * module.group_advantages(batch.rewards, args.group_size, args.adv_scale)
    if module.__name__ == "sd" and args.sd_loss == "token":
        return (advantages[:, None] + args.lam * credit) * mask
    if module.__name__ == "antisd":
        return (advantages[:, None] + args.lam_max * module.antisd_credit(credit, args.divergence)) * mask
    return None


def credit_map(module, args) -> dict:
    """One batch sampled and scored as the script does at step 0: per row, its tokens and their values."""
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    policy = load_policy(args.model, torch.device("cpu")).eval()
    examples = load_examples(args.dataset, "train")
    run = SimpleNamespace(policy=policy, teacher_model=policy, tokenizer=tokenizer, d=Dist(),
                          sampler=PromptSampler(examples, args.seed), local_prompts=args.num_prompts)
    batch = collect_batch(run, args)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003)  # the scripts' generator at step 0, rank 0
    messages, distilled = teacher_messages(module, args, batch, generator)
    mask = batch.rollout.completion_mask.float()
    student = score_rollout(run, args, batch)["logprobs"]
    teacher = score_teacher(run, args, batch, messages, args.max_teacher_prompt_tokens)["logprobs"]
    credit = module.token_credit(teacher, student, mask * distilled[:, None].float())
    advantages = token_advantages(module, args, batch, credit, mask)
    rows = []
    for i, n in enumerate(mask.sum(-1).long().tolist()):
        ids = batch.rollout.completion_ids[i, :n].tolist()
        rows.append({"row": i, "group": i // args.group_size, "reward": float(batch.rewards[i]),
                     "correct": batch.verdicts[i].correct, "distilled": bool(distilled[i]),
                     "prompt": batch.examples[i].prompt, "teacher_message": messages[i].text,
                     "ids": ids, "tokens": [tokenizer.decode([t]) for t in ids], "log_pi_s": student[i, :n].tolist(),
                     "log_pi_t": teacher[i, :n].tolist(), "u": credit[i, :n].tolist(),
                     "advantage": advantages[i, :n].tolist() if advantages is not None else None})
    return {"script": module.__name__, "context": getattr(args, "context", module.__name__), "model": args.model,
            "dataset": args.dataset, "rows": rows}


def colour(u: float, scale: float) -> str:
    """Green for u > 0 (the teacher pushes the token up), red for u < 0; opacity sqrt(|u| / scale), so small u show."""
    alpha = min(abs(u) / scale, 1.0) ** 0.5
    return f"rgba(0,150,60,{alpha:.3f})" if u > 0 else f"rgba(210,30,30,{alpha:.3f})"


def render_html(data: dict) -> str:
    """A self-contained page: no script, no stylesheet or image from anywhere."""
    values = [abs(u) for r in data["rows"] if r["distilled"] for u in r["u"]]
    scale = sorted(values)[int(0.98 * (len(values) - 1))] if values else 1.0
    scale = max(scale, 1e-6)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>credit map: {html.escape(data['script'])}"
             "</title><style>body{font-family:sans-serif;margin:1em}.row{display:flex;gap:1em;border-top:1px solid "
             "#ccc;padding:.5em 0}.tokens{flex:1;font-family:monospace;white-space:pre-wrap}.context{flex:1;"
             "font-size:85%;white-space:pre-wrap;background:#f6f6f6;padding:.3em}.off{color:#999}</style></head><body>",
             f"<h1>Credit map: {html.escape(data['script'])}.py, {html.escape(data['context'])}'s context</h1>"
             f"<p>model {html.escape(data['model'])}, dataset "
             f"{html.escape(data['dataset'])}. Tokens coloured by u<sub>t</sub> = log &pi;<sub>T</sub> - log "
             f"&pi;<sub>S</sub> (green: the teacher pushes the token up; red: down; opacity sqrt(|u| / {scale:.3g}), "
             f"the 98th percentile of |u|); hover a token for its values. Grey rows are not distilled.</p>"]
    for r in data["rows"]:
        spans = []
        for j, token in enumerate(r["tokens"]):
            u = r["u"][j]
            title = f"u={u:+.4f}  log pi_S={r['log_pi_s'][j]:.4f}  log pi_T={r['log_pi_t'][j]:.4f}"
            if r["advantage"] is not None:
                title += f"  A_t={r['advantage'][j]:+.4f}"
            text = html.escape(token.replace("\n", "\u21b5\n"))
            spans.append(f"<span title='{title}' style='background:{colour(u, scale)}'>{text}</span>")
        status = "correct" if r["correct"] else "wrong"
        head = (f"<b>row {r['row']}</b> (group {r['group']}, reward {r['reward']:g}, {status}"
                f"{'' if r['distilled'] else ', not distilled'})")
        parts.append(f"<div class='row'><div class='tokens{'' if r['distilled'] else ' off'}'>{head}\n"
                     f"{''.join(spans)}</div><div class='context'><b>teacher message</b>\n"
                     f"{html.escape(r['teacher_message'])}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def heatmap(data: dict, path: Path) -> None:
    """Distilled tokens over (pi_S, pi_T) bins: their count (log scale) and their mean u_t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s, t, u = (np.array([x for r in data["rows"] if r["distilled"] for x in r[k]])
               for k in ("log_pi_s", "log_pi_t", "u"))
    edges = np.linspace(0, 1, BINS + 1)
    count, _, _ = np.histogram2d(np.exp(s), np.exp(t), bins=[edges, edges])
    total, _, _ = np.histogram2d(np.exp(s), np.exp(t), bins=[edges, edges], weights=u)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    limit = max(float(np.nanmax(np.abs(mean))) if count.any() else 1.0, 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    panels = [(np.log10(np.where(count > 0, count, np.nan)), "viridis", None, "tokens (log10 count)"),
              (mean, "RdYlGn", (-limit, limit), "mean u_t = log pi_T - log pi_S")]
    for ax, (values, cmap, limits, label) in zip(axes, panels):
        image = ax.imshow(values.T, origin="lower", extent=(0, 1, 0, 1), cmap=cmap, aspect="equal",
                          vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6)
        ax.set_xlabel("pi_S(y_t): student"), ax.set_ylabel("pi_T(y_t): teacher")
        fig.colorbar(image, ax=ax, label=label)
    fig.suptitle(f"{data['script']}.py, {data['context']}'s context, {data['model']}: {len(u)} distilled tokens")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_table(data: dict, top: int = 10, min_count: int = 2) -> str:
    """Markdown: the tokens (as text) with the most positive and most negative mean u_t over distilled tokens
    seen at least `min_count` times (once, when no token repeats)."""
    seen: dict[str, list[float]] = defaultdict(list)
    for r in data["rows"]:
        if r["distilled"]:
            for token, u in zip(r["tokens"], r["u"]):
                seen[token].append(u)
    if not any(len(v) >= min_count for v in seen.values()):
        min_count = 1
    means = sorted(((sum(v) / len(v), len(v), k) for k, v in seen.items() if len(v) >= min_count), reverse=True)
    lines = [f"Tokens of distilled rows seen at least {min_count} time(s), by mean u_t = log pi_T - log pi_S.", ""]
    for title, chosen in (("pushed up (most positive mean u_t)", means[:top]),
                          ("pushed down (most negative mean u_t)", means[::-1][:top])):
        lines += [f"**{title}**", "", "| token | mean u_t | count |", "| --- | --- | --- |"]
        lines += [f"| `{json.dumps(token)[1:-1]}` | {mean:+.3f} | {n} |" for mean, n, token in chosen]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    module, args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir or f"runs/credit_map__{module.__name__}__{getattr(args, 'preset', 'none')}")
    out.mkdir(parents=True, exist_ok=True)
    data = credit_map(module, args)
    (out / "credit_map.json").write_text(json.dumps(data))
    (out / "credit_map.html").write_text(render_html(data), encoding="utf-8")
    heatmap(data, out / "heatmap.png")
    table = token_table(data)
    (out / "tokens.md").write_text(table + "\n")
    u = [x for r in data["rows"] if r["distilled"] for x in r["u"]]
    print(table)
    print(f"{len(data['rows'])} rows, {len(u)} distilled tokens, mean u_t {sum(u) / max(len(u), 1):+.4f}, "
          f"mean |u_t| {sum(map(abs, u)) / max(len(u), 1):.4f}; wrote {out}/credit_map.html, heatmap.png, "
          f"tokens.md, credit_map.json")
    return out


if __name__ == "__main__":
    main()
