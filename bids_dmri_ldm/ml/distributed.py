"""torch.distributed plumbing: DistributedDataParallel when launched by ``torchrun``.

``torchrun --nproc_per_node=G ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; we then
join a process group (NCCL on CUDA, gloo on CPU), put each process on its own
GPU, wrap networks in DDP and shard batches with a DistributedSampler.  Without
those variables everything runs in one process, unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device | str) -> DistContext:
    """Join the process group described by the environment (torchrun), if any.

    Parameters
    ----------
    device : the device chosen for a single-process run (``ml.device.resolve_device``);
        under DDP on CUDA each process uses ``cuda:LOCAL_RANK`` instead.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank, world, device)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else ``module``.

    Buffers are not broadcast: the VQ-VAE codebook (EMA buffers) is synchronised by
    MONAI's quantiser itself (``ddp_sync``) with an all-reduce.
    """
    if not ctx.is_distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def mean_across(value: float, ctx: DistContext) -> float:
    """Average a Python float over all processes (for logging)."""
    if not ctx.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (call once at the end of a torchrun job)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
