"""Quantized linears under tensor parallelism: each rank quantizes its own shards of the GEMM operands,
and wherever a scale spans the sharded axis its amax is reduced (max) over the TP group, so every rank
quantizes exactly as one process holding the whole layer would.

In recipes.py's notation (y = x W^T; every operand [rows, contraction]), Megatron's two layouts shard:

  column-parallel  W [N/tp, K]:  w [N/tp, K] rows,  w_t [K, N/tp] contraction,  dy [M, N/tp] contraction,
                                 dy_t [N/tp, M] rows;  x, x_t whole (replicated)
  row-parallel     W [N, K/tp]:  x [M, K/tp] contraction,  x_t [K/tp, M] rows,  w [N, K/tp] contraction,
                                 w_t [K/tp, N] rows;  dy, dy_t whole (replicated)

A rowwise scale spans its operand's contraction axis, a tensorwise scale the whole operand, a block scale
one block: local to the shard as long as the shard holds whole blocks (checked here), except NVFP4's FP32
tensor scale. OCC's quantile is over the whole activation, so a row-parallel layer gathers it too.
"""
from __future__ import annotations

from dataclasses import replace

from lowbit.precision.recipes import Recipe
from lowbit.precision.scaling import Quantizer

SHARDED_AXIS = {
    "colwise": {"w": "rows", "w_t": "contraction", "dy": "contraction", "dy_t": "rows"},
    "rowwise": {"x": "contraction", "x_t": "rows", "w": "contraction", "w_t": "rows"},
}


def tensor_parallel_layout(weight, name: str) -> str:
    """'colwise' (weight Shard(0)) or 'rowwise' (Shard(1)) of a DTensor weight on a 1-D TP mesh."""
    from torch.distributed.tensor import Shard
    placements = tuple(weight.placements)
    if placements == (Shard(0),):
        return "colwise"
    if placements == (Shard(1),):
        return "rowwise"
    raise ValueError(f"{name}: a quantized linear under tensor parallelism needs its weight sharded Shard(0) "
                     f"(column-parallel) or Shard(1) (row-parallel) on a 1-D mesh, got {placements}; exclude the "
                     f"layer from precision.include or shard it with ColwiseParallel/RowwiseParallel")


def needs_group(quantizer: Quantizer, axis: str) -> bool:
    """Whether a scale of `quantizer` spans shards when its operand is split along `axis`."""
    if quantizer.tensorwise:
        return True
    if quantizer.blocked:
        return quantizer.scale_rule == "nvfp4"          # the FP32 tensor scale; the blocks stay local
    return axis == "contraction"


def shard_recipe(recipe: Recipe, layout: str, group, local: int, name: str) -> Recipe:
    """The recipe one rank runs on its shards: `local` is its share of the sharded weight axis (N/tp for
    column-parallel, K/tp for row-parallel); quantizers whose scales span shards get the TP `group`."""
    changes = {}
    for operand, axis in SHARDED_AXIS[layout].items():
        quantizer: Quantizer = getattr(recipe, operand)
        what = f"{name} ({layout} shard of {local} on the sharded axis, operand {operand})"
        if axis == "contraction":
            quantizer.check_columns(local, what)
        elif quantizer.blocked and local % quantizer.block_rows:
            raise ValueError(f"{what}: {local} rows do not hold whole {quantizer.block_rows}-row scale blocks, so "
                             f"blocks would straddle ranks; choose parallel.tp so that the shard is a multiple of "
                             f"{quantizer.block_rows}, or exclude the layer (precision.exclude)")
        if needs_group(quantizer, axis):
            changes[operand] = replace(quantizer, amax_group=group)
    outlier_group = group if layout == "rowwise" and recipe.occ else None
    return replace(recipe, outlier_group=outlier_group, **changes)
