"""Atomic save / resume of model, optimizer, teacher slot, step, RNG states and data position.

Layout: `<output_dir>/checkpoint/{state.pt, model/}` where `model/` is a Hugging Face directory
(`from_pretrained` loads it). Under LoRA both hold only the adapters (`model/` in peft's format, which
`PeftModel.from_pretrained(base, model/)` or `from_pretrained(model/)` loads): the base weights never change,
and a resumed run reloads them from `--model`. A save writes `.checkpoint.tmp` and renames it into place, so a crash
mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError
from common.models import has_adapters

# torch.distributed.checkpoint is imported inside the functions that use it: it costs about 0.7 s, which a
# command line with a bad flag should not wait for.


def full_options():
    """Unsharded state dicts, offloaded to CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    """Every RNG a step consumes: python, numpy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, only the adapters' under LoRA (a collective under FSDP2: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=full_options())
    return {k: v for k, v in state.items() if "lora_" in k} if has_adapters(module) else state


def set_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load `full_model_state`'s output back (under LoRA, the adapters only: the base weights are already loaded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    adapters = has_adapters(module)
    if adapters != all("lora_" in k for k in state):
        saved, now = ("LoRA adapters", "all weights") if not adapters else ("all weights", "LoRA adapters")
        raise UserError(f"{where} holds {saved}, but this run trains {now}: resume with the same --lora-rank")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=not adapters)
    misfit = f"{where}: its adapters do not fit this run's (another --lora-rank or --lora-targets?)"
    try:
        result = set_model_state_dict(module, state, options=options)
    except RuntimeError as e:  # shapes differ: another rank
        if not adapters:
            raise
        raise UserError(f"{misfit}: {str(e).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if adapters and (result.unexpected_keys or missing):
        raise UserError(f"{misfit}: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")


def export_hf(policy: torch.nn.Module, tokenizer, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the policy as a Hugging Face model directory, or as a peft adapter directory under LoRA (call on
    rank 0 with the full state)."""
    state = state if state is not None else full_model_state(policy)
    lm_state = {k.removeprefix("lm."): v for k, v in state.items()}
    if has_adapters(policy):  # peft's layout: adapter_config.json + adapter_model.safetensors
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        adapters = get_peft_model_state_dict(policy.lm, state_dict=lm_state)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapters.items()},
                  path / "adapter_model.safetensors", metadata={"format": "pt"})
        policy.lm.peft_config["default"].save_pretrained(path)
    else:
        policy.lm.save_pretrained(path, state_dict=lm_state)
    tokenizer.save_pretrained(path)


def save(output_dir: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer, step: int,
         extra: dict[str, Any], teacher: torch.nn.Module | None = None) -> Path:
    """Atomically write the checkpoint after `step` completed steps; returns its path. All ranks call."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = full_model_state(policy)
    optim_state = get_optimizer_state_dict(policy, optimizer, options=full_options())
    teacher_state = full_model_state(teacher) if teacher is not None else None
    rngs = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    final = output_dir / "checkpoint"
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp, old = output_dir / ".checkpoint.tmp", output_dir / ".checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"step": step, "model": model_state, "optimizer": optim_state, "teacher": teacher_state,
                    "rng": rngs, "extra": extra}, tmp / "state.pt")
        export_hf(policy, tokenizer, tmp / "model", model_state)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def find(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in `output_dir` (the old one survives a crash mid-rename)."""
    for name in ("checkpoint", ".checkpoint.old"):
        if (output_dir / name / "state.pt").exists():
            return output_dir / name
    return None


def clear(output_dir: Path) -> None:
    """Delete every checkpoint in `output_dir` (a fresh run must never resume an older run's weights)."""
    for name in ("checkpoint", ".checkpoint.old", ".checkpoint.tmp"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def load(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
         teacher: torch.nn.Module | None = None) -> tuple[int, dict]:
    """Restore model, optimizer, teacher and this rank's RNG; returns (step, extra)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_model_state(policy, state["model"], path)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=full_options())
    if teacher is not None:
        if state["teacher"] is None:
            raise ValueError(f"{path} has no teacher weights; it was saved by a run without one")
        set_model_state(teacher, state["teacher"], path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state["step"], state["extra"]
