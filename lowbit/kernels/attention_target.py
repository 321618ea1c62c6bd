"""Causal attention forward that also returns SeerAttention's block-level distillation target.

`attention_with_block_target(q, k, v, block_size)` returns
  out    [batch, q_heads, seq, head_dim]   softmax(q k^T * scale, causal) v, in q's dtype
  target [batch, q_heads, n_blocks, n_blocks] float32: the attention map P max-pooled over
         (query block x key block) tiles, then normalised over key blocks (arXiv 2410.13276 sec. 3.2,
         the "ground truth" of the AttnGate; blocks above the diagonal are 0, each row sums to 1).

The Triton kernel never materialises P: one program owns one (batch, head, query block) and
  pass 1: flash-attention forward (online softmax, Dao et al.) -> out and the row log-sum-exp lse;
  pass 2: recomputes the tile scores s = q k^T, takes max(exp(s - lse)) over the tile and writes
          one float per (query block, key block).
Extra memory: the target itself, O(S^2/B^2) per head (microsoft/SeerAttention's kernel stores the
row-wise block maxima, O(S * S/B) per head, and pools them afterwards). The price is a second
q k^T (no P v) per tile: ~1.5x the matmul FLOPs of a plain causal forward.

GQA: k/v carry `kv_heads` heads, query head h reads kv head h // (q_heads // kv_heads).
Sequences need not be multiples of `block_size`: the last block is partial and pooled over the
tokens it holds. The pure-PyTorch path (`attention_block_target_torch`) has the same numerics and
is used on CPU and as the test reference; the tests check both against float64 math.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Shapes [B, Hq, S, D] / [B, Hkv, S, D]; errors name the bad value and the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, "
                         f"sequence and head_dim (self-attention prefill)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the {k.shape[1]} kv heads (GQA)")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")
    if q.shape[2] < block_size:
        raise ValueError(f"sequence length {q.shape[2]} is shorter than one block of {block_size} tokens; "
                         f"use longer sequences or a smaller block size")


def use_triton_for(t: torch.Tensor, mode: str = "auto") -> bool:
    """Triton on CUDA, or on CPU under TRITON_INTERPRET=1 when mode='always'; torch otherwise."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    if mode != "auto":
        raise ValueError(f"use_triton={mode!r} is not one of auto | always | never")
    return t.is_cuda


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D] (query head h reads kv head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def block_pool_max(x: torch.Tensor, block_size: int, dim: int) -> torch.Tensor:
    """Max over consecutive blocks of `block_size` along `dim` (last block may be partial)."""
    n = x.shape[dim]
    pad = (-n) % block_size
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, float("-inf"))], dim=dim)
    x = x.unflatten(dim, (x.shape[dim] // block_size, block_size))
    return x.amax(dim=dim + 1)


def attention_block_target_torch(q, k, v, block_size: int, scale: float | None = None,
                                 query_chunk_blocks: int = 16):
    """PyTorch path: query blocks in chunks, so memory is O(chunk x S) rather than S x S.

    Same contract as `attention_with_block_target`; math in float32.
    """
    check_attention_inputs(q, k, v, block_size)
    batch, q_heads, seq, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    groups = q_heads // k.shape[1]
    kf, vf = repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
    n_blocks = math.ceil(seq / block_size)
    out = torch.empty_like(q)
    target = q.new_zeros((batch, q_heads, n_blocks, n_blocks), dtype=torch.float32)
    key_pos = torch.arange(seq, device=q.device)
    rows = query_chunk_blocks * block_size
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].float(), kf) * scale
        causal = key_pos[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", probs, vf).to(q.dtype)
        pooled = block_pool_max(block_pool_max(probs, block_size, dim=3), block_size, dim=2)
        target[:, :, start // block_size:start // block_size + pooled.shape[2]] = pooled
    return out, target / target.sum(-1, keepdim=True)


@functools.cache
def _kernels():
    """Build the Triton kernel on first use (TRITON_INTERPRET is read when the kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def attention_target_kernel(Q, K, V, Out, Target, scale_log2, seq, n_blocks, q_heads, groups,
                                sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, so_b, so_h, so_s,
                                st_b, st_h, st_q,
                                BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        q_block = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // q_heads
        h = bh % q_heads
        kv_h = h // groups
        offs_m = q_block * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * sk_b + kv_h * sk_h
        v_base = V + b * sk_b + kv_h * sk_h
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
        # pass 1: flash-attention forward over key blocks 0..q_block (causal), scores in log2 units
        for kb in range(0, q_block + 1):
            cols = kb * BLOCK + offs_n
            col_ok = cols < seq
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            if kb == q_block:       # only the diagonal tile needs the causal / sequence-end mask
                s = tl.where((cols[None, :] <= offs_m[:, None]) & col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(row_ok, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(row_ok, m_i + tl.log2(l_safe), float("inf"))   # padded rows contribute exp2(-inf)=0
        # pass 2: block maxima of the final probabilities exp2(s - lse), one float per tile
        t_base = Target + b * st_b + h * st_h + q_block * st_q
        for kb in range(0, q_block + 1):
            cols = kb * BLOCK + offs_n
            col_ok = cols < seq
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            if kb == q_block:
                s = tl.where((cols[None, :] <= offs_m[:, None]) & col_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            tl.store(t_base + kb, tl.max(tl.max(p, 1), 0))

    return attention_target_kernel


def attention_block_target_triton(q, k, v, block_size: int, scale: float | None = None, num_warps: int = 0,
                                  num_stages: int = 0):
    """Triton path (CUDA, or CPU with TRITON_INTERPRET=1); same contract as the torch path."""
    check_attention_inputs(q, k, v, block_size)
    batch, q_heads, seq, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton attention kernels; supported: "
                         f"{SUPPORTED_HEAD_DIMS} (use_triton=never runs the PyTorch path)")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton attention kernel needs a CUDA tensor or TRITON_INTERPRET=1; "
                           "use the PyTorch path (use_triton=never) on CPU")
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_blocks = math.ceil(seq / block_size)
    out = torch.empty_like(q)
    target = torch.zeros((batch, q_heads, n_blocks, n_blocks), device=q.device, dtype=torch.float32)
    kernel = _kernels()
    extra = {"num_warps": num_warps or (4 if block_size <= 64 else 8), "num_stages": num_stages or 2} if q.is_cuda else {}
    kernel[(n_blocks, batch * q_heads)](
        q, k, v, out, target, scale * 1.4426950408889634, seq, n_blocks, q_heads, q_heads // k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), target.stride(0), target.stride(1), target.stride(2),
        BLOCK=block_size, HEAD_DIM=head_dim, **extra)
    return out, target / target.sum(-1, keepdim=True)


@torch.library.custom_op("lowbit::seer_attention_target", mutates_args=())
def _attention_target_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float,
                         triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if triton:
        return attention_block_target_triton(q, k, v, block_size, scale)
    return attention_block_target_torch(q, k, v, block_size, scale)


@_attention_target_op.register_fake
def _(q, k, v, block_size, scale, triton):
    n_blocks = math.ceil(q.shape[2] / block_size)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], n_blocks, n_blocks), dtype=torch.float32)


def attention_with_block_target(q, k, v, block_size: int, scale: float | None = None, use_triton: str = "auto"):
    """Causal attention output and the normalised block-max-pooled attention map (see module doc).

    q [B, Hq, S, D], k/v [B, Hkv, S, D] (bf16/fp16/fp32) -> (out [B, Hq, S, D] q.dtype,
    target [B, Hq, ceil(S/B), ceil(S/B)] float32). Forward only: the base model is frozen, so the op has
    no autograd formula (torch.library custom op `lowbit::seer_attention_target`).
    """
    check_attention_inputs(q, k, v, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _attention_target_op(q.detach(), k.detach(), v.detach(), block_size, scale,
                                    use_triton_for(q, use_triton))


def dense_causal_attention(q, k, v, scale: float | None = None):
    """SDPA causal attention with GQA expanded: the dense baseline. Shapes as above."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True,
                                          scale=scale)
