"""Model conversion: swap included nn.Linear layers for QuantLinear (placeholder until issue 3 lands)."""
from __future__ import annotations

from torch import nn


def apply(model: nn.Module, cfg) -> nn.Module:
    if cfg.recipe == "bf16":
        return model
    raise ValueError(f"precision.recipe={cfg.recipe!r} is not available yet; use precision=bf16")
