"""Float64 references for the precision tests: grid rounding by nearest-value search, quantized math."""
from __future__ import annotations

import torch

from lowbit.precision.formats import FloatFormat, grid_values


def round_float64(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest value of fmt's grid to each x (float64), ties to the even code, saturating at +-max.

    Independent of lowbit's bit tricks: a search over the enumerated grid. Grid values are sorted by
    magnitude, so a value's index is its code without the sign bit and an even index = even mantissa.
    """
    grid = grid_values(fmt)
    magnitude = x.double().abs().clamp(max=fmt.max)
    upper = torch.searchsorted(grid, magnitude).clamp(max=len(grid) - 1)
    lower = (upper - 1).clamp(min=0)
    exact = grid[upper] == magnitude
    down, up = magnitude - grid[lower], grid[upper] - magnitude
    pick_up = (up < down) | ((up == down) & (upper % 2 == 0))
    index = torch.where(exact, upper, torch.where(pick_up, upper, lower))
    return torch.copysign(grid[index], x.double())


def dge_float64(scaled: torch.Tensor, fmt: FloatFormat, k: float, clip: float) -> torch.Tensor:
    """arXiv 2501.17116 eq. 8 in float64, the interval found by search over the grid."""
    grid = grid_values(fmt)
    magnitude = scaled.double().abs().clamp(max=fmt.max)
    upper = torch.searchsorted(grid, magnitude, right=True).clamp(max=len(grid) - 1)
    lower = upper - 1
    at_max = magnitude >= fmt.max
    lo = torch.where(at_max, torch.full_like(magnitude, fmt.max), grid[lower])
    delta = torch.where(at_max, grid[-1] - grid[-2], grid[upper] - grid[lower])
    position = (magnitude - lo) / delta
    return ((1.0 / k) * (2 * position - 1).abs().pow(1.0 / k - 1)).clamp(max=clip)
