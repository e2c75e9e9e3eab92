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
