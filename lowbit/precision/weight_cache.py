"""Quantized weights kept across the micro-batches of one optimizer step (`precision.cache_weights`).

With gradient accumulation every micro-batch's forward quantizes the same master weights again: W's amax, W_q for
the forward GEMM and W^T_q for the input-gradient GEMM (for fp8 about 11 bytes of memory traffic per parameter and
a few kernel launches per linear, per micro-batch). A WeightCache quantizes its layer's weight once per change of
the weight and hands the same QTensors to every forward until the weight changes again, as TransformerEngine caches
FP8 weights between micro-batches.

A weight counts as changed when its storage or its version counter moves (an in-place update by autograd-visible
ops: `load_state_dict`, a resume, a for-loop or foreach optimizer) or when any torch optimizer has stepped since
(a global step post-hook): fused AdamW (`torch._fused_adamw_`, the trainer's default on CUDA) and Triton kernels
such as AdamA's update write the weights without moving the version counter. On an H200 a version-only check kept
the first step's W_q for the whole run (llama_1b fp8: loss 10.93 against 9.83 after 6 steps, 2026-12-03). So the
cached operands always equal a fresh quantization bit for bit (tested with fused AdamW). Code that writes weights by
other means calls `invalidate_weight_caches()`. A `CacheRefresher` runs as a forward pre-hook of the whole model,
outside its compiled decoder layers (on CUDA as one CUDA graph); the cached tensors are refreshed in place, so
compiled layers see the same tensors every step (no recompilation across steps, no graph break: CPU Inductor,
TORCH_LOGS=recompiles,graph_breaks).
Costs the quantized weights' memory (fp8: W_q and W^T_q, up to 2 bytes per parameter; tensorwise's W^T_q is a view
of W_q). The trainer switches it off, with a warning, under layouts that shard the weights (`check_parallel`);
outside the trainer, DTensor weights are quantized per forward as without the cache.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from lowbit.precision.linear import QuantLinear, quantize_weight
from lowbit.precision.recipes import GEMMS, Recipe
from lowbit.precision.scaling import QTensor

log = logging.getLogger("lowbit")

_generation = 0         # bumped after every optimizer step in this process (and by invalidate_weight_caches)
_hook = None


def invalidate_weight_caches(*_) -> None:
    """Mark every cached weight stale: the next forward quantizes the weights again. Runs after each optimizer
    step (a global torch.optim step post-hook, registered by `watch_optimizer_steps`)."""
    global _generation
    _generation += 1


class WeightCache:
    """The quantized operands of one layer's weight: `pairs[i] = (W_q, W^T_q)` per weight part (two under AFPQ),
    either None where its GEMM runs unquantized (precision.high_precision)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[QTensor | None, QTensor | None]] | None = None
        self.key: tuple[int, int, int] | None = None    # (storage address, version, optimizer generation) cached

    def stale(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr(), weight._version, _generation) != self.key

    def mark(self, weight: torch.Tensor) -> None:
        """Record that the cached operands are `weight`'s as it is now."""
        self.key = (weight.data_ptr(), weight._version, _generation)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor, recipe: Recipe) -> None:
        """Quantize `weight` [N, K] into the cache; after the first time the cached tensors are overwritten in place
        (what the CUDA graph of CacheRefresher captures)."""
        with torch.autocast(weight.device.type, enabled=False):
            fresh = quantize_weight(weight, recipe, {gemm: gemm not in recipe.high_precision for gemm in GEMMS})
        if self.pairs is None:
            self.pairs = fresh
        else:       # in place: compiled layers keep reading the same tensors (tensorwise's W^T_q is W_q's view)
            for kept, value in zip(self.pairs, fresh):
                for old, new in zip(kept, value):
                    if old is not None:
                        for a, b in ((old.data, new.data), (old.scale, new.scale), (old.gain, new.gain)):
                            if a is not None:
                                a.copy_(b)

    def refresh(self, weight: torch.Tensor, recipe: Recipe) -> None:
        """Quantize `weight` again if it changed since the last call."""
        if self.stale(weight):
            self.requantize(weight, recipe)
            self.mark(weight)


class CacheRefresher:
    """Refreshes the WeightCaches of `layers` before each forward of the model (a forward pre-hook).

    On CUDA the refresh of all layers is captured once as a CUDA graph and replayed after each optimizer step: eager,
    it is ~8 launches per layer (amax, scale, cast, in-place copies) whose host time the GPU waits for at the start
    of every step (llama_1b fp8 on an H200: 28 ms of a 840 ms step idle, 2026-12-03), for ~4 ms of kernels. The graph
    reads the weights and writes the cached tensors at fixed addresses (both are updated in place); a weight with new
    storage (its data pointer moved) captures again. CPU, DTensor weights, and LOWBIT_WEIGHT_CACHE_GRAPH=0 (a
    debugging and benchmarking switch) refresh eagerly, layer by layer."""

    def __init__(self, layers: list[QuantLinear]):
        self.layers = layers
        self.graph, self.graph_key = None, None
        switch = os.environ.get("LOWBIT_WEIGHT_CACHE_GRAPH", "1")
        if switch not in ("0", "1"):
            raise ValueError(f"LOWBIT_WEIGHT_CACHE_GRAPH={switch!r}: set 1 (refresh the cached weights by one CUDA "
                             f"graph, the default) or 0 (eagerly, layer by layer)")
        self.use_graph = switch == "1"

    def __call__(self, *_) -> None:
        layers = [layer for layer in self.layers
                  if layer.weight_cache is not None and not isinstance(layer.weight, DTensor)]
        stale = [layer for layer in layers if layer.weight_cache.stale(layer.weight)]
        if not stale:
            return
        if self._graphable(layers):
            key = tuple(layer.weight.data_ptr() for layer in layers)
            if self.graph_key != key:
                self.graph, self.graph_key = self._capture(layers), key
            if self.graph is not None:
                self.graph.replay()
                for layer in layers:
                    layer.weight_cache.mark(layer.weight)
                return
        for layer in stale:
            layer.weight_cache.refresh(layer.weight, layer.recipe)

    def _graphable(self, layers) -> bool:
        """CUDA weights whose caches hold tensors already (the first refresh allocates them, eagerly)."""
        return (self.use_graph and bool(layers) and all(layer.weight.is_cuda for layer in layers)
                and all(layer.weight_cache.pairs is not None for layer in layers)
                and not torch.cuda.is_current_stream_capturing())

    def _capture(self, layers):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for layer in layers:
                    layer.weight_cache.requantize(layer.weight, layer.recipe)
        except Exception as error:      # noqa: BLE001 -- any capture failure: refresh eagerly from now on
            log.warning("precision.cache_weights: capturing the weight refresh as a CUDA graph failed (%s); "
                        "refreshing eagerly", error)
            self.use_graph = False
            return None
        log.info("precision.cache_weights: the refresh of %d layers' quantized weights runs as one CUDA graph",
                 len(layers))
        return graph


def check_parallel(precision_cfg, parallel_cfg) -> None:
    """precision.cache_weights keeps whole weights: with layouts that shard them (gathered per forward) it is
    switched off, with one warning that names the layout, so a preset that caches (fp8_llama, fp4_llama) still runs
    under them."""
    sharded = {"parallel.tp": parallel_cfg.tp > 1, "parallel.dp_shard": parallel_cfg.dp_shard > 1,
               "parallel.zero_stage": parallel_cfg.data_parallel == "deepspeed" and parallel_cfg.zero_stage == 3}
    used = [key for key, on in sharded.items() if on]
    if precision_cfg.cache_weights and used:
        log.warning("precision.cache_weights=true is switched off: %s shard the weights, which are gathered per "
                    "forward, and a cache would keep whole copies of them on every rank", ", ".join(used))
        precision_cfg.cache_weights = False


def watch_optimizer_steps() -> None:
    """Bump `generation()` after every torch optimizer step from now on (one global hook, registered once)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(invalidate_weight_caches)


def generation() -> int:
    """Optimizer steps and `invalidate_weight_caches()` calls so far (once `watch_optimizer_steps` has run): what
    quantized copies of the weights key on, with each weight's storage and version."""
    return _generation


def install(model: nn.Module) -> int:
    """Give every QuantLinear of `model` a WeightCache and refresh them all before each forward of `model`; returns
    how many layers cache their weight."""
    watch_optimizer_steps()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    refresher = CacheRefresher(layers)          # first: it checks LOWBIT_WEIGHT_CACHE_GRAPH
    for layer in layers:
        layer.weight_cache = WeightCache()
    model.register_forward_pre_hook(refresher)
    log.info("precision.cache_weights: %d layers quantize their weights once per optimizer step", len(layers))
    return len(layers)
