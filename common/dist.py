"""torchrun process-group setup, FSDP2 wrapping, rank-0 helpers and all-reduce of statistics."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16 autocast on a single unsharded GPU; FSDP2 mixed precision handles the sharded case."""
        if self.device.type == "cuda" and not self.sharded:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def init_dist() -> Dist:
    """Join the torchrun process group if launched by torchrun (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # CPU-side statistics are reduced over gloo even on GPU runs (nccl only takes CUDA tensors).
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world_size, local_rank, device)


@contextlib.contextmanager
def unsharded(module: nn.Module | None):
    """Under FSDP2, gather a module's root parameters (embeddings, final norm, LM head) so that they can be used
    outside its own forward, e.g. a frozen teacher's head inside the policy's forward; a no-op otherwise."""
    if module is None or not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def shard(policy: nn.Module, d: Dist) -> nn.Module:
    """FSDP2: one group per decoder layer, then the root; bf16 params with fp32 reduce on GPU."""
    if not d.sharded:
        return policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if d.device.type == "cuda" else MixedPrecisionPolicy()
    for layer in policy.lm.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    # FSDP2 initialises lazily on the first forward and insists it goes through the root; generation
    # calls the inner LM directly, so run one tiny forward through the root now.
    with torch.no_grad():
        ids = torch.zeros(1, 2, dtype=torch.long, device=d.device)
        policy(ids, torch.ones_like(ids), completion_len=1)
    policy.reshard()  # the root stays unsharded after forward; the optimizer must see sharded params
    return policy


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum/max/min a tensor over ranks (identity when not distributed)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def gather_floats(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D float tensor from every rank (for global medians and std)."""
    if not dist.is_initialized():
        return values
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros(n, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, once every rank has got here (a rank tearing gloo down while another still
    talks to it can abort the process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
