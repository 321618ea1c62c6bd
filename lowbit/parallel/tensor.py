"""Tensor parallelism (Megatron-LM, arXiv 1909.08053) and its sequence parallelism (arXiv 2205.05198)
for HF Llama/Qwen-family decoders, with DTensor's `parallelize_module`. lowbit's quantized linears are
sharded by the same styles and quantize their own shards (lowbit/precision/sharded.py).

Per decoder layer: q/k/v and gate/up are column-parallel (each rank owns heads / FFN columns, no
communication), o and down are row-parallel (one all-reduce per block, eq. 3 of 1909.08053). The
embedding is vocabulary-parallel (rows of the table) and `lm_head` column-parallel with its logits
left sharded over the vocabulary as a DTensor [B, S, V/tp]; the cross-entropy runs under
`loss_context`, DTensor's `loss_parallel`, which reduces max/sum-exp across the TP group and never
gathers the full logits.

With `sp=True` the residual stream, norms and dropout live sharded along the sequence ([B, S/tp, H]
per rank): the all-reduce of each row-parallel output becomes a reduce-scatter and the input of
each column-parallel region an all-gather (2205.05198 sec. 4.2.2), so activations between the TP
regions take 1/tp of the memory.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the base model holding embed_tokens/layers/norm, its decoder layers) of an HF causal LM."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not hasattr(model, "lm_head"):
        raise ValueError(f"parallel.tp needs an HF Llama/Qwen-style causal LM (model.model.layers, model.lm_head); "
                         f"got {type(model).__name__}. Use parallel.tp=1 for this model")
    return base, layers


class ReplicateParallel(SequenceParallel):
    """Norms without SP: parameters become replicated DTensors (so every parameter, and the gradient
    norm over them, is a DTensor on the TP mesh) and the module runs on the full, replicated input."""

    def __init__(self):
        super().__init__(use_local_output=True)
        self.sequence_sharding = (Replicate(),)


def layer_plan(sequence_parallel: bool) -> dict:
    """The ParallelStyle of each sub-module of one HF decoder layer (names as in LlamaDecoderLayer)."""
    between = Shard(1) if sequence_parallel else Replicate()   # layout of the residual stream
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=between),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=between),
    }
    if not sequence_parallel:
        plan.update({"input_layernorm": ReplicateParallel(), "post_attention_layernorm": ReplicateParallel()})
    else:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            # HF calls self_attn(hidden_states=...) by keyword and mlp(hidden_states) positionally.
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def _full_sequence_positions(module, args, kwargs):
    """Under SP the embedding output holds S/tp positions, so HF would derive positions 0..S/tp-1:
    pass the full sequence's positions [1, S] from input_ids instead (rotary needs them)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("position_ids") is None and input_ids is not None:
        kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return args, kwargs


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Shard `model` (an HF causal LM on this rank's device) in place over the 1-D `tp_mesh`.

    Afterwards parameters are DTensors; `model(input_ids=[B, S]).logits` is a DTensor [B, S, V]
    sharded on the vocabulary (placement Shard(2)); compute the loss inside `loss_context(True)`.
    """
    base, layers = decoder_parts(model)
    tied = model.lm_head.weight is base.embed_tokens.weight
    between = Shard(1) if sequence_parallel else Replicate()
    top = {
        # Vocabulary-parallel embedding: each rank holds V/tp rows, the partial lookups are summed
        # (or reduce-scattered along the sequence under SP).
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False),
    }
    top["model.norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    parallelize_module(model, tp_mesh, top)
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan(sequence_parallel))
    if tied:   # both styles shard the [V, H] table on dim 0; keep them one parameter
        model.lm_head.weight = base.embed_tokens.weight
    if sequence_parallel:
        base.register_forward_pre_hook(_full_sequence_positions, with_kwargs=True)
    for module in model.modules():      # quantized linears build their shard recipes now: bad shapes fail here
        if hasattr(module, "prepare_tensor_parallel") and isinstance(getattr(module, "weight", None), DTensor):
            module.prepare_tensor_parallel()
    shard_head_modules(model, tp_mesh.get_local_rank(), tp_mesh.size(), reduce_group=tp_mesh.get_group())
    return model


def shard_head_modules(model: nn.Module, index: int, count: int, reduce_group) -> None:
    """Tell modules that keep per-head state (SeerAttention gates: `shard_heads`) which contiguous slice of
    the attention heads this rank runs; `reduce_group` averages their gradients where no DDP does."""
    for module in model.modules():
        if hasattr(module, "shard_heads"):
            module.shard_heads(index, count, reduce_group=reduce_group)


def loss_context(tensor_parallel: bool):
    """The context for forward and backward of the loss: DTensor's vocabulary-parallel cross-entropy under TP."""
    return loss_parallel() if tensor_parallel else contextlib.nullcontext()


def to_local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a replicated DTensor (e.g. the loss under TP) becomes its local copy, with autograd."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    return value
