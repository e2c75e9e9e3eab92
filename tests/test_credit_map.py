"""bench/credit_map.py: the values it shows are the scripts' own, checked against a plain forward by hand; the
page is self-contained."""
import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.models import load_tokenizer, resolve_model_path
from common.prompts import render_prompts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import credit_map  # noqa: E402

FLAGS = ["--model", "toy", "--num-prompts", "4", "--group-size", "4", "--seed", "1"]


class Spans(HTMLParser):
    """Every tag of the page, and the title and text of each token span."""

    def __init__(self):
        super().__init__()
        self.tags, self.spans, self.open = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "span":
            self.spans.append([dict(attrs)["title"], ""])
            self.open = True

    def handle_endtag(self, tag):
        self.open = self.open and tag != "span"

    def handle_data(self, data):
        if self.open:
            self.spans[-1][1] += data


def by_hand(lm, ids: list[int], prompt: str, tokenizer, temperature: float) -> list[float]:
    """log pi(y_t | prompt, y_<t) / tau of completion ids after a chat-rendered prompt: one plain forward."""
    p = tokenizer(render_prompts(tokenizer, [prompt])[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def group_advantages_by_hand(rewards: list[float], G: int) -> list[float]:
    out = []
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        out += [(x - mean) / (std + 1e-4) for x in r]
    return out


@pytest.mark.parametrize("script, flags", [("antisd", []), ("sd", ["--preset", "sdpo"]), ("hsd", [])])
def test_credit_map_shows_the_scripts_values_on_a_self_contained_page(script, flags, tmp_path):
    out = credit_map.main([script, *FLAGS, *flags, "--output-dir", str(tmp_path)])
    data = json.loads((out / "credit_map.json").read_text())
    module, args = credit_map.parse([script, *FLAGS, *flags])
    rows, tokenizer = data["rows"], load_tokenizer("toy")
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy"), dtype=torch.float32)
    assert len(rows) == 16 and all(len(r["ids"]) == len(r["tokens"]) == len(r["u"]) > 0 for r in rows)
    adv = group_advantages_by_hand([r["reward"] for r in rows], 4)
    for r in rows:
        s = by_hand(lm, r["ids"], r["prompt"], tokenizer, args.temperature)
        t = by_hand(lm, r["ids"], r["teacher_message"], tokenizer, args.temperature)
        assert r["log_pi_s"] == pytest.approx(s, abs=1e-4) and r["log_pi_t"] == pytest.approx(t, abs=1e-4)
        u = [b - a if r["distilled"] else 0.0 for a, b in zip(s, t)]
        assert r["u"] == pytest.approx(u, abs=2e-4)
        if script == "antisd":  # A_i + lam_max * (-phi(u)), phi the JSD's: 0.5 (log(1 + e^u) - log 2)
            want = [adv[r["row"]] + args.lam_max * -0.5 * (math.log1p(math.exp(x)) - math.log(2)) for x in u]
            assert r["advantage"] == pytest.approx(want, abs=2e-4)
        else:
            assert r["advantage"] is None  # SDPO's and HSD's losses have no per-token advantage
    if script == "sd":  # SDPO: a row is distilled when another row of its group succeeded
        for r in rows:
            group = [x for x in rows if x["group"] == r["group"] and x["row"] != r["row"]]
            assert r["distilled"] == any(x["reward"] >= 0.5 for x in group)
        assert {r["distilled"] for r in rows} == {True, False}, "seed 1 should give both kinds of rows"
    else:
        assert all(r["distilled"] for r in rows)

    page = (out / "credit_map.html").read_text()
    parser = Spans()
    parser.feed(page)
    assert not any(k in ("src", "href") for _, attrs in parser.tags for k in attrs)  # nothing fetched
    assert not any(tag in ("script", "link", "img", "iframe") for tag, _ in parser.tags)
    shown = [(title, text) for title, text in parser.spans]
    tokens = [(r, j) for r in rows for j in range(len(r["tokens"]))]
    assert len(shown) == len(tokens)
    for (title, text), (r, j) in zip(shown, tokens):
        assert text.replace("\u21b5", "") == r["tokens"][j]
        assert title.startswith(f"u={r['u'][j]:+.4f}  log pi_S={r['log_pi_s'][j]:.4f}  log pi_T={r['log_pi_t'][j]:.4f}")
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "tokens.md").read_text()
    assert "pushed up" in table and "pushed down" in table


def test_credit_map_refuses_a_script_without_a_teacher():
    with pytest.raises(SystemExit, match="usage"):
        credit_map.parse(["grpo"])
