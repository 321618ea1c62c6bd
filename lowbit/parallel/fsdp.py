"""FSDP2 (`fully_shard`, per-parameter DTensor sharding) over the data-parallel mesh axis.

Each decoder layer is one FSDP unit (its parameters are all-gathered just before its forward and
backward and freed after), then the root holds the embedding, final norm and lm_head. Composes with
TP: the parameters are then 2-D DTensors sharded over ("dp", "tp").
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lowbit.precision.fp8_gather import wrap_fp8_weights


def synchronize_replicas(model: nn.Module, mesh: DeviceMesh) -> None:
    """Broadcast every parameter and buffer (the local shard of a TP DTensor) from the mesh's first rank.

    fully_shard keeps each rank's own slice of its own values; ranks seed differently (trainer.seed + rank),
    so what an objective initialises randomly (SeerAttention gates, say) would otherwise start as a patchwork.
    DDP does the same broadcast when it wraps a model."""
    group = mesh.get_group()
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.to_local() if isinstance(tensor, DTensor) else tensor.data, src=source, group=group)


def apply_fsdp2(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: str = "float32", reduce_dtype: str = "float32",
                reshard_after_forward: bool = True, reduce_every_micro_batch: bool = True,
                fp8_all_gather: bool = False) -> nn.Module:
    """Shard `model` in place over the 1-D `dp_mesh` (its replicas first made equal); returns the same
    (now FSDP) module.

    param_dtype / reduce_dtype (parallel.fsdp_param_dtype / fsdp_reduce_dtype): FSDP2's mixed precision. With
    bfloat16 parameters each unit all-gathers its shards cast to bfloat16 and computes with them (also casting its
    floating-point inputs), as torchtitan's default does; the sharded float32 parameters, their gradients (reduced in
    reduce_dtype, accumulated in float32) and the optimizer never leave float32. float32 for both (the default) is
    the plain FSDP2 of one process's math.

    reduce_every_micro_batch=False (parallel.fsdp_reduce_every_micro_batch): the model gets DDP's `no_sync()`
    context, in which FSDP2 accumulates gradients unsharded instead of reduce-scattering them; the trainer runs every
    micro-batch but the last in it (as it does for DDP).

    fp8_all_gather (parallel.fsdp_fp8_all_gather): the fp8 tensorwise QuantLinears' weights are all-gathered in E4M3
    (lowbit.precision.fp8_gather); a model without such a layer is refused."""
    synchronize_replicas(model, dp_mesh)
    if fp8_all_gather:
        wrap_fp8_weights(model)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    options = {"reshard_after_forward": reshard_after_forward}
    if (param_dtype, reduce_dtype) != ("float32", "float32"):
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtypes[param_dtype], reduce_dtype=dtypes[reduce_dtype])
    # Modules trained by a loss that bypasses the model's output (SeerAttention gates) average their own
    # gradients: FSDP2 reduces a unit's gradients in a hook on the unit's forward inputs, which their
    # backward never reaches (measured: their gradients stayed None and the gates never moved).
    own = [m for m in model.modules() if hasattr(m, "average_gradients_over")]
    ignored = {p for m in own for p in m.parameters()}
    for module in own:
        module.average_gradients_over(dp_mesh.get_group())
    inner = getattr(model, "module", model)      # the HF model inside a Ulysses wrapper
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is not None:
        for layer in layers:
            fully_shard(layer, mesh=dp_mesh, ignored_params=ignored, **options)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored, **options)
    if not reduce_every_micro_batch:
        model.no_sync = functools.partial(_without_gradient_sync, model)
    return model


@contextlib.contextmanager
def _without_gradient_sync(model):
    """FSDP2's counterpart of DDP.no_sync: backward passes inside accumulate unsharded gradients."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
