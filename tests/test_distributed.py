"""torchrun --nproc_per_node 2 (gloo, FSDP2 on CPU): a few steps, a checkpoint that from_pretrained loads, resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script, model, out, *extra, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / script), "--model", str(model), "--output-dir", str(out), "--total-steps", "2",
           "--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-every", "1",
           "--eval-size", "8", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script,extra,port", [("grpo.py", [], 29611), ("sd.py", ["--teacher", "ema"], 29612)])
def test_two_rank_fsdp_run_saves_loadable_model(tiny_model_dir, tmp_path, script, extra, port):
    from transformers import AutoModelForCausalLM

    rows = torchrun(script, tiny_model_dir, tmp_path / "run", *extra, "--learning-rate", "1e-2", port=port)
    assert [r["step"] for r in rows] == [0, 1] and all("eval/accuracy" in r for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, p), q in zip(saved.named_parameters(), initial.parameters()):
        assert p.shape == q.shape, name
    # Resuming under torchrun restores the sharded model and optimizer and continues the step count.
    more = torchrun(script, tiny_model_dir, tmp_path / "run", *extra, "--resume", "--total-steps", "3", port=port)
    assert [r["step"] for r in more] == [0, 1, 2]
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2


def test_two_rank_fsdp_lora_trains_adapters_and_resumes(tmp_path):
    """LoRA under FSDP2: frozen base and trainable adapters sharded together; the adapters alone are saved."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.models import resolve_model_path

    flags = ["--lora-rank", "4", "--beta", "0.05", "--learning-rate", "3e-3", "--max-new-tokens", "40"]
    rows = torchrun("grpo.py", "toy", tmp_path / "run", *flags, port=29613)
    assert [r["step"] for r in rows] == [0, 1] and all(r["loss/kl"] == r["loss/kl"] for r in rows)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    assert any(v.abs().max() > 0 for k, v in state["model"].items() if "lora_B" in k)  # the adapters trained
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy"))
    PeftModel.from_pretrained(base, tmp_path / "run" / "checkpoint" / "model")
    more = torchrun("grpo.py", "toy", tmp_path / "run", *flags, "--resume", "--total-steps", "3", port=29613)
    assert [r["step"] for r in more] == [0, 1, 2]
