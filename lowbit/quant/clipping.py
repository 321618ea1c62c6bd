"""AWQ-style clipping search: per (output row, group), the clipping ratio that minimises the layer's output error.

For a layer y = x W^T with calibration inputs X [n, in], group g of row o contributes X_g w_og to output o,
so the error of clipping that group's range by ratio r is
    e_og(r) = || X_g (w_og - Q_r(w_og)) ||^2 = d^T G_g d,   d = w_og - Q_r(w_og),  G_g = X_g^T X_g
(AWQ, arXiv 2306.00978, its clipping search; BitDistiller, arXiv 2402.10631, asymmetric clipping).
We accumulate the per-group Gram matrices G_g [n_groups, group, group] over the calibration batches
instead of storing activations, then try r in {1, 1 - 1/N, ..., 1 - max_shrink} and keep the best
per (row, group). The activations are the unquantized model's (fake quantization switched off).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lowbit.quant.fake_quant import QuantFormat, dequantize, group_range, quantize, to_groups
from lowbit.quant.linear import FakeQuantLinear, fake_quant_layers, set_fake_quant_enabled


def group_gram(x: torch.Tensor, in_features: int, fmt: QuantFormat) -> torch.Tensor:
    """Per-group Gram matrices [n_groups, group, group] float32 of inputs x [..., in_features].

    A partial last group is padded with zero activations (its padded weights then never matter).
    """
    x = x.reshape(-1, in_features).float()
    groups = -(-in_features // fmt.group_size)
    pad = groups * fmt.group_size - in_features
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    x = x.reshape(-1, groups, fmt.group_size).transpose(0, 1)          # [n_groups, n, group]
    return x.transpose(1, 2) @ x


def clip_errors(weight: torch.Tensor, gram: torch.Tensor, fmt: QuantFormat, ratios: list[float]) -> torch.Tensor:
    """Output error e_og(r) [len(ratios), out, n_groups] (float32) of clipping `weight` [out, in] by each ratio."""
    grouped = to_groups(weight.detach(), fmt).float()
    lo, hi = group_range(grouped, fmt)
    errors = []
    for ratio in ratios:
        codes, params = quantize(grouped, lo * ratio, hi * ratio, fmt)
        delta = grouped - dequantize(codes, params, fmt)    # [out, n_groups, group]; padding meets zero Gram rows
        errors.append(torch.einsum("ogi,gij,ogj->og", delta, gram, delta))
    return torch.stack(errors)


def search_ratios(weight: torch.Tensor, gram: torch.Tensor, fmt: QuantFormat, grid: int = 20,
                  max_shrink: float = 0.5) -> torch.Tensor:
    """Best ratio [out, n_groups] among 1 - k/grid for k = 0 .. round(max_shrink * grid)."""
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"clipping grid={grid} / max_shrink={max_shrink} invalid: need grid >= 1 and 0 <= max_shrink < 1")
    ratios = [1.0 - k / grid for k in range(int(round(max_shrink * grid)) + 1)]
    best = clip_errors(weight, gram, fmt, ratios).argmin(dim=0)
    return torch.tensor(ratios, device=weight.device)[best]


@torch.no_grad()
def calibrate_clipping(model: nn.Module, batches, grid: int = 20, max_shrink: float = 0.5) -> dict[str, float]:
    """Run `batches` (input_ids tensors) through the float model, then set every FakeQuantLinear's clip ratios.

    Gram matrices are summed over data-parallel ranks, so every rank installs the same ratios.
    Returns {layer name: mean chosen ratio} for logging.
    """
    layers = fake_quant_layers(model)
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: FakeQuantLinear):
        def accumulate(_module, inputs, _output):
            gram = group_gram(inputs[0], layer.in_features, layer.fmt)
            grams[name] = gram if name not in grams else grams[name] + gram
        return accumulate

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in layers.items()]
    set_fake_quant_enabled(model, False)
    try:
        for input_ids in batches:
            model(input_ids=input_ids)
    finally:
        set_fake_quant_enabled(model, True)
        for handle in handles:
            handle.remove()
    summary = {}
    for name, layer in layers.items():
        gram = grams[name]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gram)
        ratio = search_ratios(layer.weight, gram, layer.fmt, grid, max_shrink)
        layer.set_clip_ratio(ratio)
        summary[name] = ratio.mean().item()
    return summary
