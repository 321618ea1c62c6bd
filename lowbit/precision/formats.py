"""Floating-point element formats (E4M3, E5M2, E2M1) and rounding onto their grids, pure PyTorch.

`round_to_format(x, fmt)` returns float32 values that lie exactly on `fmt`'s grid:
round-to-nearest-even, saturation to +-max (no Inf: the OCP "satfinite" behaviour), subnormals, and
signed zero. It is the reference numerics of every quantize kernel in lowbit/kernels/quantize.py,
which repeats the same integer/float steps in Triton so both paths agree bit for bit.

Method (exact in float32 for every input): take the float32 exponent field of |x| (clamped below at
the format's smallest normal exponent, which gives the subnormal spacing), the grid spacing there is
ulp = 2^(e - mantissa_bits), a power of two, so |x| / ulp is exact and rounding it to the nearest
even integer is the format's RNE; multiplying back by ulp is exact again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A small float format: sign bit, `exponent_bits`, `mantissa_bits`; values saturate at `max`."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float                      # largest finite magnitude
    min_normal_exponent: int        # exponent of the smallest normal number (1 - bias)
    storage: torch.dtype            # dtype the values are stored in (E2M1 is stored as E4M3, exactly)
    native: bool = False            # storage is this very format: its cast rounds onto the grid (RNE)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)


# OCP 8-bit floating point spec (E4M3 "fn": no Inf, max 448; E5M2: IEEE-like, max 57344) and
# OCP MX spec v1.0 (E2M1: max 6, values 0, 0.5, 1, 1.5, 2, 3, 4, 6).
E4M3 = FloatFormat("e4m3", 4, 3, 448.0, -6, torch.float8_e4m3fn, native=True)
E5M2 = FloatFormat("e5m2", 5, 2, 57344.0, -14, torch.float8_e5m2, native=True)
E2M1 = FloatFormat("e2m1", 2, 1, 6.0, 0, torch.float8_e4m3fn)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


def get_format(name: str) -> FloatFormat:
    if name not in FORMATS:
        raise ValueError(f"format {name!r} is not known; use one of {sorted(FORMATS)}")
    return FORMATS[name]


def grid_spacing(magnitude: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """ulp of `fmt` at each |x| (float32 [...] -> float32 [...]), built from exponent bits (exact)."""
    exponent = ((magnitude.view(torch.int32) >> 23) & 0xFF) - 127           # floor(log2 |x|) for normal floats
    exponent = exponent.clamp(min=fmt.min_normal_exponent)                 # subnormal range: fixed spacing
    return ((exponent - fmt.mantissa_bits + 127) << 23).view(torch.float32)


def round_to_format(x: torch.Tensor, fmt: FloatFormat, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 `x` [...] onto `fmt`'s grid -> float32 [...] (RNE, saturating, keeps the sign).

    noise: optional uniform [0, 1) float32 tensor of x's shape; given, the rounding is stochastic
    (round down, then up with probability equal to the distance to the lower grid point / ulp), which
    is unbiased: E[round(x)] = x inside the range. NaN stays NaN.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_format expects float32, got {x.dtype}; call .float() first")
    magnitude = x.abs().clamp(max=fmt.max)                                 # saturate (NaN passes through)
    ulp = grid_spacing(magnitude, fmt)
    steps = magnitude / ulp                                                # exact: ulp is a power of two
    steps = torch.round(steps) if noise is None else torch.floor(steps + noise)   # torch.round is half-to-even
    return torch.copysign((steps * ulp).clamp(max=fmt.max), x)


def cast_to_format(x: torch.Tensor, fmt: FloatFormat, noise: torch.Tensor | None = None) -> torch.Tensor:
    """round_to_format(x, fmt, noise) in fmt's storage dtype. E4M3 / E5M2 rounded to nearest take the float8 cast
    after the saturating clamp, the same bytes (RNE, subnormals, signed zero; NaN stays NaN; tested): two
    element-wise ops instead of the dozen bit operations that torch.compile otherwise fuses into every quantization
    kernel of the fp8 recipes (the profile's `lshift/rshift` kernels)."""
    if fmt.native and noise is None:
        if x.dtype != torch.float32:
            raise TypeError(f"cast_to_format expects float32, got {x.dtype}; call .float() first")
        return x.clamp(-fmt.max, fmt.max).to(fmt.storage)
    return round_to_format(x, fmt, noise).to(fmt.storage)


def grid_values(fmt: FloatFormat) -> torch.Tensor:
    """Every non-negative finite value of `fmt`, float64, ascending (for references and tests)."""
    values = [0.0]
    for exponent in range(fmt.min_normal_exponent, 64):
        for mantissa in range(2 ** fmt.mantissa_bits):
            if exponent == fmt.min_normal_exponent:     # subnormals share the smallest normal exponent's spacing
                values.append(mantissa * 2.0 ** (exponent - fmt.mantissa_bits))
            value = (1 + mantissa / 2 ** fmt.mantissa_bits) * 2.0 ** exponent
            if value <= fmt.max:
                values.append(value)
        if 2.0 ** exponent > fmt.max:
            break
    return torch.tensor(sorted(set(values)), dtype=torch.float64)
