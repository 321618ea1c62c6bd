"""What lowbit's checkpointer (rank 0 writes one safetensors file and one optimizer.pt) reads and writes
when the live model is sharded: full, plain tensors gathered on every rank before the save, and on load
each rank keeps its own slice of the full tensors it read (no communication).

DTensor parameters (TP, FSDP2) and DeepSpeed's flat-buffer views (ZeRO-1/2) are handled; plain models
pass through unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lowbit.precision.fp8_gather import ShardedFP8Weight


def _full(value):
    return plain(value.full_tensor() if isinstance(value, DTensor) else value)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The float32 tensor inside an FSDP2 shard that all-gathers in FP8 (lowbit.precision.fp8_gather), else `tensor`:
    a wrapper subclass has no storage of its own (data_ptr 0), and safetensors takes plain tensors only."""
    return tensor._inner if isinstance(tensor, ShardedFP8Weight) else tensor


def _like(full: torch.Tensor, live) -> torch.Tensor:
    """`full` sliced as `live` is sharded (each rank cuts its own piece: src_data_rank=None)."""
    if isinstance(live, DTensor) and not isinstance(full, DTensor):
        return distribute_tensor(full.to(live.device), live.device_mesh, live.placements, src_data_rank=None)
    return full


class FullStateView(nn.Module):
    """state_dict: full contiguous tensors (one copy per tied group), gathered when the view is made, so
    build it on every rank; load_state_dict: slices the full tensors into the live (sharded) parameters."""

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", module)      # not a registered child: no second copy of the names
        copies, self._state = {}, {}
        for name, tensor in module.state_dict().items():
            local = plain(tensor.to_local() if isinstance(tensor, DTensor) else tensor)   # a DTensor's data_ptr is 0
            key = (local.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if key not in copies:
                copies[key] = _full(tensor).detach().clone()
            self._state[name] = copies[key]

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        live = self.inner.state_dict()
        return self.inner.load_state_dict({k: _like(v, live.get(k)) for k, v in state_dict.items()}, strict=strict)


class GatheredStateView(nn.Module):
    """FullStateView for DeepSpeed ZeRO-3, whose parameters are partitioned flat slices (the module's own
    tensors are empty): state_dict gathers the full tensors on every rank (a collective) through
    deepspeed.zero.GatheredParameters; load_state_dict writes them back the same way (rank 0's values,
    re-partitioned when the context exits)."""

    def __init__(self, module: nn.Module):
        import deepspeed
        super().__init__()
        object.__setattr__(self, "inner", module)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            self._state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.inner.parameters()), modifier_rank=0):
            return self.inner.load_state_dict(state_dict, strict=strict)


class FullOptimizerView:
    """The optimizer's state with DTensor moments gathered to full tensors (on every rank, at creation),
    and loaded back sliced like their parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        state = optimizer.state_dict()
        self._state = {**state, "state": {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()}}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sliced = {i: {k: _like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
                  for i, s in state["state"].items()}
        self.optimizer.load_state_dict({**state, "state": sliced})


def has_dtensor_parameters(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())
