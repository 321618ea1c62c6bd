"""OCC's clamp and residual compaction (arXiv 2501.17116 sec. 3.2) in two passes over the activation.

`occ_clamp_triton(x, threshold, dense_share)` returns what lowbit.precision.methods' PyTorch path returns, bit for
bit: clamp(x, +-threshold) in x's dtype, and the residual x - clamp(x) (float32) as compressed rows (row_ptr,
cols, vals: the outliers outside the dense columns, row by row, columns increasing) plus dense columns (dense_cols,
dense_vals [M, c]: the columns with outliers in more than `dense_share` of the rows).

  pass 1 (`_clamp_count_kernel`, one read of x, one write of clamp(x)): per-column and per-row outlier counts;
  host: the dense columns (one synchronisation: their number), their values (a gather of c columns), row pointers
        from the per-row counts less the dense columns' outliers (a second synchronisation: the entry count);
  pass 2 (`_compact_kernel`, one more read of x): each program walks its rows left to right and writes every
        remaining outlier at its row's pointer plus its rank within the row (a prefix sum per tile).
The PyTorch path takes a boolean mask, column and row sums and `nonzero` over the whole [M, K] tensor.
"""
from __future__ import annotations

import functools

import torch

BLOCK_M, BLOCK_K = 32, 128


@functools.cache
def _kernels():
    """The Triton kernels, built on first use (TRITON_INTERPRET is read when a kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _clamp_count_kernel(x_ptr, t_ptr, clamped_ptr, col_count_ptr, row_count_ptr, M, K,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows < M)[:, None] & (cols < K)[None, :]
        offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)      # exact; so is every clamp value
        t = tl.load(t_ptr)
        clamped = tl.maximum(tl.minimum(x, t, propagate_nan=tl.PropagateNan.ALL), -t,
                             propagate_nan=tl.PropagateNan.ALL)
        tl.store(clamped_ptr + offsets, clamped.to(clamped_ptr.dtype.element_ty), mask=inside)
        outlier = ((tl.abs(x) > t) & inside).to(tl.int32)
        tl.atomic_add(col_count_ptr + cols, tl.sum(outlier, 0), mask=cols < K)
        tl.atomic_add(row_count_ptr + rows, tl.sum(outlier, 1), mask=rows < M)

    @triton.jit
    def _compact_kernel(x_ptr, t_ptr, dense_ptr, row_ptr_ptr, cols_ptr, vals_ptr, M, K,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        t = tl.load(t_ptr)
        written = tl.load(row_ptr_ptr + rows, mask=row_ok, other=0)         # next free slot of each row
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            inside = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            dense = tl.load(dense_ptr + cols, mask=cols < K, other=1)
            keep = (tl.abs(x) > t) & inside & (dense == 0)[None, :]
            rank = tl.cumsum(keep.to(tl.int64), axis=1)                       # inclusive rank within the tile's row
            slot = written[:, None] + rank - 1
            residual = x - tl.minimum(tl.maximum(x, -t), t)                 # exact: x or x -+ t, as float32
            tl.store(cols_ptr + slot, cols[None, :].to(tl.int64) + tl.zeros_like(slot), mask=keep)
            tl.store(vals_ptr + slot, residual, mask=keep)
            written += tl.sum(keep.to(tl.int64), axis=1)

    return _clamp_count_kernel, _compact_kernel


def occ_clamp_triton(x: torch.Tensor, threshold: torch.Tensor, dense_share: float):
    """(clamped, row_ptr, cols, vals, dense_cols, dense_vals) as lowbit.precision.methods' `_occ_clamp`."""
    import triton

    clamp_count, compact = _kernels()
    x = x.contiguous()
    M, K = x.shape
    t = threshold.reshape(1).to(x.dtype).float()     # the threshold as x's dtype holds it; compared in float32
    clamped = torch.empty_like(x)
    counts = torch.zeros(K + M, dtype=torch.int32, device=x.device)          # one memset for both
    col_count, row_count = counts[:K], counts[K:]
    clamp_count[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))](x, t, clamped, col_count, row_count, M, K,
                                                                      BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    dense = col_count > M * dense_share
    dense_cols = dense.nonzero().squeeze(1)
    dense_x = x[:, dense_cols]
    dense_vals = dense_x.float() - clamped[:, dense_cols].float()
    sparse_per_row = row_count.long() - (dense_x.abs() > t).sum(1)
    row_ptr = torch.zeros(M + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(sparse_per_row, 0, out=row_ptr[1:])
    entries = int(row_ptr[-1])
    cols = torch.empty(entries, dtype=torch.int64, device=x.device)
    vals = torch.empty(entries, dtype=torch.float32, device=x.device)
    if entries:
        compact[(triton.cdiv(M, BLOCK_M),)](x, t, dense.to(torch.int8), row_ptr, cols, vals, M, K,
                                            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return clamped, row_ptr, cols, vals, dense_cols, dense_vals
