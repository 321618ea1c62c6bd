"""Causal block-sparse flash-attention forward (prefill, GQA) that skips unselected key blocks.

`block_sparse_attention(q, k, v, block_mask, block_size)`:
  q [B, Hq, S, D], k/v [B, Hkv, S, D], block_mask [B, Hm, nB, nB] bool with Hm = Hq (one mask per
  query head) or Hm = Hkv (one per GQA group, SeerAttention-R style), nB = ceil(S / block_size).
  Query block i attends to key block j only where block_mask[..., i, j] (and j <= i, causal inside
  the diagonal block). Returns out [B, Hq, S, D] in q's dtype. A query row with no kept key gets 0.

The mask is turned into, per (batch, mask head, query block), the list of kept key blocks and its
length; one Triton program per (batch, q head, query block) walks only that list, so the work is
proportional to the kept blocks (arXiv 2410.13276 sec. 3.3: block-sparse FlashAttention).
The PyTorch path is masked dense attention (token mask expanded from the block mask), same numerics
up to the order of summation; it runs on CPU and is the test reference.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from lowbit.kernels import use_triton_for
from lowbit.kernels.attention_target import SUPPORTED_HEAD_DIMS, check_attention_inputs, repeat_kv


def check_block_mask(q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> None:
    n_blocks = math.ceil(q.shape[2] / block_size)
    ok_heads = (q.shape[1], k.shape[1])
    if (block_mask.dim() != 4 or block_mask.shape[0] != q.shape[0] or block_mask.shape[1] not in ok_heads
            or block_mask.shape[2:] != (n_blocks, n_blocks)):
        raise ValueError(f"block_mask has shape {tuple(block_mask.shape)}; expected [{q.shape[0]}, "
                         f"{q.shape[1]} or {k.shape[1]}, {n_blocks}, {n_blocks}] for q {tuple(q.shape)} and "
                         f"block_size={block_size}")


def expand_block_mask(block_mask: torch.Tensor, block_size: int, seq: int) -> torch.Tensor:
    """[B, H, nB, nB] block mask -> [B, H, S, S] token mask, causal (key <= query)."""
    token = block_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[..., :seq, :seq]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=block_mask.device).tril()
    return token & causal


def block_sparse_attention_torch(q, k, v, block_mask, block_size: int, scale: float | None = None):
    """Masked dense attention in float32: the reference (O(S^2) memory; for tests and CPU)."""
    check_attention_inputs(q, k, v, block_size)
    check_block_mask(q, k, block_mask, block_size)
    batch, q_heads, seq, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    groups = q_heads // k.shape[1]
    mask = expand_block_mask(block_mask.bool(), block_size, seq)
    mask = repeat_kv(mask, q_heads // mask.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), repeat_kv(k, groups).float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)      # rows with nothing kept -> 0
    return torch.einsum("bhqk,bhkd->bhqd", probs, repeat_kv(v, groups).float()).to(q.dtype)


def kept_block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal part of the mask as (indices [B, H, nB, nB] int32 with kept blocks first, counts [B, H, nB])."""
    n_blocks = block_mask.shape[-1]
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=block_mask.device).tril()
    kept = block_mask.bool() & causal
    # stable sort on "not kept" puts the kept key blocks first, in increasing order
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return order.contiguous(), kept.sum(-1, dtype=torch.int32).contiguous()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def block_sparse_kernel(Q, K, V, Out, Index, Count, scale_log2, seq, n_blocks, q_heads, groups, mask_div,
                            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, so_b, so_h, so_s,
                            si_b, si_h, si_q, sc_b, sc_h,
                            BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        q_block = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // q_heads
        h = bh % q_heads
        kv_h = h // groups
        mask_h = h // mask_div
        offs_m = q_block * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * sk_b + kv_h * sk_h
        v_base = V + b * sk_b + kv_h * sk_h
        index_base = Index + b * si_b + mask_h * si_h + q_block * si_q
        count = tl.load(Count + b * sc_b + mask_h * sc_h + q_block)
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
        for i in range(0, count):
            kb = tl.load(index_base + i)
            cols = kb * BLOCK + offs_n
            col_ok = cols < seq
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            if kb == q_block:       # only the diagonal tile needs the causal / sequence-end mask
                s = tl.where((cols[None, :] <= offs_m[:, None]) & col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows fully masked so far
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None])

    return block_sparse_kernel


def block_sparse_attention_triton(q, k, v, block_mask, block_size: int, scale: float | None = None,
                                  num_warps: int = 0, num_stages: int = 0):
    check_attention_inputs(q, k, v, block_size)
    check_block_mask(q, k, block_mask, block_size)
    batch, q_heads, seq, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton attention kernels; supported: "
                         f"{SUPPORTED_HEAD_DIMS} (use_triton=never runs the PyTorch path)")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton block-sparse kernel needs a CUDA tensor or TRITON_INTERPRET=1; "
                           "use the PyTorch path (use_triton=never) on CPU")
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    index, count = kept_block_lists(block_mask)
    out = torch.empty_like(q)
    n_blocks = index.shape[-1]
    extra = {"num_warps": num_warps or (4 if block_size <= 64 else 8), "num_stages": num_stages or 2} if q.is_cuda else {}
    _kernels()[(n_blocks, batch * q_heads)](
        q, k, v, out, index, count, scale * 1.4426950408889634, seq, n_blocks, q_heads,
        q_heads // k.shape[1], q_heads // block_mask.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), index.stride(0), index.stride(1), index.stride(2),
        count.stride(0), count.stride(1), BLOCK=block_size, HEAD_DIM=head_dim, **extra)
    return out


@torch.library.custom_op("lowbit::seer_block_sparse_attention", mutates_args=())
def _block_sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int,
                     scale: float, triton: bool) -> torch.Tensor:
    if triton:
        return block_sparse_attention_triton(q, k, v, block_mask, block_size, scale)
    return block_sparse_attention_torch(q, k, v, block_mask, block_size, scale)


@_block_sparse_op.register_fake
def _(q, k, v, block_mask, block_size, scale, triton):
    return torch.empty_like(q)


def block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float | None = None,
                           use_triton: str = "auto"):
    """Causal attention restricted to the kept blocks of `block_mask` (see module doc). Forward only
    (inference; torch.library custom op `lowbit::seer_block_sparse_attention`)."""
    check_attention_inputs(q, k, v, block_size)
    check_block_mask(q, k, block_mask, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _block_sparse_op(q.detach(), k.detach(), v.detach(), block_mask.bool(), block_size, scale,
                                use_triton_for(q, use_triton))
