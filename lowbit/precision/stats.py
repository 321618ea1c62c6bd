"""Per-layer quantization statistics: absmax, share clamped, share flushed to zero, SQNR.

`collect(model)` returns the statistics each QuantLinear recorded on its last armed training
forward (its activation x and weight W, quantized as the forward GEMM sees them) and arms every
layer again, so with precision.stats_every=N the figures logged at step s come from step s - N + 1.
Recording re-quantizes with the reference path: it costs a little, only on armed steps.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.precision.fp8_gather import GatheredFP8Weight
from lowbit.precision.methods import clamp_outliers
from lowbit.precision.scaling import expand_scale, quantize_reference


def operand_stats(original: torch.Tensor, quantized) -> dict[str, float]:
    """Statistics of one quantized operand against its high-precision tensor [R, C]."""
    x = original.float()
    dequantized = quantized.dequantize()
    limit = quantized.quantizer.fmt.max * expand_scale(quantized.scale, quantized.quantizer, x.shape)
    noise = (x - dequantized).pow(2).sum()
    return {
        "absmax": x.abs().max().item(),
        "clamped": (x.abs() > limit * (1 + 1e-6)).float().mean().item(),
        "flushed": ((x != 0) & (quantized.data.float() == 0)).float().mean().item(),
        "sqnr_db": (10 * torch.log10(x.pow(2).sum() / noise.clamp_min(1e-30))).item(),
    }


@torch.no_grad()
def record(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, recipe) -> None:
    """x [..., K] and weight [N, K] as this rank's GEMM sees them (under tensor parallelism: its shards,
    quantized with the shard recipe, whose amaxes are reduced over the group; the statistics are the shard's)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    clamped = clamp_outliers(x2, recipe.occ_quantile, recipe.outlier_group, product="dense",
                             scope=recipe.occ_scope)[0] if recipe.occ else x2
    stats = {f"x/{k}": v for k, v in operand_stats(x2, quantize_reference(clamped, recipe.x)).items()}
    if not isinstance(weight, GatheredFP8Weight):      # gathered in E4M3 (FSDP2): no high-precision weight to compare
        weight = weight.detach().float()
        stats.update({f"w/{k}": v for k, v in operand_stats(weight, quantize_reference(weight, recipe.w)).items()})
    layer.last_stats = stats
    layer.stats_armed = False


def collect(model: nn.Module) -> dict[str, float]:
    """{'quant/<layer>/<x|w>/<stat>': value} of every QuantLinear, and under delayed scaling
    {'quant/delayed/<x|dy>/overshoot_<share|max>': value} since the last call; re-arms the layers for the next forward."""
    from lowbit.precision.delayed import find
    from lowbit.precision.linear import QuantLinear
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            out.update({f"quant/{module.layer_name or name}/{k}": v for k, v in module.last_stats.items()})
            module.stats_armed = True
    delayed = find(model)
    if delayed is not None:
        out.update({f"quant/{k}": v for k, v in delayed.overshoot().items()})
    return out
