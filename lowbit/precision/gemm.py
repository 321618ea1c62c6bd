"""One GEMM between two quantized operands, routed to lowbit.kernels.gemm by their scale layout."""
from __future__ import annotations

import torch

from lowbit.kernels.gemm import block_scaled_mm, scaled_mm
from lowbit.precision.scaling import QTensor


def _block_scale(q: QTensor, block_k: int) -> tuple[torch.Tensor, int]:
    """(scale [ceil(R/rows), C/block_k], rows) of any operand, expanded exactly to K blocks of block_k."""
    rows, cols = q.data.shape
    quantizer = q.quantizer
    if quantizer.blocked:
        if quantizer.block_cols != block_k:
            raise ValueError(f"cannot multiply operands with {quantizer.block_cols}- and {block_k}-element blocks")
        return q.scale, quantizer.block_rows
    if quantizer.tensorwise:
        return q.scale.reshape(1, 1).expand(1, cols // block_k).contiguous(), rows
    return q.scale.reshape(rows, 1).expand(rows, cols // block_k).contiguous(), 1


def quantized_matmul(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] = dequant(a)[M, C] @ dequant(b)[N, C]^T (fp32 accumulation) in out_dtype."""
    if a.quantizer.blocked or b.quantizer.blocked:
        block_k = a.quantizer.block_cols if a.quantizer.blocked else b.quantizer.block_cols
        a_scale, a_rows = _block_scale(a, block_k)
        b_scale, b_rows = _block_scale(b, block_k)
        return block_scaled_mm(a.data, a_scale, b.data, b_scale, block_k=block_k, a_rows=a_rows, b_rows=b_rows,
                               out_dtype=out_dtype)
    a_scale, b_scale = a.scale, b.scale
    if (a_scale.dim() == 0) != (b_scale.dim() == 0):
        # cuBLASLt takes both scales of one kind: a tensorwise scale next to a rowwise one is broadcast to rows
        a_scale = a_scale.reshape(1, 1).expand(a.data.shape[0], 1).contiguous() if a_scale.dim() == 0 else a_scale
        b_scale = b_scale.reshape(1, 1).expand(b.data.shape[0], 1).contiguous() if b_scale.dim() == 0 else b_scale
    return scaled_mm(a.data, b.data, a_scale, b_scale, out_dtype=out_dtype)
