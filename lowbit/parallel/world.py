"""Process-group set-up from torchrun's environment, and the DDP wrapper.

`init` is the only place that creates global state (the default process group), as DESIGN.md allows.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(cfg: ParallelConfig) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                             f"visible; launch at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo on CPU")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if backend == "nccl" else None)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def apply(model: nn.Module, world: World, cfg: ParallelConfig) -> nn.Module:
    """Wrap `model` (already on its device) for data parallelism; identity on one process."""
    if not world.distributed:
        return model
    if cfg.data_parallel != "ddp":
        raise ValueError(f"parallel.data_parallel={cfg.data_parallel!r} is not supported; use ddp")
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=cfg.find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (and torch.compile's wrapper)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
