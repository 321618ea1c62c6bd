"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al., arXiv 2309.14509) through transformers'
attention-function registry, so any HF model whose attention calls `ALL_ATTENTION_FUNCTIONS` works.

Each of the `u` ranks of a Ulysses group holds S/u consecutive tokens of every sequence. Around the
attention core an all-to-all turns the sequence shard of all heads, q/k/v [B, H, S/u, D], into all
tokens of H/u heads, [B, H/u, S, D] (2309.14509 sec. 3.1), the unchanged attention function runs on
whole sequences, and the inverse all-to-all brings the output back to sequence shards. Everything
else (embeddings, norms, MLPs, lm_head) runs on the local shard with no communication.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

ATTENTION_NAME = "lowbit_ulysses"


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 ([u, ...]) goes to rank i of `group`; returns chunk j received from rank j."""
    chunks = chunks.contiguous()   # the collective reads and writes dense row-major memory
    received = torch.empty_like(chunks)
    dist.all_to_all_single(received, chunks, group=group)
    return received


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S/u, D] sequence shard of all heads -> [B, H/u, S, D] all positions of this rank's heads."""
    u = dist.get_world_size(group)
    b, h, s, d = x.shape
    received = _all_to_all(x.reshape(b, u, h // u, s, d).transpose(0, 1), group)   # [u = sequence chunk, B, H/u, S/u, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `sequence_to_heads`: [B, H/u, S, D] -> [B, H, S/u, D]."""
    u = dist.get_world_size(group)
    b, hu, s_full, d = x.shape
    s = s_full // u
    received = _all_to_all(x.reshape(b, hu, u, s, d).permute(2, 0, 1, 3, 4), group)  # [u = head group, B, H/u, S/u, D]
    return received.transpose(0, 1).reshape(b, hu * u, s, d)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_sequence(grad, ctx.group), None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return sequence_to_heads(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    """All-gather [B, S/u, ...] -> [B, S, ...] along dim 1. Every rank then computes the same loss on the
    whole sequence, so the true gradient of its own shard is the incoming one; it is scaled by u so that
    the data-parallel mean over all dp x u ranks (DDP) equals the mean over the dp replicas only."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        u, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(u, dim=1)[rank] * u, None


def ulysses_attention(module: nn.Module, query, key, value, attention_mask, *, group, inner, **kwargs):
    """An HF attention function: q [B, H, S/u, D], k/v [B, Hkv, S/u, D] -> output [B, S/u, H, D].

    Causal attention over the whole sequence; per-token padding masks are not supported (packed data
    has none), so the shard-sized mask HF builds is ignored.
    """
    q, k, v = (_SequenceToHeads.apply(t, group) for t in (query, key, value))
    if kwargs.get("position_ids") is not None:     # the shard's positions; the inner function sees the whole sequence
        kwargs["position_ids"] = torch.arange(q.shape[2], device=q.device).unsqueeze(0)
    output, weights = inner(module, q, k, v, None, is_causal=True, **kwargs)   # [B, S, H/u, D]
    output = _HeadsToSequence.apply(output.transpose(1, 2), group)               # [B, H, S/u, D]
    return output.transpose(1, 2).contiguous(), weights


class UlyssesCausalLM(nn.Module):
    """Wraps an HF causal LM: forward(input_ids [B, S]) runs this rank's S/u tokens (positions
    rank*S/u ...) and returns logits [B, S, V] gathered over the group, so objectives see whole sequences."""

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self.module, self.group = model, group

    @property
    def config(self):
        return self.module.config

    def forward(self, input_ids: torch.Tensor, shard_nll: bool = False, **kwargs):
        """shard_nll: return `loss` = the summed next-token NLL of the whole sequences instead of logits,
        each rank scoring its own shard, so the [B, S, V] logits are never gathered (see `_shard_nll`)."""
        u, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        seq_len = input_ids.shape[1]
        if seq_len % u:
            raise ValueError(f"sequence length {seq_len} is not divisible by parallel.ulysses={u}; "
                             f"use a data.seq_len that is a multiple of {u}")
        shard = seq_len // u
        positions = torch.arange(rank * shard, (rank + 1) * shard, device=input_ids.device).unsqueeze(0)
        out = self.module(input_ids=input_ids[:, rank * shard:(rank + 1) * shard], position_ids=positions, **kwargs)
        logits = out.logits
        if shard_nll and not isinstance(logits, DTensor):
            return CausalLMOutputWithPast(loss=self._shard_nll(logits, input_ids, rank * shard, u))
        if isinstance(logits, DTensor):     # TP: vocabulary-sharded logits; gather the sequence of the local shard
            gathered = _GatherSequence.apply(logits.to_local(), self.group)
            logits = DTensor.from_local(gathered, logits.device_mesh, logits.placements, run_check=False)
        else:
            logits = _GatherSequence.apply(logits, self.group)
        if shard_nll:    # TP x Ulysses: the vocabulary-parallel cross-entropy on the gathered sequence
            from lowbit.objectives.base import token_nll
            return CausalLMOutputWithPast(loss=token_nll(logits, input_ids))
        return CausalLMOutputWithPast(logits=logits)

    def _shard_nll(self, logits: torch.Tensor, input_ids: torch.Tensor, start: int, u: int) -> torch.Tensor:
        """Summed NLL of the whole sequences from this rank's logits [B, S/u, V] at positions start... .

        Position t predicts input_ids[t + 1] (the last rank's final position predicts nothing). The value is
        the NLL summed over all ranks; the gradient is u x this shard's, as _GatherSequence gives it, so that
        the data-parallel mean over dp x u ranks equals the mean over the dp replicas."""
        labels = input_ids[:, start + 1:start + 1 + logits.shape[1]]
        local = F.cross_entropy(logits[:, :labels.shape[1]].flatten(0, 1).float(), labels.flatten(), reduction="sum")
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return u * local + (total - u * local.detach())


def _layer_ulysses_attention(module: nn.Module, query, key, value, attention_mask, *, inner, **kwargs):
    """The registered attention function: Ulysses over the group that apply_ulysses put on `module`."""
    kwargs.pop("is_causal", None)
    return ulysses_attention(module, query, key, value, attention_mask, group=module.ulysses_group,
                             inner=inner, **kwargs)


def apply_ulysses(model: nn.Module, group) -> UlyssesCausalLM:
    """Route `model`'s attention through the Ulysses all-to-all over `group` and wrap it (see UlyssesCausalLM)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    inner_name = config._attn_implementation
    if inner_name.startswith(ATTENTION_NAME):
        raise ValueError("the model already runs Ulysses attention; apply parallel.ulysses once")
    inner = ALL_ATTENTION_FUNCTIONS[inner_name]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    u = dist.get_world_size(group)
    if heads % u or kv_heads % u:
        raise ValueError(f"parallel.ulysses={u} must divide num_attention_heads={heads} and num_key_value_heads="
                         f"{kv_heads}; choose a divisor of {kv_heads}")
    # The registry is global and outlives the run, so the function registered there holds no process
    # group: each attention layer carries its own. A group kept alive by a module-level closure is
    # destroyed at interpreter exit, after destroy_process_group, which aborts gloo ("terminate called
    # without an active exception").
    name = f"{ATTENTION_NAME}_{inner_name}"
    AttentionInterface.register(name, functools.partial(_layer_ulysses_attention, inner=inner))
    attentions = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]  # HF attention
    if not attentions:
        raise ValueError(f"parallel.ulysses={u}: found no HF attention modules (with is_causal and config) in "
                         f"{type(model).__name__}; Ulysses needs a transformers model whose attention calls "
                         f"ALL_ATTENTION_FUNCTIONS, or set parallel.ulysses=1")
    for attention in attentions:
        attention.ulysses_group = group
    from lowbit.parallel.tensor import shard_head_modules
    shard_head_modules(model, dist.get_rank(group), u, reduce_group=None)   # DDP averages over these ranks
    config._attn_implementation = name
    return UlyssesCausalLM(model, group)


def shards_sequence(model: nn.Module) -> bool:
    """Whether `model` (through DDP, FSDP2, DeepSpeed and compile wrappers) runs Ulysses sequence shards."""
    while model is not None:
        if isinstance(model, UlyssesCausalLM):
            return True
        inner = getattr(model, "module", None)
        model = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
    return False
