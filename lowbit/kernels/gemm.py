"""Scaled low-precision GEMMs: the matmuls behind lowbit's FP8 / FP4 linear layers.

Two entry points, both computing ``out[M, N] = dequant(a)[M, K] @ dequant(b)[N, K].T``:

* ``scaled_mm`` -- one scale per tensor (tensorwise) or per row of each operand (rowwise).
  CUDA: ``torch._scaled_mm`` (cuBLASLt FP8 GEMM). CPU: float32 dequantize-then-matmul reference.
* ``block_scaled_mm`` -- one scale per (a_rows x block_k) block of ``a`` and (b_rows x block_k) block
  of ``b``, scales applied inside the K loop with FP32 accumulation (DeepSeek-V3 arXiv 2412.19437
  sec. 3.3.2: 1x128 activation tiles, 128x128 weight blocks; NVFP4: block_k=16; MXFP4: block_k=32).
  CUDA: the Triton kernel in ``lowbit.kernels.gemm_triton``. CPU: float32 reference below.
  ``block_scaled_mm_dequant`` is the same product for FP4 blocks (NVFP4, MXFP4) by exact dequantization to bf16
  and a cuBLAS bf16 GEMM (precision.block_gemm=dequant).

FP4 (E2M1) operands are passed stored as float8_e4m3fn: every E2M1 value {0, 0.5, 1, 1.5, 2, 3, 4, 6}
is exact in E4M3, so FP4 GEMMs run at FP8 tensor-core rate on Hopper.
"""
from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# --------------------------------------------------------------------------------------------------
# input checks (errors name the bad value and the fix)
# --------------------------------------------------------------------------------------------------

def _check_fp8_operand(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FP8_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected float8_e4m3fn or float8_e5m2. "
            f"Quantize it first (lowbit.precision / lowbit.kernels.quantize); FP4 values are stored as float8_e4m3fn.")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {tuple(t.shape)}; flatten leading dims first.")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype={out_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32.")


def _check_same_k(a_q: torch.Tensor, b_q: torch.Tensor) -> None:
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(
            f"a_q is {tuple(a_q.shape)} and b_q is {tuple(b_q.shape)}: both must be [rows, K] with the same K "
            f"(b_q is the weight in nn.Linear layout [N, K]).")


def require_fp8_device(device: torch.device) -> None:
    """Raise a clear error when `device` is a CUDA GPU without FP8 tensor cores (compute capability < 8.9)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; FP8 GEMMs need >= 8.9 "
            f"(Ada/Hopper/Blackwell). Use precision=bf16 on this GPU.")


# --------------------------------------------------------------------------------------------------
# per-tensor / per-row scales
# --------------------------------------------------------------------------------------------------

def _check_row_scale(name: str, scale: torch.Tensor, rows: int) -> None:
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {scale.dtype}; scales must be float32 (use .float()).")
    if scale.numel() == 1 and scale.dim() <= 1:
        return
    if scale.numel() != rows:
        raise ValueError(
            f"{name} has shape {tuple(scale.shape)}; expected a 0-d tensor (tensorwise) or [{rows}, 1] (rowwise).")


def scaled_mm_reference(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Float32 reference of `scaled_mm`: ((a_q * a_scale) @ (b_q * b_scale).T).to(out_dtype).

    a_q [M, K] fp8, b_q [N, K] fp8, a_scale fp32 0-d or [M, 1], b_scale fp32 0-d or [N, 1] -> [M, N] out_dtype.
    """
    a = a_q.float() * a_scale.float().reshape(-1, 1)
    b = b_q.float() * b_scale.float().reshape(-1, 1)
    return (a @ b.t()).to(out_dtype)


def scaled_mm(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = True) -> torch.Tensor:
    """out[M, N] = (a_q * a_scale) @ (b_q * b_scale).T with FP32 accumulation.

    a_q: [M, K] float8 (e4m3fn or e5m2); b_q: [N, K] float8 (nn.Linear weight layout).
    a_scale: float32 0-d (tensorwise) or [M, 1] (rowwise); b_scale: float32 0-d or [N, 1].
    Both scales must be of the same kind (both 0-d, or both per-row), as cuBLASLt requires.
    Returns [M, N] in out_dtype (bf16 default).
    use_fast_accum: cuBLASLt's FP8 fast accumulation (Hopper tensor cores keep fewer accumulator bits over
    the whole K, DeepSeek-V3 sec. 3.3.2); False promotes to FP32 periodically at some speed cost (CUDA only).
    CUDA: torch._scaled_mm (needs K and N multiples of 16; rowwise needs bf16 output and e4m3 operands
    on some torch builds). CPU: float32 reference.
    """
    _check_fp8_operand("a_q", a_q)
    _check_fp8_operand("b_q", b_q)
    _check_same_k(a_q, b_q)
    _check_out_dtype(out_dtype)
    _check_row_scale("a_scale", a_scale, a_q.shape[0])
    _check_row_scale("b_scale", b_scale, b_q.shape[0])
    if a_q.device.type != "cuda":
        return scaled_mm_reference(a_q, b_q, a_scale, b_scale, out_dtype)
    # torch._scaled_mm directly, not behind a Python custom op: it is an ATen op that torch.compile traces and
    # Inductor calls as one extern kernel, while a custom op's Python dispatch cost ~136 us per call on the H100
    # (2026-11-23 profile of a compiled llama_1b layer: launch-bound). torchao's float8 linear does the same.
    if not torch.compiler.is_compiling():
        require_fp8_device(a_q.device)
    return _scaled_mm_cuda(a_q, b_q, a_scale, b_scale, out_dtype, use_fast_accum)


def _scaled_mm_cuda(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    M, K = a_q.shape
    N = b_q.shape[0]
    if K % 16 or N % 16:
        raise ValueError(f"torch._scaled_mm needs K and N multiples of 16, got K={K}, N={N}; pad the layer's dims.")
    rowwise = a_scale.numel() != 1 or b_scale.numel() != 1
    if rowwise:
        # cuBLASLt rowwise: scale_a [M, 1], scale_b [1, N] for the column-major second operand.
        # (a scale of one element next to a per-row one is broadcast to rows)
        sa = a_scale.reshape(-1, 1).expand(M, 1).contiguous()
        sb = b_scale.reshape(1, -1).expand(1, N).contiguous()
    else:
        sa, sb = a_scale.reshape(()), b_scale.reshape(())
    # b_q.t() is [K, N] column-major, the layout cuBLASLt wants for the second FP8 operand.
    return torch._scaled_mm(a_q.contiguous(), b_q.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


# --------------------------------------------------------------------------------------------------
# block scales along K
# --------------------------------------------------------------------------------------------------

def _check_block_scale(name: str, scale: torch.Tensor, rows: int, row_block: int, k_blocks: int) -> None:
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {scale.dtype}; block scales must be float32 (decode E8M0/E4M3 scales first).")
    want = (-(-rows // row_block), k_blocks)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"{name} has shape {tuple(scale.shape)}; expected {want} = (ceil({rows}/{row_block}), K/block_k).")


def check_block_scaled_inputs(a_q, a_scale, b_q, b_scale, block_k, a_rows, b_rows, out_dtype) -> None:
    """Validate `block_scaled_mm` arguments; raises with the bad value and the fix."""
    _check_fp8_operand("a_q", a_q)
    _check_fp8_operand("b_q", b_q)
    _check_same_k(a_q, b_q)
    _check_out_dtype(out_dtype)
    K = a_q.shape[1]
    if block_k <= 0 or K % block_k:
        raise ValueError(
            f"K={K} is not a multiple of block_k={block_k}; pad K to a multiple of {block_k} "
            f"(zero padding is exact) or choose a recipe with a smaller block.")
    if a_rows <= 0 or b_rows <= 0:
        raise ValueError(f"a_rows={a_rows} and b_rows={b_rows} must be positive row-block heights.")
    _check_block_scale("a_scale", a_scale, a_q.shape[0], a_rows, K // block_k)
    _check_block_scale("b_scale", b_scale, b_q.shape[0], b_rows, K // block_k)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block_k: int, row_block: int) -> torch.Tensor:
    """q [R, K] fp8, scale fp32 [ceil(R/row_block), K/block_k] -> float32 [R, K] = q * scale of its block."""
    R = q.shape[0]
    full = scale.repeat_interleave(row_block, dim=0)[:R].repeat_interleave(block_k, dim=1)
    return q.float() * full


def block_scaled_mm_reference(a_q, a_scale, b_q, b_scale, *, block_k: int, a_rows: int = 1, b_rows: int = 1,
                              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Float32 reference of `block_scaled_mm`: dequantize each block, then one fp32 matmul."""
    a = dequantize_blocks(a_q, a_scale, block_k, a_rows)
    b = dequantize_blocks(b_q, b_scale, block_k, b_rows)
    return (a @ b.t()).to(out_dtype)


def block_scaled_mm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, *,
                    block_k: int, a_rows: int = 1, b_rows: int = 1, out_dtype: torch.dtype = torch.bfloat16,
                    gains: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """out[M, N] = sum_k (a_q * a_scale_block)[M, k] (b_q * b_scale_block)[N, k], fp32 accumulation.

    a_q: [M, K] float8; a_scale: float32 [ceil(M/a_rows), K//block_k].
    b_q: [N, K] float8; b_scale: float32 [ceil(N/b_rows), K//block_k].
    DeepSeek-V3: block_k=128, a_rows=1 (1x128 activation tiles), b_rows=128 (128x128 weight blocks).
    NVFP4 / MXFP4: block_k=16 / 32, a_rows=b_rows=1 (scales decoded to fp32 by the caller).
    Returns [M, N] in out_dtype. K must be a multiple of block_k.
    gains: (g_a, g_b), one-element fp32 tensors that make every scale * g exact in bf16 (MXFP4: 1; NVFP4: the
    tensor scale G, QTensor.gain): selects the prescaled scheme (lowbit.kernels.gemm_triton); None: the default.
    CUDA: Triton kernel (scales applied per K block inside the K loop); CPU: float32 reference.
    """
    check_block_scaled_inputs(a_q, a_scale, b_q, b_scale, block_k, a_rows, b_rows, out_dtype)
    if a_q.device.type != "cuda":
        return block_scaled_mm_reference(a_q, a_scale, b_q, b_scale, block_k=block_k, a_rows=a_rows,
                                         b_rows=b_rows, out_dtype=out_dtype)
    a_gain, b_gain = gains if gains is not None else (None, None)
    return torch.ops.lowbit.block_scaled_mm(a_q, a_scale, b_q, b_scale, block_k, a_rows, b_rows, out_dtype,
                                            a_gain, b_gain)


CUBLAS_BLOCK = 128      # cuBLASLt's block-scaled FP8 GEMM (CUDA >= 12.9, sm_90): 1x128 and 128x128 float32 scales


def cublas_block_layout(block_k: int, a_rows: int, b_rows: int, M: int, N: int, K: int) -> bool:
    """Whether cuBLASLt's DeepSeek-style block-scaled GEMM takes these operands a [M, K], b [N, K] (through
    torch._scaled_mm): 128-element K blocks, 1x128 or 128x128 scale blocks, not both 128x128, M and N multiples of
    16 (torch._scaled_mm's rule; a partial last 128-row block is fine) and K / 128 a multiple of 4 (cuBLASLt pads
    the 128x128 scale rows to 4 K blocks; llama shapes have it)."""
    return (block_k == CUBLAS_BLOCK and {a_rows, b_rows} <= {1, CUBLAS_BLOCK} and (a_rows, b_rows) != (CUBLAS_BLOCK, CUBLAS_BLOCK)
            and M % 16 == 0 and N % 16 == 0 and (K // CUBLAS_BLOCK) % 4 == 0)


def cublas_block_available(device: torch.device) -> bool:
    """cuBLASLt's block-scaled FP8 GEMM: Hopper (sm_90) only, CUDA >= 12.9."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    major, minor = (int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return (major, minor) >= (12, 9)


def block_scaled_mm_cublas(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, *,
                           a_rows: int, b_rows: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`block_scaled_mm` with 128-element K blocks by cuBLASLt (torch._scaled_mm's DeepSeek-style scaling; CUDA
    only, see cublas_block_layout): its FP8 tensor-core GEMM promotes each K block to FP32 with its scales, as the
    Triton kernel does. Scales as block_scaled_mm takes them: [R, K/128] for 1x128 rows, [R/128, K/128] for
    128x128 blocks; cuBLASLt wants the first outer-dimension-major and reads b's through b_q^T."""
    def layout(scale: torch.Tensor, rows: int) -> torch.Tensor:
        return scale.t().contiguous().t() if rows == 1 else scale.contiguous()
    return torch._scaled_mm(a_q.contiguous(), b_q.contiguous().t(), scale_a=layout(a_scale, a_rows),
                            scale_b=layout(b_scale, b_rows).t(), out_dtype=out_dtype)


def dequantize_exact_reference(q: torch.Tensor, scale: torch.Tensor, block_k: int, gain: torch.Tensor) -> torch.Tensor:
    """bf16 [R, K] = q * bf16(scale * gain) for block scales [R, K / block_k] made exact in bf16 by `gain` (MXFP4: 1,
    NVFP4: its tensor scale G): the DEQUANT scheme's operand, exact (E2M1 2 significant bits x scale 4 <= bf16's 8)."""
    R, K = q.shape
    exact = (scale * gain.reshape(1, 1).float()).to(torch.bfloat16).float()
    return (q.float().view(R, K // block_k, block_k) * exact[:, :, None]).reshape(R, K).to(torch.bfloat16)


def block_scaled_mm_dequant(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, *,
                            block_k: int, gains: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                            out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`block_scaled_mm` for FP4 block operands (one row per scale block) by the DEQUANT scheme: each operand
    dequantized exactly to bf16 with its gain, one bf16 GEMM with fp32 accumulation (cuBLAS on CUDA; float32 matmul
    on CPU), then 1 / (g_a g_b) on the fp32 result. The result is the float64 product of the dequantized operands up
    to fp32 accumulation, as the other schemes give, at the bf16 GEMM's rate (Hopper has no block-scaled MMA).
    gains: NVFP4's tensor scales G, or None for 1 (MXFP4), in which case cuBLAS writes a bf16 result directly.
    The dequantization is lowbit's one-pass Triton kernel in eager CUDA code; under torch.compile it is the PyTorch
    expression, which Inductor fuses with the quantization that produced the operand."""
    check_block_scaled_inputs(a_q, a_scale, b_q, b_scale, block_k, 1, 1, out_dtype)
    one = a_scale.new_ones(1)
    a_gain, b_gain = (one if g is None else g.reshape(1).float() for g in gains)
    cuda = a_q.device.type == "cuda"
    dequant = (torch.ops.lowbit.dequantize_exact if cuda and not torch.compiler.is_compiling()
               else dequantize_exact_reference)
    a = dequant(a_q, a_scale, block_k, a_gain)
    b = dequant(b_q, b_scale, block_k, b_gain)
    if cuda and gains[0] is None and gains[1] is None and out_dtype == torch.bfloat16:
        return torch.mm(a, b.t())                      # cuBLAS bf16 GEMM: fp32 accumulation, one rounding to bf16
    return (torch.ops.lowbit.mm_float32(a, b) * (1.0 / (a_gain * b_gain))).to(out_dtype)


@torch.library.custom_op("lowbit::dequantize_exact", mutates_args=())
def _dequantize_exact_op(q: torch.Tensor, scale: torch.Tensor, block_k: int, gain: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda":
        return dequantize_exact_reference(q, scale, block_k, gain)
    from lowbit.kernels.gemm_triton import dequantize_exact_triton
    return dequantize_exact_triton(q, scale, block_k, gain)


@_dequantize_exact_op.register_fake
def _(q, scale, block_k, gain):
    return q.new_empty(q.shape, dtype=torch.bfloat16)


@torch.library.custom_op("lowbit::mm_float32", mutates_args=())
def _mm_float32_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in fp32 from bf16 operands: cuBLAS with fp32 accumulation and output (torch >= 2.8's
    mm.dtype overload, CUDA only); on CPU a float32 matmul."""
    if a.device.type != "cuda":
        return a.float() @ b.float().t()
    return torch.mm(a, b.t(), out_dtype=torch.float32)


@_mm_float32_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# torch.library custom op (CUDA) for the Triton block-scaled GEMM, so torch.compile sees one op, not a graph break
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("lowbit::block_scaled_mm", mutates_args=())
def _block_scaled_mm_op(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                        block_k: int, a_rows: int, b_rows: int, out_dtype: torch.dtype,
                        a_gain: torch.Tensor | None = None, b_gain: torch.Tensor | None = None) -> torch.Tensor:
    if a_q.device.type != "cuda":
        return block_scaled_mm_reference(a_q, a_scale, b_q, b_scale, block_k=block_k, a_rows=a_rows,
                                         b_rows=b_rows, out_dtype=out_dtype)
    require_fp8_device(a_q.device)
    from lowbit.kernels.gemm_triton import _pick_config, block_scaled_mm_triton
    prescale = a_gain is not None and b_gain is not None
    config = _pick_config(a_q.shape[0], b_q.shape[0], block_k, prescale=True) if prescale else None
    return block_scaled_mm_triton(a_q, a_scale, b_q, b_scale, block_k=block_k, a_rows=a_rows, b_rows=b_rows,
                                  out_dtype=out_dtype, config=config, gains=(a_gain, b_gain) if prescale else None)


@_block_scaled_mm_op.register_fake
def _(a_q, a_scale, b_q, b_scale, block_k, a_rows, b_rows, out_dtype, a_gain=None, b_gain=None):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)
