"""Memory savers applied to the final modules (DESIGN.md stage 6): activation checkpointing and offload.

`apply(model, cfg)` picks decoder layers by name (`model.layers.N`, fnmatch patterns) and
- checkpoints those matching `memory.checkpoint_layers` under `memory.checkpointing` (none | full | selective),
- offloads the saved activations of those matching `memory.offload_layers` when `memory.offload=true`.
Both can be on at once. A layer under both: the checkpoint's own saved-tensor hooks are the inner ones,
so it keeps nothing for the offloader to move (its recomputation already frees the layer); pick disjoint
layer sets (e.g. checkpoint the first half, offload the rest) to get both savings.
"""
from __future__ import annotations

import logging
from fnmatch import fnmatch

from torch import nn

from lowbit.config import MemoryConfig
from lowbit.memory.checkpointing import POLICIES, checkpoint_layer
from lowbit.memory.offload import ActivationOffloader, offload_layer

log = logging.getLogger("lowbit")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every decoder layer: the children of the model's `layers` ModuleList."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return [(f"{name}.{index}", layer) for index, layer in enumerate(module)]
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList of decoder layers; memory.checkpointing "
                     f"and memory.offload need an HF decoder (model.model.layers); set them to none/false")


def _selected(layers, patterns: list[str], key: str) -> list[tuple[str, nn.Module]]:
    chosen = [(name, layer) for name, layer in layers if any(fnmatch(name, p) or p == "*" for p in patterns)]
    if not chosen:
        raise ValueError(f"{key}={list(patterns)} matches no decoder layer; layers are named like "
                         f"{layers[0][0]!r} (use '*' for all)")
    return chosen


def apply(model: nn.Module, cfg: MemoryConfig) -> nn.Module:
    """Install checkpointing and offload on the (unwrapped) model's decoder layers; returns `model`."""
    from lowbit.parallel import unwrap

    if cfg.checkpointing not in POLICIES:
        raise ValueError(f"memory.checkpointing={cfg.checkpointing!r} is not known; use one of {list(POLICIES)}")
    if cfg.checkpointing == "none" and not cfg.offload:
        return model
    plain = unwrap(model)
    layers = decoder_layers(plain)
    if cfg.checkpointing != "none":
        chosen = _selected(layers, cfg.checkpoint_layers, "memory.checkpoint_layers")
        for _, layer in chosen:
            checkpoint_layer(layer, cfg.checkpointing)
        log.info("activation checkpointing (%s) on %d of %d decoder layers", cfg.checkpointing, len(chosen), len(layers))
    if cfg.offload:
        if cfg.offload_min_bytes < 0:
            raise ValueError(f"memory.offload_min_bytes={cfg.offload_min_bytes} must be >= 0")
        chosen = _selected(layers, cfg.offload_layers, "memory.offload_layers")
        if any(getattr(layer, "_compiled_call_impl", None) is not None for _, layer in chosen):
            raise ValueError("memory.offload=true runs Python saved-tensor hooks that torch.compile'd layers "
                             "do not call; set model.compile=false")
        device = next(plain.parameters()).device
        if device.type != "cuda":
            log.warning("memory.offload=true on a model on the CPU: CPU activations are copied to other CPU "
                        "tensors and back (same hooks, no memory saved; a test path); once the model runs on a "
                        "CUDA device, its activations go to pinned host memory")
        offloader = ActivationOffloader(device, min_bytes=cfg.offload_min_bytes)
        for _, layer in chosen:
            offload_layer(layer, offloader)
        plain._lowbit_offloader = offloader
        log.info("activation offload to %s memory on %d of %d decoder layers (tensors >= %d bytes)",
                 "pinned CPU" if device.type == "cuda" else "CPU", len(chosen), len(layers), cfg.offload_min_bytes)
    return model
