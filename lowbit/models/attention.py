"""The trainer's attention: SDPA's causal kernel on unpadded sequences, without transformers' mask building.

transformers builds a causal mask before every forward (`create_causal_mask`); for SDPA on unpadded input it ends
as `is_causal=True` and no mask, but on the way it checks the position ids for packed sequences with a
data-dependent branch (`find_packed_sequence_indices`: `(...).all()` on a CUDA tensor), one host-device
synchronisation per micro-batch. Each one drains the GPU's queue, so the host's lead over the GPU, built up while
the backward's long kernels run, is lost at every micro-batch: a host-bound quantized step waits for it (llama_1b fp8
tensorwise on an H200: 8 synchronisations per step, the GPU 81-83% busy, 2026-12-03).

The same SDPA function registered under its own name has no mask function, so transformers skips the mask
(its documented behaviour for custom attention functions) and SDPA runs `is_causal=True`: the same kernel and the
same bits as `sdpa` on unpadded input (tested). An `attention_mask` passed to such a model is refused, never
dropped silently.
"""
from __future__ import annotations

from torch import nn

CAUSAL_SDPA = "lowbit_causal_sdpa"


def use_causal_sdpa(model: nn.Module) -> bool:
    """Switch an HF model that runs `sdpa` to CAUSAL_SDPA; returns whether it did (other implementations are kept)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    try:
        model.set_attn_implementation(CAUSAL_SDPA)
    except (ValueError, AttributeError):
        config._attn_implementation = CAUSAL_SDPA
    model.register_forward_pre_hook(_refuse_attention_mask, with_kwargs=True)
    return True


def restore_sdpa(model: nn.Module) -> None:
    """Back to transformers' `sdpa` (an export, or a model handed to code that pads)."""
    if getattr(model.config, "_attn_implementation", None) == CAUSAL_SDPA:
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, AttributeError):
            model.config._attn_implementation = "sdpa"


def _refuse_attention_mask(module: nn.Module, args, kwargs) -> None:
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and module.config._attn_implementation == CAUSAL_SDPA:
        raise ValueError(f"this model runs lowbit's maskless causal attention ({CAUSAL_SDPA}: unpadded sequences, no "
                         f"per-forward mask building) and would ignore the attention_mask passed; call "
                         f"lowbit.models.attention.restore_sdpa(model) first, or pass no mask")
