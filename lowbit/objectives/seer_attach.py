"""Attach SeerAttention gates to a HF causal LM and route its attention through them.

Each attention module (`model.model.layers[i].self_attn`) gets a submodule `seer_gate`
(`AttentionGate`), and the model's attention implementation is switched to `lowbit_seer`, registered
in transformers' AttentionInterface. That function receives the post-RoPE q, k, v of every layer;
what it does is chosen by the shared `GateController.mode`:

  dense      plain causal SDPA (the untouched model)
  train      fused target kernel (output + block target) and the gate's KL to it (stored for the loss)
  threshold  gate probabilities >= controller.threshold -> block-sparse attention
  topk       gate's top blocks at controller.density -> block-sparse attention
  oracle     the target's top blocks at controller.density -> block-sparse attention
  static     A-shape (sink + sliding window) at controller.density -> block-sparse attention

The gate needs q/k before RoPE: they are recovered exactly by rotating back by the same angles
(`undo_rope`), so no extra projection is computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.kernels.attention_target import (SUPPORTED_HEAD_DIMS, attention_with_block_target,
                                             dense_causal_attention)
from lowbit.kernels.block_sparse_attention import block_sparse_attention
from lowbit.objectives import seer_select as select
from lowbit.objectives.seer_module import AttentionGate, undo_rope

ATTENTION_NAME = "lowbit_seer"
GATE_ATTRIBUTE = "seer_gate"        # each attention module's gate submodule: model.layers.N.self_attn.seer_gate
MODES = ("dense", "train", "threshold", "topk", "oracle", "static")


@dataclass
class GateController:
    """State shared by every gated layer of one model (mode and what the layers report back)."""

    mode: str = "dense"
    threshold: float = 0.005
    density: float = 0.5
    use_triton: str = "auto"
    layer_kl: dict = field(default_factory=dict)          # layer index -> KL tensor (train mode)
    layer_sparsity: dict = field(default_factory=dict)    # layer index -> measured block sparsity

    def reset(self) -> None:
        self.layer_kl.clear()
        self.layer_sparsity.clear()


def find_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a Llama/Qwen-family HF model, in layer order."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    attentions = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    if not attentions or any(a is None or not hasattr(a, "q_proj") or not hasattr(a, "k_proj") for a in attentions):
        raise ValueError(f"could not find attention layers in {type(model).__name__}: SeerAttention gates need a "
                         f"Llama/Qwen-family HF causal LM with model.layers[i].self_attn.q_proj/k_proj; "
                         f"use such a model (e.g. model=smollm2_135m or model=llama_tiny)")
    if getattr(inner, "rotary_emb", None) is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb; the gate applies the model's RoPE at "
                         f"block positions, so it needs a RoPE model (Llama/Qwen family)")
    return attentions


def model_shape(model: nn.Module) -> dict:
    """What a gate checkpoint must match: layer count, heads, head dim."""
    config = model.config
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return {"model_type": getattr(config, "model_type", ""), "num_layers": len(find_attention_layers(model)),
            "num_attention_heads": q_heads, "num_key_value_heads": getattr(config, "num_key_value_heads", q_heads),
            "head_dim": head_dim}


def attach_gates(model: nn.Module, *, block_size: int = 64, gate: str = "prefill", heads: str = "kv_group",
                 q_pool=("avg",), k_pool=("max", "min", "avg"), threshold: float = 0.005,
                 use_triton: str = "auto") -> GateController:
    """Give every attention layer a fresh gate and route attention through `lowbit_seer`."""
    from lowbit.kernels.attention_target import SUPPORTED_BLOCK_SIZES

    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"objective.seer.block_size={block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")
    attentions = find_attention_layers(model)
    shape = model_shape(model)
    if shape["head_dim"] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{type(model).__name__} has head_dim={shape['head_dim']}, which the attention kernels do "
                         f"not support; supported head dims: {SUPPORTED_HEAD_DIMS}")
    register_attention()
    controller = GateController(threshold=threshold, use_triton=use_triton)
    rotary = getattr(model, "model", model).rotary_emb
    reference = next(model.parameters())
    for attention in attentions:
        module = AttentionGate(q_heads=shape["num_attention_heads"], kv_heads=shape["num_key_value_heads"],
                               head_dim=shape["head_dim"], block_size=block_size, gate=gate, heads=heads,
                               q_pool=q_pool, k_pool=k_pool).to(reference.device)
        object.__setattr__(module, "rotary", rotary)          # not a submodule: keeps gate state dicts gate-only
        object.__setattr__(module, "controller", controller)
        attention.seer_gate = module
    object.__setattr__(model, "seer_controller", controller)
    object.__setattr__(model, "seer_previous_attention", model.config._attn_implementation)
    _set_attention(model, ATTENTION_NAME)
    return controller


def detach_gates(model: nn.Module) -> None:
    """Remove the gates and restore the model's own attention implementation."""
    for attention in find_attention_layers(model):
        if hasattr(attention, "seer_gate"):
            del attention.seer_gate
    _set_attention(model, getattr(model, "seer_previous_attention", "sdpa"))


def gates(model: nn.Module) -> list[AttentionGate]:
    found = [getattr(a, "seer_gate", None) for a in find_attention_layers(model)]
    if any(g is None for g in found):
        raise ValueError("this model has no SeerAttention gates attached; call attach_gates or load_gates first")
    return found


def _set_attention(model: nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):
        model.config._attn_implementation = name


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, seer_attention)


def _pre_rope(module: nn.Module, gate: AttentionGate, query, key, kwargs):
    """q, k before RoPE, recovered by rotating back (positions: kwargs' position_ids or 0..S-1)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device)[None]
    cos, sin = gate.rotary(query, position_ids)
    return undo_rope(query.float(), cos.float(), sin.float()), undo_rope(key.float(), cos.float(), sin.float())


def seer_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> ([B, S, Hq, D], None)."""
    gate: AttentionGate = module.seer_gate
    control: GateController = gate.controller
    layer = getattr(module, "layer_idx", 0)
    if query.shape[2] != key.shape[2]:
        if query.shape[2] != 1:
            raise NotImplementedError(f"lowbit_seer attention handles prefill (q_len == k_len) and one-token decode; "
                                      f"got q_len={query.shape[2]}, k_len={key.shape[2]}")
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.dtype == torch.bool and not attention_mask.all():
        raise NotImplementedError("lowbit_seer attention is causal-only (packed sequences, no padding masks)")
    mode = control.mode
    if mode == "dense":
        out = dense_causal_attention(query, key, value, scale=scaling)
    elif mode == "train":
        out = _train_step(module, gate, control, layer, query, key, value, scaling, kwargs)
    elif mode in ("threshold", "topk", "oracle", "static"):
        mask = _select_blocks(mode, module, gate, control, query, key, value, scaling, kwargs)
        control.layer_sparsity[layer] = select.sparsity(mask)
        out = block_sparse_attention(query, key, value, mask, gate.block_size, scale=scaling,
                                     use_triton=control.use_triton)
    else:
        raise ValueError(f"gate mode {mode!r} is not one of {MODES}")
    return out.transpose(1, 2).contiguous(), None


def _train_step(module, gate, control, layer, query, key, value, scaling, kwargs):
    """Target from the frozen attention, gate prediction with gradient, KL stored per layer."""
    q_pre, k_pre = _pre_rope(module, gate, query, key, kwargs)
    if gate.gate == "prefill":
        out, target = attention_with_block_target(query, key, value, gate.block_size, scale=scaling,
                                                  use_triton=control.use_triton)
        target = select.group_target(target, gate.heads_in(query, key))
    else:
        out = dense_causal_attention(query, key, value, scale=scaling)
        with torch.no_grad():
            target = select.decode_target_torch(query, key, gate.block_size, scaling, gate.heads_in(query, key))
    with torch.enable_grad():
        log_gate = gate(q_pre.detach(), k_pre.detach(), gate.rotary)
        control.layer_kl[layer] = select.kl_to_gate(target, log_gate)
    if gate.gate == "prefill":
        with torch.no_grad():
            control.layer_sparsity[layer] = select.sparsity(select.threshold_mask(log_gate.exp(), control.threshold))
    return out


def _select_blocks(mode, module, gate, control, query, key, value, scaling, kwargs) -> torch.Tensor:
    if gate.gate != "prefill":
        raise ValueError("sparse prefill inference needs a prefill gate (objective.seer.gate=prefill); decode "
                         "gates score single query tokens")
    n_blocks = -(-query.shape[2] // gate.block_size)
    if mode == "static":
        return select.a_shape_mask(query.shape[0], gate.heads_in(query, key), n_blocks, control.density, query.device)
    if mode == "oracle":
        _, target = attention_with_block_target(query, key, value, gate.block_size, scale=scaling,
                                                use_triton=control.use_triton)
        return select.topk_mask(select.group_target(target, gate.heads_in(query, key)), control.density)
    q_pre, k_pre = _pre_rope(module, gate, query, key, kwargs)
    probs = gate(q_pre, k_pre, gate.rotary).exp()
    if mode == "threshold":
        return select.threshold_mask(probs, control.threshold)
    return select.topk_mask(probs, control.density)
