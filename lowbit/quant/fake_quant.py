"""Low-bit weight formats, per-group quantize/dequantize, and fake quantization with a straight-through estimator.

Formats (all per group of `group_size` consecutive weights along a row's input dimension):
  int2 | int3 | int4  asymmetric integers (BitDistiller, arXiv 2402.10631):
                      s = (hi - lo) / (2^b - 1),  z = round(-lo / s),
                      q = clamp(round(clamp(w, lo, hi) / s) + z, 0, 2^b - 1),  w_hat = (q - z) * s
  fp4_e2m1            symmetric FP4, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} * s with s = amax / 6
  fp4_afpq            asymmetric FP4 (AFPQ, arXiv 2311.01792): separate scales for the positive
                      (s+ = hi / 6) and negative (s- = -lo / 6) weights of a group
The range [lo, hi] of a group is its [min, max] (e2m1: [-amax, amax]) times a clipping ratio, or a pair of
learnable clip values (see lowbit/quant/clipping.py). Codes are uint8: integers q in [0, 2^b - 1]; FP4
codes are sign << 3 | magnitude index. Scales, zero points and codes are computed in float64 from the float32
inputs, and the scales stored as float32 (see `_scales64`). Dequantization is the one function `dequantize`, used by the
fake-quantized forward, the packed export and its loader alike, so all three agree bit for bit.

A row whose input dimension is not a multiple of `group_size` is refused unless `partial_groups` is set;
then its last group holds the remaining `in_features % group_size` weights (padded internally by
repeating the row's last weight, which leaves that group's min/max unchanged, and sliced off again).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT_BITS = {"int2": 2, "int3": 3, "int4": 4}
FP4_FORMATS = ("fp4_e2m1", "fp4_afpq")
FORMATS = tuple(INT_BITS) + FP4_FORMATS
GROUP_SIZES = (32, 64, 128, 256)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)     # OCP MX spec, FP4 E2M1 magnitudes
E2M1_MAX = 6.0
SCALE_EPS = 1e-8     # floor on scales so constant or all-zero groups do not divide by zero


@dataclass(frozen=True)
class QuantFormat:
    """A weight format and its group size; build it with `make_format` (validates both)."""

    name: str
    group_size: int
    partial_groups: bool = False

    @property
    def bits(self) -> int:
        return INT_BITS.get(self.name, 4)

    @property
    def is_fp4(self) -> bool:
        return self.name in FP4_FORMATS

    @property
    def code_max(self) -> int:
        return 2 ** self.bits - 1


def make_format(name: str, group_size: int, partial_groups: bool = False,
                keys: tuple[str, str] = ("objective.qat.format", "objective.qat.group_size")) -> QuantFormat:
    """`keys`: the caller's names for the format and the group size (a config key, a command-line flag), which the
    errors name."""
    if name not in FORMATS:
        hint = f" (int{name[3:]} is not supported: use 2, 3 or 4 bits)" if name.startswith("int") else ""
        raise ValueError(f"{keys[0]}={name!r} is not supported{hint}; choose one of {list(FORMATS)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{keys[1]}={group_size} is not supported by {name}; choose one of {list(GROUP_SIZES)}")
    return QuantFormat(name, group_size, partial_groups)


def num_groups(in_features: int, fmt: QuantFormat) -> int:
    if in_features % fmt.group_size and not fmt.partial_groups:
        raise ValueError(f"group size {fmt.group_size} does not divide the layer's input dimension {in_features}; "
                         f"use a group size that divides it, or set objective.qat.partial_groups=true to quantize "
                         f"the last {in_features % fmt.group_size} weights of each row as a smaller group")
    return -(-in_features // fmt.group_size)


def to_groups(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]; a partial last group is padded by repeating the row's last weight."""
    out_features, in_features = weight.shape
    padded = num_groups(in_features, fmt) * fmt.group_size
    if padded != in_features:
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, padded - in_features)], dim=1)
    return weight.reshape(out_features, -1, fmt.group_size)


def from_groups(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, n_groups, group_size] -> [out, in_features] (drops the padding of a partial last group)."""
    return grouped.flatten(1)[:, :in_features]


def group_range(grouped: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped range (lo, hi), each [out, n_groups] float32: int [min, max]; e2m1 [-amax, amax]; afpq [min(min, 0), max(max, 0)]."""
    grouped = grouped.detach().float()
    if fmt.name == "fp4_e2m1":
        amax = grouped.abs().amax(dim=-1)
        return -amax, amax
    if fmt.name == "fp4_afpq":      # FP4 always represents 0: the range spans it, each side with its own scale
        return grouped.amin(dim=-1).clamp(max=0), grouped.amax(dim=-1).clamp(min=0)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def scale_divisor(fmt: QuantFormat) -> float:
    """What a group's range is divided by to give its scale: 2^b - 1 (int), 6 (the largest E2M1 magnitude)."""
    return E2M1_MAX if fmt.is_fp4 else float(fmt.code_max)


def _scales64(lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat,
              divisor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-group parameters in float64 (`scales_for` rounds them to the stored float32 values).

    Quantization runs in float64 from the float32 inputs to the rounded codes, with no float32 value in between:
    in float32, a compiled GPU graph left eager PyTorch (and the packed export) by 1 ulp in 47-65% of the INT
    groups' scales, and with float64 operations rounded back to float32 in between still 21-27% (H200,
    bench/fq_check.py; likely causes: approximate float32 division in Triton, FMA contraction, and Inductor
    dropping a float32 rounding between two float64 operations). In float64 such changes stay far below
    float32's resolution.
    divisor: `scale_divisor(fmt)` as a 0-d tensor, for compiled graphs: on GPUs Inductor turns a division by a
    Python constant into a multiplication by its reciprocal; a division by a graph input stays an IEEE division.
    """
    lo, hi = lo.double(), hi.double()
    d = scale_divisor(fmt) if divisor is None else divisor.double()
    if fmt.is_fp4:
        scale = (hi / d).clamp(min=SCALE_EPS)
        if fmt.name == "fp4_e2m1":
            return {"scale": scale}
        return {"scale": scale, "scale_neg": (-lo / d).clamp(min=SCALE_EPS)}
    scale = ((hi - lo) / d).clamp(min=SCALE_EPS)
    return {"scale": scale, "zero": torch.round(-lo / scale)}


def scales_for(lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat,
               divisor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-group parameters [out, n_groups] float32 from a range: int: scale, zero; e2m1: scale; afpq: scale,
    scale_neg (see `_scales64`)."""
    return {name: value.float() for name, value in _scales64(lo, hi, fmt, divisor).items()}


def _e2m1_index(magnitude: torch.Tensor) -> torch.Tensor:
    """Index of the nearest E2M1 grid magnitude (a tie goes to the smaller one); input >= 0."""
    grid = torch.tensor(E2M1_GRID, dtype=magnitude.dtype, device=magnitude.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    return (magnitude.unsqueeze(-1) > midpoints).sum(-1)


def quantize(grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat,
             divisor: torch.Tensor | None = None):
    """Codes uint8 [out, n_groups, group_size] and per-group parameters of `grouped` clipped to [lo, hi].

    grouped: [out, n_groups, group_size] (any float dtype; computed in float64, see `_scales64`);
    lo, hi: [out, n_groups]; divisor: see `_scales64`. The parameters returned are float32.
    """
    w = grouped.detach().double()
    lo, hi = lo.detach().double(), hi.detach().double()
    params = _scales64(lo, hi, fmt, divisor)
    stored = {name: value.float() for name, value in params.items()}
    clipped = torch.maximum(torch.minimum(w, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    if not fmt.is_fp4:
        q = torch.round(clipped / params["scale"].unsqueeze(-1)) + params["zero"].unsqueeze(-1)
        return q.clamp(0, fmt.code_max).to(torch.uint8), stored
    negative = clipped < 0
    scale = params["scale"].unsqueeze(-1)
    if fmt.name == "fp4_afpq":
        scale = torch.where(negative, params["scale_neg"].unsqueeze(-1), scale)
    index = _e2m1_index((clipped.abs() / scale).clamp(max=E2M1_MAX))
    return (negative.to(torch.uint8) << 3) | index.to(torch.uint8), stored


def dequantize(codes: torch.Tensor, params: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """float32 [out, n_groups, group_size] weights from codes and per-group parameters (see the module doc)."""
    if not fmt.is_fp4:
        return (codes.float() - params["zero"].unsqueeze(-1)) * params["scale"].unsqueeze(-1)
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    magnitude = grid[(codes & 7).long()]
    negative = (codes >> 3).bool()
    scale = params["scale"].unsqueeze(-1)
    if fmt.name == "fp4_afpq":
        scale = torch.where(negative, params["scale_neg"].unsqueeze(-1), scale)
    return torch.where(negative, -magnitude, magnitude) * scale


def _ste_surrogate(grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat,
                   exact: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """A differentiable expression whose value approximates `exact` and whose gradient is the STE's.

    Rounding is the identity in backward (BitDistiller's round_ste), so with x = clamp(w, lo, hi) / s:
    d w_hat / d w = 1 for lo <= w <= hi and 0 outside (clipped weights get no gradient); learnable lo/hi
    receive the clamp's gradient plus (round(x) - x) * ds/d(lo, hi) (the LSQ step-size term, arXiv 1902.08153).
    """
    lo_, hi_ = lo.float().unsqueeze(-1), hi.float().unsqueeze(-1)
    w = grouped.float()
    # where(), not min/max: a weight equal to a bound keeps its whole gradient (min/max would split it in half)
    clipped = torch.where(w > hi_, hi_, torch.where(w < lo_, lo_, w))
    params = scales_for(lo_, hi_, fmt, divisor)
    scale = params["scale"]
    if fmt.name == "fp4_afpq":
        scale = torch.where(clipped.detach() < 0, params["scale_neg"], scale)
    x = (clipped / scale).detach()
    rounded = exact / scale.detach()          # the rounded grid value, in units of the scale
    # = clamp(w) + (round(x) - x) * s: the weight's gradient is exactly 1 inside the range (no 1/s * s rounding)
    return clipped + (rounded - x) * scale


def fake_quantize(grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat,
                  divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize [out, n_groups, group_size] float32 weights with the straight-through estimator.

    The value is exactly `dequantize(*quantize(...))` (the surrogate only adds its gradient: a - a == 0),
    so a fake-quantized model and its packed export produce identical logits.
    """
    codes, params = quantize(grouped, lo, hi, fmt, divisor)
    exact = dequantize(codes, params, fmt)
    if not (grouped.requires_grad or lo.requires_grad or hi.requires_grad):
        return exact
    surrogate = _ste_surrogate(grouped, lo, hi, fmt, exact, divisor)
    return exact + (surrogate - surrogate.detach())
