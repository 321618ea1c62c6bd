"""Model conversion (DESIGN.md stage 4): swap included nn.Linear layers for QuantLinear.

A linear layer is converted when its module name matches one of `cfg.include` and none of
`cfg.exclude` (fnmatch patterns); by default the decoder layers' linears, never `lm_head` or the
embeddings (norms are not linears). recipe=bf16 leaves the model untouched.
"""
from __future__ import annotations

import logging

from torch import nn

from lowbit.models.select import selected_linears
from lowbit.precision.linear import QuantLinear
from lowbit.precision.recipes import build_recipe
from lowbit.precision.weight_cache import install as install_weight_caches

log = logging.getLogger("lowbit")


def apply(model: nn.Module, cfg, compiled: bool = False) -> nn.Module:
    """Swap the selected nn.Linear modules of `model` in place for QuantLinear(recipe of cfg); returns model.
    `compiled`: the layers will run under torch.compile (quantize_kernels=auto then takes the PyTorch path, except
    for the FP4 block recipes nvfp4 / mxfp4)."""
    from lowbit.kernels.quantize import set_kernels
    set_kernels(cfg.quantize_kernels, compiled, fp4_blocks=cfg.recipe in ("nvfp4", "mxfp4"))
    if cfg.recipe == "bf16":
        return model
    recipe = build_recipe(cfg)
    targets = selected_linears(model, list(cfg.include), list(cfg.exclude), "precision")
    for index, (name, linear) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, recipe, name=name, seed=index))
    log.info("precision %s: %d linear layers quantized, kept in high precision: %s", cfg.recipe, len(targets),
             sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m) is nn.Linear}) or "none")
    if cfg.cache_weights:
        install_weight_caches(model)
    if getattr(cfg, "scaling", "current") == "delayed":
        from lowbit.precision.delayed import install as install_delayed
        install_delayed(model, cfg.amax_history, getattr(cfg, "amax_margin", 0),
                        tuple(getattr(cfg, "delayed_operands", ("x", "dy"))))
    return model
