"""One GEMM between two quantized operands, routed to lowbit.kernels.gemm by their scale layout."""
from __future__ import annotations

import logging

import torch

from lowbit.kernels.gemm import (block_scaled_mm, block_scaled_mm_cublas, block_scaled_mm_dequant,
                                 cublas_block_available, cublas_block_layout, scaled_mm)
from lowbit.precision.scaling import QTensor

log = logging.getLogger("lowbit")
_CUBLAS_BLOCKS: dict[torch.device, bool] = {}


@torch.compiler.assume_constant_result      # run as Python while tracing, its result a constant of the graph
def _cublas_blocks_on(device: torch.device) -> bool:
    if device in _CUBLAS_BLOCKS:
        return _CUBLAS_BLOCKS[device]
    available = _CUBLAS_BLOCKS[device] = cublas_block_available(device)
    if not available and device.type == "cuda":
        log.info("precision.block_gemm=cublas: %s (CUDA %s) has no cuBLASLt block-scaled FP8 GEMM (Hopper with CUDA >= "
                 "12.9); fp8_blockwise's GEMMs run on lowbit's Triton kernel (rescale)",
                 torch.cuda.get_device_name(device), torch.version.cuda)
    return available


def _cublas_blocks(a: QTensor, b: QTensor, block_k: int, a_rows: int, b_rows: int) -> bool:
    """precision.block_gemm=cublas: whether cuBLASLt takes this pair (E4M3 operands in 128-element K blocks on a
    Hopper GPU); otherwise the Triton kernel runs it."""
    e4m3 = a.data.dtype == b.data.dtype == torch.float8_e4m3fn
    rows, cols = a.data.shape
    return (e4m3 and cublas_block_layout(block_k, a_rows, b_rows, rows, b.data.shape[0], cols)
            and _cublas_blocks_on(a.data.device))


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


def prescale_gain(q: QTensor) -> torch.Tensor | None:
    """The gain g that makes every block scale of `q` times g exact in bf16 (lowbit.kernels.gemm_triton's prescaled
    scheme): 1 for power-of-two (MXFP4) scales, NVFP4's tensor scale G; None when its scales are not of that kind."""
    if not q.quantizer.blocked:
        return None
    if q.quantizer.scale_rule == "pow2":
        return q.scale.new_ones(1)
    if q.quantizer.scale_rule == "nvfp4":
        return q.gain
    return None


def quantized_matmul(a: QTensor, b: QTensor, out_dtype: torch.dtype, block_gemm: str = "rescale") -> torch.Tensor:
    """[M, N] = dequant(a)[M, C] @ dequant(b)[N, C]^T (fp32 accumulation) in out_dtype.
    block_gemm: the block-scaled GEMM's scheme (precision.block_gemm, resolved by the recipe): cublas (cuBLASLt's
    block-scaled FP8 GEMM where it takes the operands, else rescale), rescale, prescale or dequant (the nvfp4/mxfp4
    default), where both operands carry exact-in-bf16 block scales (nvfp4, mxfp4); otherwise rescale."""
    if a.quantizer.blocked or b.quantizer.blocked:
        block_k = a.quantizer.block_cols if a.quantizer.blocked else b.quantizer.block_cols
        a_scale, a_rows = _block_scale(a, block_k)
        b_scale, b_rows = _block_scale(b, block_k)
        gains = None
        if block_gemm in ("prescale", "dequant"):
            a_gain, b_gain = prescale_gain(a), prescale_gain(b)
            gains = (a_gain, b_gain) if a_gain is not None and b_gain is not None else None
        if block_gemm == "cublas" and _cublas_blocks(a, b, block_k, a_rows, b_rows):
            return block_scaled_mm_cublas(a.data, a_scale, b.data, b_scale, a_rows=a_rows, b_rows=b_rows,
                                          out_dtype=out_dtype)
        if block_gemm == "dequant" and gains is not None and a_rows == b_rows == 1:
            unit = a.quantizer.scale_rule == b.quantizer.scale_rule == "pow2"      # MXFP4: gains 1, no fp32 output
            return block_scaled_mm_dequant(a.data, a_scale, b.data, b_scale, block_k=block_k,
                                           gains=(None, None) if unit else gains, out_dtype=out_dtype)
        return block_scaled_mm(a.data, a_scale, b.data, b_scale, block_k=block_k, a_rows=a_rows, b_rows=b_rows,
                               out_dtype=out_dtype, gains=gains)
    a_scale, b_scale = a.scale, b.scale
    if (a_scale.dim() == 0) != (b_scale.dim() == 0):
        # cuBLASLt takes both scales of one kind: a tensorwise scale next to a rowwise one is broadcast to rows
        a_scale = a_scale.reshape(1, 1).expand(a.data.shape[0], 1).contiguous() if a_scale.dim() == 0 else a_scale
        b_scale = b_scale.reshape(1, 1).expand(b.data.shape[0], 1).contiguous() if b_scale.dim() == 0 else b_scale
    return scaled_mm(a.data, b.data, a_scale, b_scale, out_dtype=out_dtype)
