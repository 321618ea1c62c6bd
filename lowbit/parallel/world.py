"""Process-group set-up from torchrun's environment, the device mesh, and the model wrappers of stage 5.

`init` is the only place that creates global state (the default process group), as DESIGN.md allows.
`apply` composes, in this order: tensor/sequence parallelism (DTensor) or Ulysses on the model, then
the data-parallel wrapper: DDP, or FSDP2 (`fully_shard`) when parallel.dp_shard > 1.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.config import ParallelConfig
from lowbit.parallel.mesh import Layout, layout_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: Layout | None = None    # dp x ulysses x tp degrees; None = plain data parallelism over all ranks
    mesh: Any = None                # torch DeviceMesh with axes ("dp", "ulysses", "tp") when any degree > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: ranks that see different batches (TP and Ulysses ranks share one)."""
        return self.layout.dp if self.layout is not None else self.world_size

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[0] if self.layout is not None else self.rank

    @property
    def tensor_parallel(self) -> bool:
        return self.layout is not None and self.layout.tp > 1

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
    layout = layout_for(cfg, world_size)     # raises on a bad layout before any process-group work
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo on CPU")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if backend == "nccl" else None)
    mesh = None
    if layout.tp > 1 or layout.ulysses > 1 or cfg.dp_shard > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (layout.dp, layout.ulysses, layout.tp),
                                mesh_dim_names=("dp", "ulysses", "tp"))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, layout=layout, mesh=mesh)


def apply(model: nn.Module, world: World, cfg: ParallelConfig) -> nn.Module:
    """Shard `model` (already on its device) over the mesh, then wrap it for data parallelism.

    TP: parameters become DTensors over the "tp" axis (lowbit.parallel.tensor). Ulysses: the model is
    wrapped to run a sequence shard per rank (lowbit.parallel.ulysses), inside each TP shard's heads when
    both are on; DDP, or FSDP2 (with TP, or parallel.dp_shard>1), then averages over all dp x ulysses
    ranks, which that wrapper's gradient scaling makes the right mean.
    """
    if not world.distributed:
        return model
    if cfg.data_parallel == "deepspeed":
        return model     # the DeepSpeed engine wraps model and optimizer together (lowbit.parallel.deepspeed)
    layout = world.layout
    if layout is not None and layout.tp > 1:
        from lowbit.parallel.tensor import apply_tensor_parallel
        model = apply_tensor_parallel(model, world.mesh["tp"], sequence_parallel=cfg.sp)
    if layout is not None and layout.ulysses > 1:
        from lowbit.parallel.ulysses import apply_ulysses
        model = apply_ulysses(model, world.mesh["ulysses"].get_group())
    if layout is not None and layout.fsdp:
        from lowbit.parallel.fsdp import apply_fsdp2
        # Ulysses ranks hold the same parameters as their dp replicas: FSDP2 shards over both axes
        replicas = world.mesh["dp"] if layout.ulysses == 1 else world.mesh["dp", "ulysses"]._flatten("dp_ulysses")
        return apply_fsdp2(model, replicas, param_dtype=cfg.fsdp_param_dtype, reduce_dtype=cfg.fsdp_reduce_dtype,
                           reshard_after_forward=cfg.fsdp_reshard_after_forward,
                           reduce_every_micro_batch=cfg.fsdp_reduce_every_micro_batch,
                           fp8_all_gather=cfg.fsdp_fp8_all_gather)
    if layout is not None and layout.tp > 1:
        return model     # TP alone: no other ranks (with any, layout.fsdp is set)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=cfg.find_unused_parameters)


def gradient_group(world: World):
    """The process group an optimizer that averages its own gradients (AdamA) reduces over: every rank (None) under
    DDP, with or without Ulysses, as DDP's own averaging does; the one-rank "dp" group under tensor parallelism
    alone, whose ranks hold different shards and no replicas."""
    if world.tensor_parallel and not world.layout.fsdp:
        return world.mesh["dp"].get_group()
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model inside DDP, the Ulysses wrapper, a DeepSpeed engine and torch.compile's wrapper."""
    from lowbit.parallel.deepspeed import EngineModel
    from lowbit.parallel.ulysses import UlyssesCausalLM
    while True:
        if (isinstance(model, (DistributedDataParallel, UlyssesCausalLM, EngineModel))
                or type(model).__name__ == "DeepSpeedEngine"):
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


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def loss_context(world: World):
    """Context for a loss's forward and backward: vocabulary-parallel cross-entropy under TP, else nothing."""
    from lowbit.parallel.tensor import loss_context as tensor_loss_context
    return tensor_loss_context(world.tensor_parallel)


def to_local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor for logging/reduction: a replicated DTensor (the loss under TP) becomes its value."""
    from lowbit.parallel.tensor import to_local as tensor_to_local
    return tensor_to_local(value)


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside DDP only: keeps the Ulysses wrapper (its forward shards the sequence), for evaluation."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def deepspeed_engine(model: nn.Module, optimizer, cfg, world: World, grad_accum: int):
    """(EngineModel, EngineOptimizer) for parallel.data_parallel=deepspeed; `cfg` is the whole LowbitConfig.

    Compute stays in lowbit's hands: fp32 master weights with the trainer's autocast, not DeepSpeed's bf16 mode.
    """
    from lowbit.parallel.deepspeed import build_engine, engine_config
    config = engine_config(cfg.parallel, cfg.trainer, cfg.optim, grad_accum, world.dp_size, bf16=False,
                           autocast=mixed_precision_dtype(cfg.trainer.mixed_precision, world.device.type))
    return build_engine(model, optimizer, config)


def mixed_precision_dtype(mode: str, device_type: str) -> torch.dtype | None:
    """The trainer's autocast dtype for trainer.mixed_precision (auto: bf16 on CUDA, none elsewhere)."""
    if mode == "auto":
        mode = "bf16" if device_type == "cuda" else "none"
    if mode == "bf16":
        return torch.bfloat16
    if mode == "none":
        return None
    raise ValueError(f"trainer.mixed_precision={mode!r} is not known; use auto, bf16 or none")
