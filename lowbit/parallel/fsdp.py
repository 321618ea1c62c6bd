"""FSDP2 (`fully_shard`, per-parameter DTensor sharding) over the data-parallel mesh axis.

Each decoder layer is one FSDP unit (its parameters are all-gathered just before its forward and
backward and freed after), then the root holds the embedding, final norm and lm_head. Composes with
TP: the parameters are then 2-D DTensors sharded over ("dp", "tp").
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def apply_fsdp2(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over the 1-D `dp_mesh`; returns the same (now FSDP) module."""
    inner = getattr(model, "module", model)      # the HF model inside a Ulysses wrapper
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is not None:
        for layer in layers:
            fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model
