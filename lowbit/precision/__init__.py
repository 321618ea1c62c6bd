"""Low-precision linear layers (DESIGN.md stage 4): formats, recipes, QuantLinear, model conversion."""
from __future__ import annotations

from typing import Callable

from torch import nn


def apply(model: nn.Module, cfg, compiled: bool = False) -> nn.Module:
    """Swap the model's included nn.Linear layers for lowbit's QuantLinear of `cfg.recipe` (bf16: no-op);
    `compiled`: its layers will run under torch.compile."""
    from lowbit.precision.convert import apply as convert
    return convert(model, cfg, compiled)


def note_padding(tokens: int, cfg) -> None:
    """Log once if `tokens` per linear input are not a multiple of the recipe's token tile (they are zero-padded)."""
    from lowbit.precision.linear import note_padding as note
    from lowbit.precision.recipes import build_recipe
    note(tokens, build_recipe(cfg).token_multiple)


def stats_hook(model: nn.Module, cfg) -> Callable[[int], dict] | None:
    """A per-step callable returning per-layer quantization statistics every `cfg.stats_every` steps."""
    if cfg.stats_every <= 0 or cfg.recipe == "bf16":
        return None
    from lowbit.precision.stats import collect
    collect(model)          # arms every layer to record on its next training forward

    def hook(step: int) -> dict:
        return collect(model) if step % cfg.stats_every == 0 else {}
    return hook
