"""The random Hadamard transform of a wgrad operand, fused with its transposed copy, as one Triton kernel.

`hadamard_transpose_triton(t, transform)` returns lowbit.precision.methods.hadamard_last_axis(t.t(), transform) as
a contiguous [C, R] tensor of t's dtype, and its amax: t [R, C] read once, each tile transposed in registers and its
blocks of `size` consecutive tokens multiplied by the +-1 matrix D H on the tensor cores, then scaled by
1/sqrt(size), written once and max-reduced (one atomic per tile). The backward's dy^T and the saved x^T are
transposed copies anyway; the transform rides along.

Why a kernel: under torch.compile a Walsh-Hadamard butterfly became Inductor kernels reading the transposed
view uncoalesced, ~0.73 s of an NVFP4 llama_1b step (2.50 s of kernels against 1.86 s with the earlier GEMM form;
H200 trainer profile, 2026-12-02), and the GEMM form ran float32 cuBLAS GEMMs with K = 16 / 32 plus float32 copies.

Numerics: bf16 / fp16 values and +-1 entries are exact in TF32, so the products are exact and only the float32
accumulation order differs from the float64 matrix product (then one rounding to t's dtype); float32 input takes
IEEE float32 products. Block sizes 16 (tl.dot's smallest side) to 64 (one tile); others take the PyTorch path.
"""
from __future__ import annotations

import math

import torch

from lowbit.kernels.quantize_triton import AVAILABLE

TILE_R, TILE_C, WARPS = 64, 64, 4     # tokens x channels per program
SIZES = (16, TILE_R)                  # transform sizes the kernel takes: tl.dot's smallest side .. one tile

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _hadamard_t_kernel(t_ptr, h_ptr, out_ptr, amax_ptr, R, C, stride_r, INV_SQRT: tl.constexpr,
                           SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)          # tokens: the transform's axis
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=mask, other=0.0)
        blocks = tl.reshape(tl.trans(t.to(tl.float32)), (BLOCK_C * BLOCK_R // SIZE, SIZE))   # [C-tile, R-tile]
        k = tl.arange(0, SIZE)
        h = tl.where(tl.load(h_ptr + k[:, None] * SIZE + k[None, :]) >= 0, 1.0, -1.0)    # D H exactly: its signs
        # INV_SQRT a compile-time constant, rounded to float32 in the product as eager launches round a float
        # argument (from Inductor's wrapper a runtime float argument may arrive as float64)
        out = tl.reshape(tl.dot(blocks, h, input_precision=PRECISION), (BLOCK_C, BLOCK_R)) * INV_SQRT
        stored = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], stored,
                 mask=(cols[:, None] < C) & (rows[None, :] < R))
        magnitude = tl.abs(stored.to(tl.float32))          # of the values written (masked entries are 0)
        magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))   # NaN -> Inf: never dropped
        tl.atomic_max(amax_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))


def supports(t: torch.Tensor, transform: torch.Tensor) -> bool:
    """2-D float input whose token count (rows) is a multiple of the transform's size, size 16..64."""
    size = transform.shape[0]
    return (t.dim() == 2 and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and SIZES[0] <= size <= SIZES[1] and t.shape[0] % size == 0)


def hadamard_transpose_triton(t: torch.Tensor, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (t^T [C, R] with each block of `size` consecutive entries along R times `transform`, in t's
    dtype, contiguous; its amax, float32 [1], NaN read as Inf). transform: hadamard_matrix's D H / sqrt(size) (its
    signs are all that is read). The amax comes from the same pass, for NVFP4's tensor scale, which otherwise
    needs a read of the result of its own."""
    size = transform.shape[0]
    if not supports(t, transform):
        raise ValueError(f"hadamard_transpose_triton: t {tuple(t.shape)} {t.dtype} with a {size}-point transform "
                         f"needs a 2-D float tensor, rows a multiple of {size}, size {SIZES[0]}..{SIZES[1]}; "
                         f"use hadamard_last_axis for others")
    t = t if t.stride(1) == 1 else t.contiguous()
    R, C = t.shape
    transform = transform.contiguous()          # the kernel reads its signs, D H exactly; 1/sqrt(size) comes after
    out = torch.empty((C, R), device=t.device, dtype=t.dtype)
    amax = torch.zeros(1, device=t.device, dtype=torch.float32)
    precision = "ieee" if t.dtype == torch.float32 else "tf32"
    _hadamard_t_kernel[(triton.cdiv(R, TILE_R), triton.cdiv(C, TILE_C))](
        t, transform, out, amax, R, C, t.stride(0), INV_SQRT=1.0 / math.sqrt(size), SIZE=size, BLOCK_R=TILE_R,
        BLOCK_C=TILE_C, PRECISION=precision, num_warps=WARPS)
    return out, amax
