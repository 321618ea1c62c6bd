"""Shard recipes (lowbit/precision/sharded.py): which quantizers reduce their amax over the TP group, and
shards a block recipe cannot tile refused with the fix. The numerics are checked on 2 gloo processes in
tests/parallel/test_distributed.py."""
import pytest

from lowbit.config import PrecisionConfig
from lowbit.precision.recipes import build_recipe
from lowbit.precision.sharded import shard_recipe

GROUP = object()      # stands for a process group: only identity is read here


def grouped(recipe) -> set[str]:
    return {name for name in ("x", "w", "dy", "w_t", "dy_t", "x_t") if getattr(recipe, name).amax_group is GROUP}


@pytest.mark.parametrize("name,colwise,rowwise", [
    # rowwise scales span the contraction axis: reduced where that axis is the sharded one
    ("fp8_rowwise", {"w_t", "dy"}, {"x", "w"}),
    ("fp4_vectorwise", {"w_t", "dy"}, {"x", "w"}),
    # a tensorwise scale spans the whole operand: every sharded operand
    ("fp8_tensorwise", {"w", "w_t", "dy", "dy_t"}, {"x", "x_t", "w", "w_t"}),
    # block scales stay local; NVFP4's FP32 tensor scale does not
    ("fp8_blockwise", set(), set()),
    ("mxfp4", set(), set()),
    ("nvfp4", {"w", "w_t", "dy", "dy_t"}, {"x", "x_t", "w", "w_t"}),
])
def test_amax_groups_follow_the_sharded_axis(name, colwise, rowwise):
    recipe = build_recipe(PrecisionConfig(recipe=name, occ=name == "fp4_vectorwise"))
    assert grouped(shard_recipe(recipe, "colwise", GROUP, 256, "layer")) == colwise
    assert grouped(shard_recipe(recipe, "rowwise", GROUP, 256, "layer")) == rowwise
    # OCC's quantile spans the activation, which only row-parallel layers shard
    assert shard_recipe(recipe, "colwise", GROUP, 256, "layer").outlier_group is None
    assert shard_recipe(recipe, "rowwise", GROUP, 256, "layer").outlier_group is (GROUP if recipe.occ else None)
    assert recipe.x.amax_group is None        # the layer's own recipe is untouched


def test_a_shard_the_blocks_cannot_tile_is_refused_with_the_fix():
    recipe = build_recipe(PrecisionConfig(recipe="fp8_blockwise", block_size=128))
    with pytest.raises(ValueError, match="contraction dimension 192 is not a multiple of the 128-element"):
        shard_recipe(recipe, "rowwise", GROUP, 192, "model.layers.0.mlp.down_proj")    # K/tp = 192
    with pytest.raises(ValueError, match="192 rows do not hold whole 128-row scale blocks.*parallel.tp"):
        shard_recipe(recipe, "colwise", GROUP, 192, "model.layers.0.self_attn.q_proj")  # N/tp = 192
