"""Triton GEMM with per-block scales applied inside the K loop (FP32 accumulation).

out[M, N] = sum_kb  sa[m // a_rows, kb] * sb[n // b_rows, kb] * sum_{k in block kb} a_q[m, k] * b_q[n, k]

This is the DeepSeek-V3 recipe (arXiv 2412.19437 sec. 3.3.2, "fine-grained quantization" with
"promotion to CUDA cores"): the tensor cores produce the partial product of one K block in FP32,
then CUDA cores multiply it by the two block scales and add it to the FP32 accumulator.
Each K block therefore costs one scale FMA per output element on the CUDA cores; with block_k=128
that is hidden under the 128-deep tensor-core work, with block_k=16/32 (NVFP4/MXFP4 on Hopper,
which has no block-scaled MMA) it is not -- see docs/perf_linear.md.

A third scheme, PRESCALE, is for small blocks whose scales are exact in bf16 after one FP32 gain per operand (MXFP4:
power-of-two scales, gain 1; NVFP4: scale * G is the stored E4M3 block scale, G the FP32 tensor-level inverse
scale): each operand tile is multiplied by its block scales on the way in, in bf16, which is exact (an E2M1 value
has 2 significant bits, an E4M3 scale 4, bf16 holds 8), and a bf16 MMA with 64-128-deep K tiles accumulates the
whole K range in FP32 with no per-block rescale of the accumulator; 1 / (G_a G_b) is applied once at the end.

Operands are K-contiguous ([M, K] and [N, K], nn.Linear layout), which is the K-major layout that
Hopper's FP8 wgmma needs for both operands.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_tile(ptrs, desc, row, k0, mask, TMA: tl.constexpr):
    """One [rows, BLOCK_K] operand tile: by the tensor-memory accelerator (rows and K past the end read as 0) or
    by masked pointer loads."""
    if TMA:
        return desc.load([row, k0])
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _bf16_exact(v):
    """fp32 v rounded to the nearest bf16 value, to nearest even, returned as fp32; in integer arithmetic because the
    interpreter's fp32 -> bf16 cast truncates."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _prescaled_tile(x, s_row, k0, k_blocks, stride_sk, row_mask, gain,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_K: tl.constexpr, BF16_MATH: tl.constexpr):
    """A [ROWS, BLOCK_K] fp8 operand tile times its block scales, as bf16 (exact for PRESCALE's scales): the
    BLOCK_K / SCALE_K scales of each row, times the operand's gain, rounded to bf16 (which recovers the exact
    E4M3 / power-of-two scale), broadcast over their SCALE_K elements. The product is exact either way; it is
    formed in bf16 (packed) or, under TRITON_INTERPRET, whose bf16 arithmetic and bf16 dot are wrong, in fp32
    (returned as fp32: the same values)."""
    NB: tl.constexpr = BLOCK_K // SCALE_K
    kb = k0 // SCALE_K + tl.arange(0, NB)
    s = tl.load(s_row[:, None] + kb[None, :] * stride_sk, mask=row_mask[:, None] & (kb < k_blocks)[None, :],
                other=0.0)
    s = _bf16_exact(s * gain)
    if BF16_MATH:
        x = tl.reshape(x.to(tl.bfloat16), (ROWS, NB, SCALE_K)) * tl.reshape(s.to(tl.bfloat16), (ROWS, NB, 1))
    else:
        x = tl.reshape(x.to(tl.float32), (ROWS, NB, SCALE_K)) * tl.reshape(s, (ROWS, NB, 1))
    return tl.reshape(x, (ROWS, BLOCK_K))


@triton.jit
def _block_scaled_mm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, a_desc, b_desc, ga_ptr, gb_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    A_ROWS: tl.constexpr, B_ROWS: tl.constexpr, SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_BF16: tl.constexpr, RESCALE: tl.constexpr, TMA: tl.constexpr, PRESCALE: tl.constexpr = False,
):
    # Grouped tile order so that GROUP_M row-tiles reuse the same B column-tiles from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :] * stride_bk
    sa_row = sa_ptr + (offs_m // A_ROWS) * stride_sam
    sb_row = sb_ptr + (offs_n // B_ROWS) * stride_sbn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PRESCALE:
        # BLOCK_K spans BLOCK_K / SCALE_K scale blocks; both operands are scaled in bf16 on the way in
        ga = tl.load(ga_ptr)
        gb = tl.load(gb_ptr)
        k_blocks = K // SCALE_K
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            a = _load_tile(a_ptrs, a_desc, pid_m * BLOCK_M, k0, mask_m[:, None] & mask_k[None, :], TMA)
            b = _load_tile(b_ptrs, b_desc, pid_n * BLOCK_N, k0, mask_n[:, None] & mask_k[None, :], TMA)
            a = _prescaled_tile(a, sa_row, k0, k_blocks, stride_sak, mask_m, ga, BLOCK_M, BLOCK_K, SCALE_K, DOT_BF16)
            b = _prescaled_tile(b, sb_row, k0, k_blocks, stride_sbk, mask_n, gb, BLOCK_N, BLOCK_K, SCALE_K, DOT_BF16)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        acc = acc * ((1.0 / ga) * (1.0 / gb))
    else:
        if RESCALE:
            # One accumulator, kept divided by the current block's scales: acc_k = acc_{k-1} * s_{k-1}/s_k + P_k,
            # so tl.dot accumulates in place (half the registers of a separate partial-product tile).
            # Needs scales > 0 and finite (all-zero blocks carry scale 1); masked rows load scale 1.
            prev_a = tl.full((BLOCK_M,), 1.0, tl.float32)
            prev_b = tl.full((BLOCK_N,), 1.0, tl.float32)
        # BLOCK_K == SCALE_K, or BLOCK_K divides SCALE_K: each K tile lies in exactly one scale block.
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            a = _load_tile(a_ptrs, a_desc, pid_m * BLOCK_M, k0, mask_m[:, None] & mask_k[None, :], TMA)
            b = _load_tile(b_ptrs, b_desc, pid_n * BLOCK_N, k0, mask_n[:, None] & mask_k[None, :], TMA)
            if DOT_BF16:
                # Small K tiles (NVFP4 16, MXFP4 32): multiply the exact bf16 upcast (FP8 wgmma needs K >= 32 and
                # accumulates with reduced precision; these blocks are bound by the CUDA-core scaling anyway).
                # (Off under TRITON_INTERPRET, whose bf16 arithmetic and bf16 dot are wrong -- its fp8 -> bf16
                # cast is right, Triton 3.9 -- and whose fp8 dot has no K limit.)
                a = a.to(tl.bfloat16)
                b = b.to(tl.bfloat16)
            kb = k0 // SCALE_K
            if RESCALE:
                sa = tl.load(sa_row + kb * stride_sak, mask=mask_m, other=1.0)
                sb = tl.load(sb_row + kb * stride_sbk, mask=mask_n, other=1.0)
                acc = acc * ((prev_a / sa)[:, None] * (prev_b / sb)[None, :])
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
                prev_a = sa
                prev_b = sb
            else:
                sa = tl.load(sa_row + kb * stride_sak, mask=mask_m, other=0.0)
                sb = tl.load(sb_row + kb * stride_sbk, mask=mask_n, other=0.0)
                partial = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
                acc += partial * (sa[:, None] * sb[None, :])
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if RESCALE:
            acc = acc * (prev_a[:, None] * prev_b[None, :])

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pick_config(M: int, N: int, block_k: int, prescale: bool = False) -> dict:
    """Tile shape and accumulation scheme, from the H100 sweep in docs/perf_linear.md (8192x4096x4096).

    block_k >= 64 (DeepSeek 128): FP8 wgmma per K block into a fresh FP32 tile, promoted with the scales on
    CUDA cores (the precise scheme; the rescaled accumulator was 10% faster but chains Hopper's reduced-
    precision FP8 accumulation over all of K: 4e-3 relative error at K=14336). block_k < 64 (MXFP4 32,
    NVFP4 16): the exact bf16 upcast (full FP32 accumulation) with the rescaled single accumulator. The PRESCALE
    scheme (module doc, `prescale=True`: precision.block_gemm=prescale, the nvfp4/mxfp4 default) takes 128 x 128 x 64
    tiles, 8 warps, 3 stages, operands by tensor descriptors: the fastest of bench/fp4_gemm.py's sweep at all three
    shapes (H200, 2026-12-02: NVFP4 198-212, MXFP4 244-255 TFLOP/s against 99-101 / 172-179 rescaled; bf16 cuBLAS
    688-792).
    """
    if prescale:
        if _INTERPRET:
            return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=max(64, block_k), GROUP_M=2, num_warps=4, num_stages=1,
                        PRESCALE=True)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=max(64, block_k), GROUP_M=8, num_warps=8, num_stages=3,
                    PRESCALE=True, DOT_BF16=True, TMA=True)
    block_kt = min(block_k, 128)
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_kt, GROUP_M=2, num_warps=4, num_stages=1, RESCALE=False)
    if block_kt < 64:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_kt, GROUP_M=8, num_warps=4, num_stages=3,
                    RESCALE=True, DOT_BF16=True)
    # H200, 2026-12-01 (bench/block_gemm.py): 64 x 128 tiles, 4 warps, 4 stages, operands by tensor descriptors:
    # 662 / 647 TFLOP/s at 8192 x 4096 x 4096 / x 14336, against 541 / 553 for 128 x 128, 8 warps, pointer loads.
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_kt, GROUP_M=8, num_warps=4, num_stages=4, RESCALE=False,
                TMA=True)


def _tma_ok(t: torch.Tensor) -> bool:
    """Operand tiles by tensor descriptors: Hopper and newer, unit stride along K, 16-byte aligned rows and base."""
    return (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9 and t.stride(1) == 1
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def block_scaled_mm_triton(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, *,
                           block_k: int, a_rows: int = 1, b_rows: int = 1,
                           out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
                           gains: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Launch the block-scaled GEMM. Shapes as in lowbit.kernels.gemm.block_scaled_mm (validated there).

    a_q [M, K] fp8, a_scale fp32 [ceil(M/a_rows), K/block_k], b_q [N, K] fp8,
    b_scale fp32 [ceil(N/b_rows), K/block_k] -> [M, N] out_dtype.
    `config` overrides the tile choice (used by bench/ to sweep tiles). With config PRESCALE=True, `gains` (fp32
    one-element tensors g_a, g_b, default 1) must make every scale * g exact in bf16 (see the module doc): then
    the kernel's result is exact up to FP32 accumulation; otherwise the scales are rounded to bf16.
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    out = torch.empty((M, N), device=a_q.device, dtype=out_dtype)
    cfg = dict(config or _pick_config(M, N, block_k))
    rescale = cfg.pop("RESCALE", False)
    prescale = cfg.pop("PRESCALE", False)
    ga, gb = a_scale, b_scale                   # unused unless PRESCALE
    if prescale:
        one = torch.ones(1, device=a_q.device, dtype=torch.float32)
        ga, gb = (g.reshape(1).float() for g in gains) if gains is not None else (one, one)
    tma = cfg.pop("TMA", False) and (_INTERPRET or (_tma_ok(a_q) and _tma_ok(b_q)))
    a_desc, b_desc = a_q, b_q                   # unused unless TMA
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc = TensorDescriptor.from_tensor(a_q, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        b_desc = TensorDescriptor.from_tensor(b_q, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    dot_bf16 = cfg.pop("DOT_BF16", cfg["BLOCK_K"] < 32) and not _INTERPRET
    if prescale and cfg["BLOCK_K"] % block_k:
        raise ValueError(f"PRESCALE: tile BLOCK_K={cfg['BLOCK_K']} must be a multiple of block_k={block_k}")
    if not prescale and block_k % cfg["BLOCK_K"]:
        raise ValueError(f"tile BLOCK_K={cfg['BLOCK_K']} must divide block_k={block_k}")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _block_scaled_mm_kernel[grid](
        a_q, b_q, out, a_scale, b_scale, a_desc, b_desc, ga, gb, M, N, K,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), out.stride(0), out.stride(1),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        A_ROWS=a_rows, B_ROWS=b_rows, SCALE_K=block_k, DOT_BF16=dot_bf16, RESCALE=rescale, TMA=tma,
        PRESCALE=prescale, **cfg)
    return out


@triton.jit
def _dequantize_exact_kernel(q_ptr, s_ptr, g_ptr, out_ptr, R, K, stride_qr, stride_sr, stride_sk, stride_or,
                             SCALE_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[R, K] bf16 = q * bf16(scale * gain), the exact operand of the DEQUANT scheme (q E2M1-valued fp8)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows[:, None] * stride_sr + (cols // SCALE_K)[None, :] * stride_sk, mask=mask, other=0.0)
    s = _bf16_exact(s * tl.load(g_ptr))     # then q * s is exact in fp32 and in bf16: the store's cast cannot round
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :], (q * s).to(tl.bfloat16), mask=mask)


def dequantize_exact_triton(q: torch.Tensor, scale: torch.Tensor, block_k: int, gain: torch.Tensor) -> torch.Tensor:
    """q [R, K] fp8 with block scales [R, K / block_k] (fp32) whose products with `gain` are exact in bf16 (MXFP4:
    gain 1; NVFP4: G) -> bf16 [R, K] = q * bf16(scale * gain), exact: the DEQUANT scheme's operand (one pass,
    1 byte read and 2 written per element)."""
    R, K = q.shape
    if q.stride(1) != 1:
        q = q.contiguous()
    out = torch.empty((R, K), device=q.device, dtype=torch.bfloat16)
    block_r, block_c = (16, 64) if _INTERPRET else (32, 256)
    grid = (triton.cdiv(R, block_r), triton.cdiv(K, block_c))
    _dequantize_exact_kernel[grid](q, scale, gain.reshape(1).float(), out, R, K, q.stride(0), scale.stride(0),
                                   scale.stride(1), out.stride(0), SCALE_K=block_k, BLOCK_R=block_r,
                                   BLOCK_K=block_c, num_warps=4)
    return out
