"""The SeerAttention gate module: block-level attention scores from pooled, pre-RoPE q and k.

Prefill gate (arXiv 2410.13276 sec. 3.1, AttnGate): per block of B tokens
  q_blk = concat(pool_q(q_pre))      avg by default          [B, Hg, nB, Dq_in]
  k_blk = concat(max, min, avg)(k_pre)                        [B, Hg, nB, Dk_in]
  q_g, k_g = per-head linear projections to head_dim, then RoPE at block positions 0..nB-1
  log_gate = log_softmax(q_g k_g^T / sqrt(D), causal over key blocks)   [B, Hg, nB, nB]
Decode gate (arXiv 2506.08889, SeerAttention-R): no query pooling -- every query token scores the
key blocks (its RoPE position is its block index), log_gate [B, Hg, S, nB].

Gate heads: `kv_group` = one gate per GQA group (the group's query heads concatenated on the feature
axis, SeerAttention-R), `query` = one gate per query head (k blocks shared within the group).

Head-sharded attention (tensor parallelism, Ulysses): each rank's attention holds a contiguous slice of
the heads; `shard_heads` tells the gate which one, and the gate runs the projections of those heads only.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

POOLS = ("avg", "max", "min")


def block_pool(x: torch.Tensor, block_size: int, kind: str) -> torch.Tensor:
    """Pool [..., S, D] over blocks of `block_size` tokens -> [..., ceil(S/B), D]; the last block is partial."""
    seq = x.shape[-2]
    n_blocks = math.ceil(seq / block_size)
    pad = n_blocks * block_size - seq
    fill = {"avg": 0.0, "max": float("-inf"), "min": float("inf")}[kind]
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-2], pad, x.shape[-1]), fill)], dim=-2)
    x = x.unflatten(-2, (n_blocks, block_size))
    if kind == "max":
        return x.amax(-2)
    if kind == "min":
        return x.amin(-2)
    counts = torch.full((n_blocks, 1), float(block_size), device=x.device, dtype=x.dtype)
    counts[-1] = block_size - pad
    return x.sum(-2) / counts


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (HF half-rotation layout): x [B, H, N, D], cos/sin [B or 1, N, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope` (rotation by -theta; cos^2 + sin^2 = scaling^2 for scaled RoPE variants)."""
    norm = (cos * cos + sin * sin)[:, None]
    return (x * cos[:, None] - rotate_half(x) * sin[:, None]) / norm


class MultiHeadLinear(nn.Module):
    """One [in, out] matrix per head: [B, H, N, in] -> [B, H, N, out]."""

    def __init__(self, heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor, heads: slice = slice(None), weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, h, N, in] for the heads `heads` of this module (all by default); `weight` stands in for
        self.weight (the same values, e.g. behind a gradient-averaging identity)."""
        weight = self.weight if weight is None else weight
        return torch.einsum("bhni,hio->bhno", x, weight[heads].to(x.dtype))


class AverageGradient(torch.autograd.Function):
    """Identity forward; backward averages the gradient over a process group (all-reduce / size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


class AttentionGate(nn.Module):
    """A SeerAttention gate for one attention layer (see module doc).

    `rotary` is the model's rotary embedding (called as rotary(x, position_ids) -> cos, sin); it is kept
    outside the module tree so that the gate's state dict holds only gate weights.
    """

    def __init__(self, *, q_heads: int, kv_heads: int, head_dim: int, block_size: int, gate: str = "prefill",
                 heads: str = "kv_group", q_pool=("avg",), k_pool=("max", "min", "avg")):
        super().__init__()
        if gate not in ("prefill", "decode"):
            raise ValueError(f"objective.seer.gate={gate!r} is not one of prefill | decode")
        if heads not in ("kv_group", "query"):
            raise ValueError(f"objective.seer.heads={heads!r} is not one of kv_group | query")
        for name, pools in (("q_pool", q_pool), ("k_pool", k_pool)):
            if not pools or any(p not in POOLS for p in pools):
                raise ValueError(f"objective.seer.{name}={list(pools)} must be a non-empty list of {POOLS}")
        self.q_heads, self.kv_heads, self.head_dim, self.block_size = q_heads, kv_heads, head_dim, block_size
        self.gate, self.heads = gate, heads
        self.q_pool, self.k_pool = list(q_pool), list(k_pool)
        self.groups = q_heads // kv_heads
        self.gate_heads = kv_heads if heads == "kv_group" else q_heads
        q_in = head_dim * (self.groups if heads == "kv_group" else 1) * (1 if gate == "decode" else len(q_pool))
        self.q_proj = MultiHeadLinear(self.gate_heads, q_in, head_dim)
        self.k_proj = MultiHeadLinear(self.gate_heads, head_dim * len(k_pool), head_dim)

        self.head_shard = (0, 1)        # (index, count): this rank's contiguous slice of the heads
        self.gradient_groups = []       # process groups over which the gate's gradients are averaged

    def shard_heads(self, index: int, count: int, reduce_group=None) -> None:
        """Run on head slice `index` of `count`: the attention's heads are sharded over `count` ranks.

        Called again on an already sharded gate, it refines the slice (tensor parallelism, then Ulysses
        inside each TP shard: slice = tp_index * u + ulysses_index of tp * u). Each rank computes only its
        heads' projections. reduce_group: see `average_gradients_over` (the TP group, which no data-parallel
        wrapper spans; the loss is the mean over every rank's heads, so the average is the exact gradient
        and the ranks keep identical weights). Under Ulysses the data-parallel wrapper spans the ranks:
        pass None.
        """
        outer_index, outer_count = self.head_shard
        index, count = outer_index * count + index, outer_count * count
        for name, heads in (("num_attention_heads", self.q_heads), ("num_key_value_heads", self.kv_heads)):
            if heads % count:
                raise ValueError(f"SeerAttention gates over {count} head shards: {name}={heads} is not divisible "
                                 f"by {count}; choose parallel degrees whose product divides {name}")
        self.head_shard = (index, count)
        if reduce_group is not None:
            self.average_gradients_over(reduce_group)

    def average_gradients_over(self, group) -> None:
        """Start from `group`'s first rank's weights and average the gradients over `group` in backward.

        The gate's loss does not flow through the model's output, so wrappers that hook the output (FSDP2's
        post-backward) never reduce its gradients; lowbit.parallel leaves the gate to them and calls this
        (TP group, FSDP2 mesh). The identity in the forward graph survives any parameter swapping."""
        if dist.get_world_size(group) == 1:
            return
        source = dist.get_global_rank(group, 0)
        for param in self.parameters():     # one initialisation for the group (ranks seed differently)
            dist.broadcast(param.data, src=source, group=group)
        self.gradient_groups.append(group)

    def heads_in(self, query: torch.Tensor, key: torch.Tensor) -> int:
        """Gate heads of this rank's attention call: its kv heads (kv_group) or query heads (query)."""
        index, count = self.head_shard
        if query.shape[1] * count != self.q_heads or key.shape[1] * count != self.kv_heads:
            raise ValueError(f"the gate expects {self.q_heads // count} query and {self.kv_heads // count} kv heads "
                             f"per rank (shard {index} of {count}), the attention passed {query.shape[1]} and "
                             f"{key.shape[1]}: gates and model do not match (layer count, heads, parallel degree)")
        return key.shape[1] if self.heads == "kv_group" else query.shape[1]

    def _group_queries(self, q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """[B, Hq, N, F] -> [B, Hg, N, F'] (kv_group: the group's heads side by side on the feature axis)."""
        if self.heads == "query":
            return q
        b, _, n, f = q.shape
        return q.view(b, kv_heads, self.groups, n, f).permute(0, 1, 3, 2, 4).reshape(b, kv_heads, n, -1)

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor, rotary) -> torch.Tensor:
        """q_pre [B, Hq, S, D], k_pre [B, Hkv, S, D] (before RoPE; this rank's heads when sharded) -> log gate
        probabilities, float32: prefill [B, Hg, nB, nB], decode [B, Hg, S, nB]; -inf on key blocks after the
        query's block."""
        seq = q_pre.shape[2]
        n_blocks = math.ceil(seq / self.block_size)
        local = self.heads_in(q_pre, k_pre)
        heads = slice(self.head_shard[0] * local, (self.head_shard[0] + 1) * local)
        k_blk = torch.cat([block_pool(k_pre, self.block_size, p) for p in self.k_pool], dim=-1)
        if self.heads == "query":
            k_blk = k_blk.repeat_interleave(self.groups, dim=1)
        if self.gate == "prefill":
            q_in = torch.cat([block_pool(q_pre, self.block_size, p) for p in self.q_pool], dim=-1)
            q_block_index = torch.arange(n_blocks, device=q_pre.device)
        else:
            q_in = q_pre
            q_block_index = torch.arange(seq, device=q_pre.device) // self.block_size
        q_weight, k_weight = self.q_proj.weight, self.k_proj.weight
        for group in self.gradient_groups:
            q_weight, k_weight = AverageGradient.apply(q_weight, group), AverageGradient.apply(k_weight, group)
        q_g = self.q_proj(self._group_queries(q_in, k_pre.shape[1]), heads, q_weight)
        k_g = self.k_proj(k_blk, heads, k_weight)
        key_index = torch.arange(n_blocks, device=q_pre.device)
        cos_q, sin_q = rotary(q_g, q_block_index[None])
        cos_k, sin_k = rotary(k_g, key_index[None])
        q_g, k_g = apply_rope(q_g, cos_q, sin_q), apply_rope(k_g, cos_k, sin_k)
        scores = torch.einsum("bhqd,bhkd->bhqk", q_g.float(), k_g.float()) * self.head_dim ** -0.5
        causal = key_index[None, :] <= q_block_index[:, None]
        return torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    def describe(self) -> dict:
        return {"q_heads": self.q_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "block_size": self.block_size, "gate": self.gate, "heads": self.heads,
                "q_pool": self.q_pool, "k_pool": self.k_pool}
