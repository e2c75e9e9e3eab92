"""LoRA (`--lora-rank`, peft): only adapters train and are saved; adapters off is the base model, exactly."""
import importlib
import json

import pytest
import torch
import tyro

pytest.importorskip("peft")

from common import checkpoint  # noqa: E402
from common.args import cli  # noqa: E402
from common.models import WithoutAdapters, has_adapters, load_policy, load_tokenizer, resolve_model_path  # noqa: E402
from common.rollout import generate  # noqa: E402

FAST = ["--model", "toy", "--num-prompts", "4", "--group-size", "4", "--eval-every", "0",
        "--lora-rank", "4", "--learning-rate", "3e-3"]
SCRIPT_FLAGS = {"grpo": ["--beta", "0.05"], "sd": ["--teacher", "initial", "--beta", "0.05"],
                "credit": ["--teacher", "ema"], "antisd": [], "hsd": ["--teacher", "initial"]}


def run(script: str, out, *extra: str) -> list[dict]:
    module = importlib.import_module(script)
    module.main(tyro.cli(module.Args, args=[*FAST, "--output-dir", str(out), *extra]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scores(model, ids, mask, T=8):
    with torch.no_grad():
        return model(ids, mask, completion_len=T, with_entropy=True)


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("toy")
    torch.manual_seed(0)
    r = generate(load_policy("toy", torch.device("cpu")), tok, ["Q: 3 + 4 + 5 = ?", "Q: 10 + 9 = ?"], 3, 8)
    return r.input_ids, r.attention_mask, r.completion_mask


def train_adapters(policy, ids, mask, steps=3):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = -policy(ids, mask, completion_len=8)["logprobs"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_adapters_train_and_adapters_off_is_the_base_model_exactly(batch):
    ids, mask, _ = batch
    base = load_policy("toy", torch.device("cpu")).eval()
    lora = load_policy("toy", torch.device("cpu"), lora_rank=4).eval()
    assert has_adapters(lora) and not has_adapters(base)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * lora.lm.config.num_hidden_layers  # A and B of q k v o gate up down, per layer
    expected = scores(base, ids, mask)
    # B starts at zero: the fresh adapted model is the base model, bit for bit.
    assert torch.equal(scores(lora, ids, mask)["logprobs"], expected["logprobs"])
    before = {n: p.clone() for n, p in lora.named_parameters() if not p.requires_grad}
    train_adapters(lora.train(), ids, mask)
    lora.eval()
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    trained = scores(lora, ids, mask)["logprobs"]
    assert (trained - expected["logprobs"]).abs().max() > 1e-3  # the adapters learned something
    off = scores(WithoutAdapters(lora), ids, mask)
    for key in ("logprobs", "entropy"):
        assert torch.equal(off[key], expected[key])
    # Switching back on restores the adapted model and its trainability.
    assert torch.equal(scores(lora, ids, mask)["logprobs"], trained)
    assert all(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)


def test_checkpoint_holds_adapters_only_and_loads_with_peft(tmp_path, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run("grpo", out, "--total-steps", "2")
    state = torch.load(out / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    assert sum(v.numel() for v in state["model"].values()) < 0.1 * sum(
        p.numel() for p in load_policy("toy", torch.device("cpu")).parameters())
    assert sorted(p.name for p in (out / "checkpoint" / "model").iterdir() if "adapter" in p.name) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "checkpoint" / "model" / "model.safetensors").exists()
    # peft loads the exported adapters onto the base model: the same network as the checkpoint's policy.
    ids, mask, cmask = batch
    policy = load_policy("toy", torch.device("cpu"), lora_rank=4).eval()
    checkpoint.set_model_state(policy, state["model"], out)
    assert any(v.abs().max() > 0 for k, v in state["model"].items() if "lora_B" in k)  # it trained
    peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path("toy")),
                                        out / "checkpoint" / "model").eval()
    with torch.no_grad():
        logits = peft_lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    ours = scores(policy, ids, mask)["logprobs"]
    theirs = torch.log_softmax(logits[:, -9:-1].float(), -1).gather(-1, ids[:, -8:, None])[..., 0]
    assert torch.allclose(ours * cmask[:, -8:], theirs * cmask[:, -8:], atol=1e-5)


def test_resume_continues_a_lora_run_exactly(tmp_path):
    full = run("sd", tmp_path / "full", "--total-steps", "3", "--teacher", "ema")
    run("sd", tmp_path / "cut", "--total-steps", "3", "--teacher", "ema", "--save-every", "2")
    (tmp_path / "cut" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]))
    # Replace the final checkpoint by the step-2 one: rerun 2 steps, then resume to 3.
    run("sd", tmp_path / "two", "--total-steps", "2", "--teacher", "ema")
    resumed = run("sd", tmp_path / "two", "--total-steps", "3", "--teacher", "ema", "--resume")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    state = torch.load(tmp_path / "two" / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    assert all("lora_" in k for k in state["teacher"])  # the EMA teacher's adapters, not a full copy


def test_resume_with_another_lora_setting_is_refused(tmp_path):
    run("grpo", tmp_path / "r", "--total-steps", "1")
    module = importlib.import_module("grpo")
    i = FAST.index("--lora-rank")
    args = FAST[:i] + FAST[i + 2:]
    with pytest.raises(ValueError, match="holds LoRA adapters, but this run trains all weights"):
        module.main(tyro.cli(module.Args, args=[*args, "--output-dir", str(tmp_path / "r"), "--total-steps", "2",
                                                "--resume"]))
    with pytest.raises(ValueError, match="adapters do not fit"):
        run("grpo", tmp_path / "r", "--total-steps", "2", "--resume", "--lora-rank", "8")


@pytest.mark.parametrize("script", list(SCRIPT_FLAGS))
def test_every_script_trains_adapters_without_a_second_model(script, tmp_path, monkeypatch, capsys):
    import common.run

    loads = []
    original = common.run.load_policy
    monkeypatch.setattr(common.run, "load_policy", lambda *a, **k: loads.append(a) or original(*a, **k))
    rows = run(script, tmp_path / script, "--total-steps", "2", *SCRIPT_FLAGS[script])
    assert len(loads) == 1  # the reference and an `initial` teacher are the policy with its adapters off
    assert all(all(v == v for v in r.values()) for r in rows)
    assert "M trained)" in capsys.readouterr().out
    state = torch.load(tmp_path / script / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    assert any(v.abs().max() > 0 for k, v in state["model"].items() if "lora_B" in k), f"{script}: nothing learned"


@pytest.mark.parametrize("flags, message", [(["--lora-rank", "-1"], "--lora-rank"),
                                            (["--lora-alpha", "0"], "--lora-alpha"),
                                            (["--lora-targets", " , "], "--lora-targets")])
def test_bad_lora_flags(flags, message, capsys):
    import grpo

    with pytest.raises(SystemExit) as exc:
        cli(grpo.Args, args=flags)
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="--lora-targets no_such_proj"):
        load_policy("toy", torch.device("cpu"), lora_rank=4, lora_targets="no_such_proj")
