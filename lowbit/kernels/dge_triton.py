"""DGE's weight gradient (arXiv 2501.17116 eq. 8) as one Triton kernel, for eager CUDA backward passes.

`dge_weight_gradient_triton(dw, weight, scales, quantizer, k, clip)` returns what
lowbit.precision.linear.dge_weight_gradient returns: dw [N, K] float32 times f'(W / s), with s the forward scale of
each weight element (per sign under AFPQ) and f'(x) = (1/k) |2t - 1|^(1/k - 1) clipped at `clip`, t the place of
|x| inside its interval of the FP4 grid. One read of dw and W and one write, where the PyTorch path runs about a
dozen element-wise passes over the float32 weight (0.8 ms of one eager 4096 x 4096 fp4 layer's 1.7, H200,
2026-12-02). The scale is read at its block (tensorwise, per row or per block of the quantizer), never expanded.

Numerics: W / s by IEEE division (div_rn) and |x| / ulp exactly (ulp is a power of two), so t is bit-identical to
the PyTorch path; the power is exp2((1/k - 1) log2 |2t - 1|), within a few float32 ulps of torch.pow.
torch.compile'd layers fuse the PyTorch path themselves and do not call this kernel.
"""
from __future__ import annotations

import functools

import torch

BLOCK = 1024


@functools.cache
def _kernel():
    """Built on first use (TRITON_INTERPRET is read when a kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _dge_kernel(dw_ptr, w_ptr, s_ptr, s_neg_ptr, out_ptr, n, cols, scale_cols, block_rows, block_cols,
                    inv_k, exponent, clip, fmt_max, MIN_EXPONENT: tl.constexpr, MANTISSA: tl.constexpr,
                    ASYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        row, col = offsets // cols, offsets % cols
        scale_index = (row // block_rows) * scale_cols + col // block_cols
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + scale_index, mask=mask, other=1.0)
        if ASYMMETRIC:
            scale = tl.where(w >= 0, scale, tl.load(s_neg_ptr + scale_index, mask=mask, other=1.0))
        magnitude = tl.minimum(tl.abs(tl.math.div_rn(w, scale)), fmt_max)
        exponent_bits = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent_bits = tl.maximum(exponent_bits, MIN_EXPONENT)
        ulp = ((exponent_bits - MANTISSA + 127) << 23).to(tl.float32, bitcast=True)
        steps = tl.math.div_rn(magnitude, ulp)                               # exact: ulp is a power of two
        position = steps - tl.floor(steps)
        distance = tl.abs(2.0 * position - 1.0)
        derivative = inv_k * tl.exp2(exponent * tl.log2(distance))            # 0 ** negative = inf, clipped below
        derivative = tl.minimum(derivative, clip)
        dw = tl.load(dw_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, dw * derivative, mask=mask)

    return _dge_kernel


def scale_layout(scale: torch.Tensor, quantizer, shape) -> tuple[torch.Tensor, int, int, int]:
    """(scale as a contiguous float32 [SR, SC] tensor, SC, block rows, block cols) of a weight of `shape` [N, K]."""
    rows, cols = shape
    scale = scale.float().contiguous()
    if scale.dim() == 0 or scale.numel() == 1:                                   # tensorwise
        return scale.reshape(1, 1), 1, rows, cols
    if quantizer.tensorwise or not quantizer.blocked and quantizer.block_rows == 1:   # one scale per row
        return scale.reshape(-1, 1), 1, 1, cols
    block_cols = quantizer.block_cols or cols
    return scale.reshape(-(-rows // quantizer.block_rows), cols // block_cols), cols // block_cols, \
        quantizer.block_rows, block_cols


def dge_weight_gradient_triton(dw: torch.Tensor, weight: torch.Tensor, scales: list[torch.Tensor], quantizer,
                               k: float, clip: float) -> torch.Tensor:
    """dw [N, K] float32 times DGE's f'(W / s); scales = [s] or [s_positive, s_negative] (AFPQ)."""
    if dw.dtype != torch.float32 or dw.shape != weight.shape:
        raise ValueError(f"DGE kernel: dw must be float32 of the weight's shape {tuple(weight.shape)}, got "
                         f"{dw.dtype} {tuple(dw.shape)}")
    fmt = quantizer.fmt
    dw, weight = dw.contiguous(), weight.contiguous()
    positive, scale_cols, block_rows, block_cols = scale_layout(scales[0], quantizer, weight.shape)
    negative = scale_layout(scales[1], quantizer, weight.shape)[0] if len(scales) == 2 else positive
    out = torch.empty_like(dw)
    n = dw.numel()
    if n:
        _kernel()[(-(-n // BLOCK),)](
            dw, weight, positive, negative, out, n, weight.shape[1], scale_cols, block_rows, block_cols,
            1.0 / k, 1.0 / k - 1.0, clip, fmt.max, MIN_EXPONENT=fmt.min_normal_exponent,
            MANTISSA=fmt.mantissa_bits, ASYMMETRIC=len(scales) == 2, BLOCK=BLOCK)
    return out
