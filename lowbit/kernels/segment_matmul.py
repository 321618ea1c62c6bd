"""Sparse-rows times dense: the product behind OCC's compensation (arXiv 2501.17116 sec. 3.2).

`segment_matmul_add_(out, seg_ptr, idx, vals, b)` adds, for every segment s (a row of `out`),

    out[s, :] <- round(out[s, :] + sum_{p in [seg_ptr[s], seg_ptr[s+1])} vals[p] * b[idx[p], :])

with the sum in float32 and one rounding to out's dtype; segments without entries are left untouched. That is
R b for a sparse R in compressed-row form (seg_ptr = row pointers, idx = column indices, vals = values), or
R^T b with R in compressed-column form. OCC's residual holds ~1% of an activation's entries, so the product is
a gather: per entry one row of `b`, no tensor cores. The Triton kernel runs one program per (segment, block of
columns), walks the segment's entries ENTRIES at a time (that many rows of `b` in flight) and accumulates in
registers, reading `b`'s rows where they lie (L2);
nothing of size entries x N is materialised. The PyTorch path (CPU, and `use_triton="never"`) sums the same
products with `index_add_` in chunks; the two agree to float32 rounding (summation order), and the tests check
both against float64.
"""
from __future__ import annotations

import functools
import os

import torch

from lowbit.kernels import use_triton_for

BLOCK_N = 256
ENTRIES = 16                        # entries gathered per step of the Triton kernel (memory-level parallelism)
TORCH_CHUNK_ELEMENTS = 1 << 24      # the PyTorch path's entries x N temporary stays <= 64 MiB of float32


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (TRITON_INTERPRET is read when a kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def segment_matmul_add_kernel(out_ptr, seg_ptr, idx_ptr, val_ptr, b_ptr, n, so_s, so_n, sb_r,
                                  BLOCK_N: tl.constexpr, ENTRIES: tl.constexpr):
        segment = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = cols < n
        start = tl.load(seg_ptr + segment)
        end = tl.load(seg_ptr + segment + 1)
        if end > start:                                  # empty segments: out stays bit for bit
            acc = tl.zeros((BLOCK_N,), tl.float32)
            for first in range(start, end, ENTRIES):     # ENTRIES rows of b in flight at once
                entries = first + tl.arange(0, ENTRIES)
                present = entries < end
                rows = tl.load(idx_ptr + entries, mask=present, other=0).to(tl.int64)
                values = tl.load(val_ptr + entries, mask=present, other=0.0)
                tile = tl.load(b_ptr + rows[:, None] * sb_r + cols[None, :], mask=present[:, None] & in_range[None, :],
                               other=0.0).to(tl.float32)
                acc += tl.sum(values[:, None] * tile, axis=0)
            target = out_ptr + segment.to(tl.int64) * so_s + cols * so_n
            current = tl.load(target, mask=in_range).to(tl.float32)
            tl.store(target, (current + acc).to(out_ptr.dtype.element_ty), mask=in_range)

    return segment_matmul_add_kernel


def _check(out, seg_ptr, idx, vals, b) -> None:
    if out.dim() != 2 or b.dim() != 2 or out.shape[1] != b.shape[1]:
        raise ValueError(f"segment_matmul_add_: out {tuple(out.shape)} and b {tuple(b.shape)} must be 2-d with the "
                         f"same number of columns")
    if seg_ptr.shape != (out.shape[0] + 1,) or idx.shape != vals.shape or idx.dim() != 1:
        raise ValueError(f"segment_matmul_add_: seg_ptr {tuple(seg_ptr.shape)} must have out's {out.shape[0]} rows "
                         f"+ 1 entries, and idx {tuple(idx.shape)} / vals {tuple(vals.shape)} one entry each")
    if vals.dtype != torch.float32:
        raise ValueError(f"segment_matmul_add_: vals must be float32, got {vals.dtype}")


def segment_matmul_add_torch(out, seg_ptr, idx, vals, b) -> torch.Tensor:
    _check(out, seg_ptr, idx, vals, b)
    counts = seg_ptr.diff()
    segment_of = torch.repeat_interleave(torch.arange(out.shape[0], device=out.device), counts)
    touched = counts > 0
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    chunk = max(1, TORCH_CHUNK_ELEMENTS // max(1, out.shape[1]))
    for start in range(0, idx.numel(), chunk):
        part = slice(start, start + chunk)
        acc.index_add_(0, segment_of[part], vals[part, None] * b[idx[part]].float())
    out[touched] = (out[touched].float() + acc[touched]).to(out.dtype)
    return out


def segment_matmul_add_triton(out, seg_ptr, idx, vals, b) -> torch.Tensor:
    _check(out, seg_ptr, idx, vals, b)
    if not out.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton segment kernel needs CUDA tensors or TRITON_INTERPRET=1; use_triton='never' "
                           "runs the PyTorch path")
    if b.stride(1) != 1:
        b = b.contiguous()                               # rows of b are what each entry reads
    if out.shape[0] and out.shape[1]:
        grid = (out.shape[0], -(-out.shape[1] // BLOCK_N))
        _kernel()[grid](out, seg_ptr, idx, vals, b, out.shape[1], out.stride(0), out.stride(1), b.stride(0),
                        BLOCK_N=BLOCK_N, ENTRIES=ENTRIES)
    return out


def segment_matmul_add_(out: torch.Tensor, seg_ptr: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                        b: torch.Tensor, use_triton: str = "auto") -> torch.Tensor:
    """out [S, N] += (sparse [S, R] in segment form) @ b [R, N], in place (see module doc); returns out."""
    if use_triton_for(out, use_triton):
        return segment_matmul_add_triton(out, seg_ptr, idx, vals, b)
    return segment_matmul_add_torch(out, seg_ptr, idx, vals, b)
