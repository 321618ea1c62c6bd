"""Delayed scaling of fp8 tensorwise activations and output gradients (`precision.scaling=delayed`).

Tensorwise current scaling must reduce a tensor's amax before it can cast it, so under torch.compile every
quantized producer (RMSNorm, SwiGLU, the residual stream's gradient, ...) is read twice: once for the amax, once
for the cast fused into it. With the scale known beforehand the cast is one pass. `bench/amax_ceiling.py` measured
what that is worth at most (H200, llama_1b, sequence 4096, 2026-12-04): `+exp=fp8_llama` 1.26x -> 1.33x bf16.

The scheme is TransformerEngine's DelayedScaling (an amax history per tensor, scale = format max / the history's
largest amax), observed once per optimizer step instead of at every GEMM:
- The first training micro-batch after each optimizer step *records*: its linears scale x and dy by their own
  amaxes, exactly as current scaling does, and keep those amaxes.
- Every later micro-batch scales x and dy by the largest amax of the layer's last `history` records (this step's
  included): no amax pass. A value beyond that amax saturates at +-448 x scale (E4M3's saturating cast), as it does in
  TransformerEngine between its history updates.
- A record leaves the compiled backward as the gradient of the layer's own `sink` tensor [2] (autograd
  accumulates it into the sink's .grad). The model's forward pre-hook folds them into the history before the next forward;
  under data, sequence or tensor parallelism the fold takes the maximum over all ranks (one all-reduce per step), so
  all ranks scale alike; a record under tensor parallelism is the maximum over the layer's shards, as current
  scaling's amax is.
  A non-finite record (an overflowed step, which the trainer's NaN guard skips) is not folded in.
`precision.amax_margin` scales by the history's amax x 2^margin (TransformerEngine's margin; default 0).
`precision.delayed_operands` picks which operands delayed micro-batches scale by the history (default [x, dy]); the
others keep current scaling there (an amax pass before their cast). Records always hold both.
Weights keep current scaling (precision.cache_weights quantizes them once per step). So with one micro-batch per
step every micro-batch records, which is current scaling; the saving grows with gradient accumulation (1 of 8
micro-batches records in `+exp=fp8_llama`). Evaluation before the first record scales by the current amax.
The history is part of the trainer's checkpoint (`state_dict`), so a resumed run scales exactly as an unbroken one.
With `precision.stats_every=N` the trainer also logs how often a record went past the amax that the micro-batches
before it scaled by (`overshoot`): such a record means those casts saturated.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lowbit.precision.linear import QuantLinear

log = logging.getLogger("lowbit")
SCALINGS = ("current", "delayed")
OPERANDS = ("x", "dy")


def check_operands(delayed_operands) -> None:
    wrong = [o for o in delayed_operands if o not in OPERANDS]
    if wrong or not delayed_operands:
        raise ValueError(f"precision.delayed_operands={list(delayed_operands)}: name one or both of {list(OPERANDS)} "
                         f"(the activation x, the output gradient dy); use [x, dy] or precision.scaling=current")


class DelayedScaling:
    """The amax histories of `layers` (each QuantLinear gets `.delayed = self`).

    history [layers, 2, length]: recorded amaxes of (x, dy), a ring; amax [layers, 2]: their maxima, what delayed
    micro-batches scale by (layer i reads the view amax[i]); sinks[i] [2] (a leaf that requires grad): where layer i's
    backward leaves a record's amaxes. Per-layer tensors rather than an index: compiled decoder layers share one
    graph, which an integer index per layer would specialise (a recompilation per layer).
    `mode`, read by every layer's forward: record | delayed | current (before the first record); `delayed_operands`:
    those of x, dy that a delayed micro-batch scales by the history (the others by their own amax)."""

    def __init__(self, layers: list[QuantLinear], length: int, margin: int = 0,
                 delayed_operands: tuple[str, ...] = OPERANDS):
        check_operands(delayed_operands)
        if length < 1:
            raise ValueError(f"precision.amax_history={length}: the history needs at least one record; use e.g. 16")
        if margin < 0:
            raise ValueError(f"precision.amax_margin={margin}: a margin is a power of two of headroom, >= 0; use 0 or 1")
        self.layers, self.length, self.margin = layers, length, margin
        self.delayed_modes = tuple("delayed" if o in delayed_operands else "current" for o in OPERANDS)
        self.history = self.amax = self.sinks = None     # allocated on the layers' device at the first forward
        self.over = None            # since the last overshoot(): [3, 2] records compared, records above, largest ratio
        self.slot = 0               # records folded in so far (the ring's next slot is slot % length)
        self.stepped = True         # an optimizer step happened since the last training forward (or none yet)
        self.mode = "current"
        for layer in layers:
            layer.delayed = self
        self._hook = register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, *_) -> None:
        self.stepped = True

    def _allocate(self, device: torch.device) -> None:
        rows = len(self.layers)
        self.history = torch.zeros(rows, 2, self.length, device=device)
        self.over = torch.zeros(3, 2, device=device)
        self.amax = torch.zeros(rows, 2, device=device)
        self.sinks = [torch.zeros(2, device=device, requires_grad=True) for _ in range(rows)]
        for index, layer in enumerate(self.layers):
            layer.delayed_amax, layer.delayed_sink = self.amax[index], self.sinks[index]

    def operands(self, layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str]]:
        """What `layer` passes to QuantLinearFunction: its (x, dy) amaxes, its sink, the (x, dy) modes."""
        modes = self.delayed_modes if self.mode == "delayed" else (self.mode, self.mode)
        return layer.delayed_amax, layer.delayed_sink, modes

    @torch.no_grad()
    def fold(self) -> None:
        """Move a pending record (the sink's gradient) into the history (max over ranks) and update `amax`."""
        if self.sinks is None or all(sink.grad is None for sink in self.sinks):
            return
        zero = torch.zeros(2, device=self.amax.device)        # a layer that ran no recorded backward records 0
        record = torch.stack([zero if sink.grad is None else sink.grad for sink in self.sinks])
        for sink in self.sinks:
            sink.grad = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            record = torch.where(torch.isnan(record), torch.full_like(record, float("inf")), record)
            dist.all_reduce(record, op=dist.ReduceOp.MAX)
        finite = torch.isfinite(record).all(dim=1, keepdim=True)      # an overflowed step's layer keeps its history
        if self.slot:
            self._compare(record, finite)
        previous = self.history[:, :, (self.slot - 1) % self.length] if self.slot else self.amax
        self.history[:, :, self.slot % self.length] = torch.where(finite, record, previous)
        self.slot += 1
        self.amax.copy_(self.history.amax(dim=2) * 2.0 ** self.margin)

    def _compare(self, record: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a record [layers, 2] to the overshoot tally: each finite record against the amax it joins (what the
        delayed micro-batches before it scaled by, the margin included); on the device, no host sync."""
        ratio = record / self.amax.clamp_min(torch.finfo(torch.float32).tiny)
        valid = finite & (self.amax > 0)
        self.over[0] += valid.sum(dim=0)
        self.over[1] += (valid & (ratio > 1)).sum(dim=0)
        self.over[2] = torch.maximum(self.over[2], torch.where(valid, ratio, 0).amax(dim=0))

    def overshoot(self) -> dict[str, float]:
        """Since the last call, per operand (x, dy): `overshoot_share`, the share of records above the amax that the
        delayed micro-batches before them had scaled by, and `overshoot_max`, the largest record / that amax. A
        record is the first micro-batch of a step, drawn as the others are, so the share estimates how many delayed
        casts saturate and the ratio by how much (E4M3 clips values beyond 448 x scale). Reads the device: call it
        at a logging interval. Resets the tally."""
        if self.over is None or not self.over[0].any():
            return {}
        compared, above, largest = self.over.tolist()
        self.over.zero_()
        out = {}
        for index, name in enumerate(OPERANDS):
            if compared[index]:
                out[f"delayed/{name}/overshoot_share"] = above[index] / compared[index]
                out[f"delayed/{name}/overshoot_max"] = largest[index]
        return out

    def __call__(self, module: nn.Module, _args) -> None:
        """Forward pre-hook of the model: fold a pending record, then set the mode of this forward."""
        if self.sinks is None:
            self._allocate(self.layers[0].weight.device)
        self.fold()
        if module.training and torch.is_grad_enabled():
            self.mode = "record" if self.stepped or not self.slot else "delayed"
            self.stepped = False
        else:
            self.mode = "delayed" if self.slot else "current"

    def state_dict(self) -> dict:
        self.fold()
        return {"history": None if self.history is None else self.history.cpu(), "slot": self.slot}

    def load_state_dict(self, state: dict) -> None:
        if state["history"] is None:
            return
        history = state["history"]
        if self.history is None:
            self._allocate(self.layers[0].weight.device)
        if history.shape != self.history.shape:
            raise ValueError(f"the checkpoint's amax history has shape {tuple(history.shape)} (layers, 2, "
                             f"precision.amax_history), this model's {tuple(self.history.shape)}; resume with the "
                             f"checkpoint's precision.amax_history and precision.include/exclude")
        with torch.no_grad():
            self.history.copy_(history)
            self.amax.copy_(self.history.amax(dim=2) * 2.0 ** self.margin)
        self.slot = int(state["slot"])


def install(model: nn.Module, length: int, margin: int = 0, delayed_operands=OPERANDS) -> DelayedScaling:
    """Give every QuantLinear of `model` delayed scaling (its recipe must be fp8 tensorwise)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    wrong = sorted({layer.recipe.name for layer in layers if layer.recipe.name != "fp8_tensorwise"})
    if wrong:
        raise ValueError(f"precision.scaling=delayed works with precision=fp8_tensorwise (one scale per tensor), not "
                         f"{', '.join(wrong)}; use precision.scaling=current with that recipe")
    bad = sorted({layer.layer_name for layer in layers if layer.recipe.hadamard or layer.recipe.occ})[:3]
    if bad:
        raise ValueError(f"precision.scaling=delayed does not support the Hadamard transform or OCC ({bad}); set "
                         f"precision.hadamard=false and precision.occ=false, or precision.scaling=current")
    delayed = DelayedScaling(layers, length, margin, tuple(delayed_operands))
    model.register_forward_pre_hook(delayed)
    log.info("precision.scaling=delayed: %d layers scale %s by a %d-record amax history (x 2^%d), recorded on the "
             "first micro-batch of each step", len(layers), " and ".join(delayed_operands), length, margin)
    return delayed


def find(model: nn.Module) -> DelayedScaling | None:
    """The model's DelayedScaling, if precision.scaling=delayed installed one."""
    return next((m.delayed for m in model.modules() if isinstance(m, QuantLinear) and m.delayed is not None), None)


def check_parallel(precision_cfg, parallel_cfg) -> None:
    """Before the model loads: refuse an unknown `precision.scaling`; fall back to current scaling, with one warning,
    where delayed scaling does not apply -- recipes whose scales are not one per tensor (rowwise and block scales are
    reduced in the cast's own pass) -- so a preset that uses it (`+exp=fp8_llama`) still runs with
    `precision=fp8_rowwise`, as precision.cache_weights does. DDP, FSDP2, Ulysses, tensor parallelism and DeepSpeed
    ZeRO keep it: a record takes the maximum over a layer's TP shards as current scaling does, and the fold the
    maximum over all ranks. Under DeepSpeed the engine steps the wrapped torch optimizer at the accumulation
    boundary, whose step hook marks the next micro-batch as a recording one, as without it. (`parallel_cfg`: the
    signature of the other layout checks, lowbit.precision.weight_cache.check_parallel; every layout keeps it.)"""
    scaling = getattr(precision_cfg, "scaling", "current")
    if scaling not in SCALINGS:
        raise ValueError(f"precision.scaling={scaling!r}: use one of {list(SCALINGS)}")
    if scaling != "delayed":
        return
    check_operands(list(getattr(precision_cfg, "delayed_operands", OPERANDS)))
    if precision_cfg.recipe != "fp8_tensorwise":
        log.warning("precision.scaling=delayed is switched to current scaling: precision=%s (delayed scaling is for "
                    "fp8_tensorwise's one scale per tensor)", precision_cfg.recipe)
        precision_cfg.scaling = "current"
