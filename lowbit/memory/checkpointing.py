"""Activation checkpointing policies for decoder layers: none | full | selective.

`full` keeps only each layer's input and recomputes the whole layer in backward (Chen et al. 2016,
arXiv 1604.06174). `selective` keeps the outputs of the expensive ops -- matmuls and attention -- and
recomputes the cheap element-wise work between them (norms, rotary, SiLU x gate, residual adds), the
trade Korthikanti et al. (arXiv 2205.05198, sec. 4) make: most of the memory, little of the FLOPs.

Both use PyTorch's non-reentrant checkpoint (`use_reentrant=False`); `selective` adds a
selective-checkpoint policy (`create_selective_checkpoint_contexts`) that marks matmul/attention ops
MUST_SAVE and everything else PREFER_RECOMPUTE. The layer's `forward` is replaced on the instance, so
module names and state_dict keys stay as they were (checkpoints and HF export are unaffected).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")


def _saved_ops() -> set:
    """ATen ops whose outputs `selective` keeps: matmuls and every fused attention kernel present."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward"]
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}


def _keep_matmuls(saved_ops: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The (forward, recompute) context pair of the `selective` policy; fresh per call as PyTorch requires."""
    return create_selective_checkpoint_contexts(functools.partial(_keep_matmuls, _saved_ops()))


def checkpoint_layer(layer: nn.Module, policy: str) -> None:
    """Make `layer` recompute its activations in backward under `policy` (full | selective)."""
    if policy not in ("full", "selective"):
        raise ValueError(f"memory.checkpointing={policy!r} is not known; use one of {list(POLICIES)}")
    inner = layer.forward
    context_fn = selective_context if policy == "selective" else None

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():           # evaluation: nothing is saved, nothing to recompute
            return inner(*args, **kwargs)
        # A KV cache would be appended to twice (forward, then recompute): training needs none (HF does the same).
        for key in ("past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    layer.forward = forward
    layer._lowbit_checkpointing = policy
