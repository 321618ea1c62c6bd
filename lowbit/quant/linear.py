"""`FakeQuantLinear`: an nn.Linear whose weight is fake-quantized per group in every forward (QAT).

The master weight stays in full precision and trains through the straight-through estimator; the
forward uses its low-bit image. State dict keys of the original layer (`weight`, `bias`) are kept, so
checkpoints and HF exports still name the weights as before; the module adds
  clip_ratio      [out, n_groups] float32 buffer: range = ratio * [min, max] of each group (clipped RTN)
  clip_lo/clip_hi [out, n_groups] float32 parameters when clipping is learnable (absolute range values)
  calibrated      bool buffer: the clipping search has run (survives checkpoint/resume)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.select import selected_linears
from lowbit.quant.fake_quant import (QuantFormat, fake_quantize, from_groups, group_range, num_groups, quantize,
                                     scale_divisor, to_groups)


class FakeQuantLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, fmt: QuantFormat, learnable_clip: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.fmt = fmt
        self.enabled = True          # False: plain float forward (clipping calibration reads true activations)
        self.compiled = False        # True: the fake quantization runs as one torch.compile'd graph (GPU; see below)
        groups = num_groups(self.in_features, fmt)
        device = linear.weight.device
        self.register_buffer("clip_ratio", torch.ones(self.out_features, groups, device=device))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        # The scale's divisor as a tensor: a graph input of the compiled fake quantization (see scales_for)
        self.register_buffer("scale_divisor", torch.tensor(scale_divisor(fmt), device=device), persistent=False)
        self.learnable_clip = learnable_clip
        if learnable_clip:
            lo, hi = group_range(to_groups(self.weight.detach(), fmt), fmt)
            self.clip_hi = nn.Parameter(hi.clone())
            if fmt.name != "fp4_e2m1":               # symmetric e2m1 learns one magnitude per group
                self.clip_lo = nn.Parameter(lo.clone())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"group_size={self.fmt.group_size}, learnable_clip={self.learnable_clip}")

    def clip_tensors(self) -> tuple:
        """(clip_ratio, clip_lo, clip_hi) as `clip_bounds` takes them (None where the layer has no such tensor)."""
        if self.learnable_clip:
            return None, getattr(self, "clip_lo", None), self.clip_hi
        return self.clip_ratio, None, None

    def set_clip_ratio(self, ratio: torch.Tensor) -> None:
        """Install searched ratios [out, n_groups]; learnable clip values restart from ratio * range."""
        with torch.no_grad():
            self.clip_ratio.copy_(ratio)
            if self.learnable_clip:
                lo, hi = group_range(to_groups(self.weight, self.fmt), self.fmt)
                self.clip_hi.copy_(hi * ratio)
                if hasattr(self, "clip_lo"):
                    self.clip_lo.copy_(lo * ratio)
            self.calibrated.fill_(True)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight [out, in] (float32, differentiable through the STE)."""
        fn = compiled_fake_quant_weight() if self.compiled else fake_quant_weight
        return fn(self.weight, self.fmt, *self.clip_tensors(), self.scale_divisor)

    def quantized_codes(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(codes uint8 [out, n_groups, group_size], per-group parameters) of the current weight."""
        with torch.no_grad():
            grouped = to_groups(self.weight, self.fmt)
            return quantize(grouped, *clip_bounds(grouped, self.fmt, *self.clip_tensors()), self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.quantized_weight().to(self.weight.dtype), self.bias)


def fake_quant_weight(weight: torch.Tensor, fmt: QuantFormat, clip_ratio: torch.Tensor | None,
                      clip_lo: torch.Tensor | None, clip_hi: torch.Tensor | None,
                      divisor: torch.Tensor | None = None) -> torch.Tensor:
    """The fake-quantized [out, in] weight: range = clip_ratio x each group's [min, max], or the learnable
    (clip_lo, clip_hi) (e2m1: [-clip_hi, clip_hi]). A pure function of tensors, so that one compiled graph
    serves every layer of a shape (`compiled_fake_quant_weight`)."""
    grouped = to_groups(weight, fmt)
    lo, hi = clip_bounds(grouped, fmt, clip_ratio, clip_lo, clip_hi)
    return from_groups(fake_quantize(grouped, lo, hi, fmt, divisor), weight.shape[1])


def clip_bounds(grouped: torch.Tensor, fmt: QuantFormat, clip_ratio: torch.Tensor | None,
                clip_lo: torch.Tensor | None, clip_hi: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [out, n_groups]: the learnable values (e2m1: [-clip_hi, clip_hi]), else clip_ratio times the
    group's current range (no gradient; float64, exact)."""
    if clip_hi is not None:
        return (-clip_hi, clip_hi) if clip_lo is None else (clip_lo, clip_hi)
    lo, hi = group_range(grouped, fmt)
    return lo.double() * clip_ratio.double(), hi.double() * clip_ratio.double()   # exact products (see _scales64)


_COMPILED = None


def compiled_fake_quant_weight():
    """`fake_quant_weight` under torch.compile: eager runs some 40 small kernels per layer and direction,
    which made a QAT step of SmolLM2-135M launch-bound on an H200 (3.5x slower than bf16 fine-tuning).
    Its weights equal the eager ones bit for bit on the H200 too (float64 quantization, `_scales64`)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(fake_quant_weight, dynamic=False)
    return _COMPILED


def attach_fake_quant(model: nn.Module, fmt: QuantFormat, include: list[str], exclude: list[str],
                      learnable_clip: bool = False) -> list[str]:
    """Swap every nn.Linear whose name matches include and not exclude for a FakeQuantLinear; return the names."""
    targets = selected_linears(model, include, exclude, "objective.qat")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear(module, fmt, learnable_clip))
    return [name for name, _ in targets]


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in fake_quant_layers(model).values():
        layer.enabled = enabled
