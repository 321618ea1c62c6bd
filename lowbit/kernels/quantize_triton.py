"""Fused Triton quantize kernels: absmax, scale, RNE rounding, saturation, FP8 cast and the transposed copy.

For an operand x [R, C] the forward GEMM wants it scaled along C, the backward GEMM wants x^T [C, R]
scaled along R. Two launches, each one read of x:
  1. `_amax_kernel`: per-row amax (over C) and per-column amax (over R) from one read of each tile (integer
     atomic max on the float bits; NaN is turned into +Inf so it cannot be lost); a tensor amax by
     `_tensor_amax_kernel` over flat blocks (the strip kernel for a row-strided x).
  2. `_quantize_pair_kernel`: reads each tile once more, multiplies by the row (and column) inverse
     scale, rounds onto the format grid (the integer/float steps of lowbit.precision.formats, so the
     result equals the PyTorch reference bit for bit; on a GPU, E4M3 and E5M2 are only saturated and the
     float8 cast's own round-to-nearest-even does the rounding), casts to float8 and writes x_q [R, C] and
     the transposed x^T_q [C, R].
The second launch also computes the scales from the amaxes with the fp32 operations of
lowbit.precision.scaling.scales_from_amax (IEEE division via div_rn) and writes them. Exposed as torch.library custom ops with fake
implementations, so torch.compile keeps them as single ops.
"""
from __future__ import annotations

import functools

import torch

from lowbit.precision.formats import E2M1, E4M3, E5M2
from lowbit.precision.scaling import AMAX_FLOOR, QTensor, Quantizer, check_finite, reduce_amax

try:
    import triton
    import triton.language as tl
    FLOOR = tl.constexpr(AMAX_FLOOR)          # scaling.AMAX_FLOOR, visible inside the kernels
    AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    AVAILABLE = False

FORMAT_CODES = {"e4m3": 0, "e5m2": 1, "e2m1": 2}
FORMAT_OF_CODE = {0: E4M3, 1: E5M2, 2: E2M1}

if AVAILABLE:
    @triton.jit
    def _grid_steps(v, MAX: tl.constexpr, MIN_EXP: tl.constexpr, MBITS: tl.constexpr):
        """(|v| saturated at MAX, in units of the grid's ulp there: exact, the ulp is a power of two; that ulp)."""
        magnitude = tl.minimum(tl.abs(v), MAX, propagate_nan=tl.PropagateNan.ALL)
        exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, MIN_EXP)
        ulp = ((exponent - MBITS + 127) << 23).to(tl.float32, bitcast=True)
        inverse_ulp = ((127 - exponent + MBITS) << 23).to(tl.float32, bitcast=True)
        return magnitude * inverse_ulp, ulp

    @triton.jit
    def _signed_grid_value(steps, ulp, v, MAX: tl.constexpr):
        """steps * ulp (saturated at MAX) with v's sign bit (keeps -0.0 and negative signs)."""
        rounded = tl.minimum(steps * ulp, MAX)
        sign = v.to(tl.int32, bitcast=True) & -2147483648       # 0x80000000
        return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_e2m1(v):
        """`_round_to_grid` for E2M1 with four integer-pipe operations instead of six plus a clamp: the kernels are
        bound by the H200's integer/logic pipe (Nsight Compute, 2026-12-02), which also runs float min/max and
        selects. |v| + c - c rounds half to even onto multiples of c's float32 ulp, and c = 1.5 * 2^22 * max(2^e, 1)
        (2^e = |v|'s binade, by masking its exponent bits) has ulp 0.5 below 2, 1 below 4 and 2 up to 6: E2M1's
        spacings. The multiply-adds run on the FMA pipe; c's product is exact, so fusing it changes nothing."""
        magnitude = tl.minimum(tl.abs(v), 6.0, propagate_nan=tl.PropagateNan.ALL)
        binade = (magnitude.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)   # 0 if subnormal
        magic = tl.maximum(binade, 1.0) * 6291456.0
        rounded = (magnitude + magic) - magic
        sign = v.to(tl.int32, bitcast=True) & -2147483648       # 0x80000000
        return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_grid(v, MAX: tl.constexpr, MIN_EXP: tl.constexpr, MBITS: tl.constexpr):
        """float32 -> float32 on the grid (RNE, saturating, sign kept); see formats.round_to_format."""
        if MAX == 6.0 and MIN_EXP == 0 and MBITS == 1:
            return _round_to_e2m1(v)
        steps, ulp = _grid_steps(v, MAX, MIN_EXP, MBITS)
        steps = (steps + 8388608.0) - 8388608.0                 # round half to even: steps < 2^23
        return _signed_grid_value(steps, ulp, v, MAX)

    @triton.jit
    def _round_to_grid_stochastic(v, noise, MAX: tl.constexpr, MIN_EXP: tl.constexpr, MBITS: tl.constexpr):
        """float32 -> float32 on the grid, floor(|v| / ulp + noise) ulp: rounded up with probability equal to the
        distance from the lower grid point in ulps (noise uniform in [0, 1)); formats.round_to_format with noise."""
        steps, ulp = _grid_steps(v, MAX, MIN_EXP, MBITS)
        return _signed_grid_value(tl.floor(steps + noise), ulp, v, MAX)

    @triton.jit
    def _e2m1_bytes_f16x2(v):
        """E2M1 bytes (E4M3 encoding, as an int8 tensor) of float32 v that half precision holds exactly, two
        values per instruction (inline PTX, GPUs only: the interpreter runs none): v to f16x2 (exact), saturated at
        +-6 (NaN kept; one min of magnitudes that keeps v's sign), rounded half to even by adding and subtracting
        768 x max(its binade, 1) (whose f16 ulp is 0.5, 1 and 2 in E2M1's three spacings; the sum stays in that
        binade for either sign), v's sign put back (for -0), then NVIDIA's f16x2 -> e4m3x2 cast (exact on the grid).
        The same bits as _round_to_e2m1 and the float8 cast when v = x * 2^k for a bfloat16 or float16 x (MXFP4's
        power-of-two scales): a value too small for f16 rounds to 0 either way (tests/kernels/test_quantize_gluon.py
        checks the steps on every bfloat16). About half the instructions of the float32 steps."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 h0, h1, s0, s1, b0, b1, c6, c1, cp, cn;
            .reg .b16 q0, q1;
            mov.b32 c6, 0x46004600;
            mov.b32 c1, 0x3C003C00;
            mov.b32 cp, 0x62006200;
            mov.b32 cn, 0xE200E200;
            cvt.rn.f16x2.f32 h0, $2, $1;
            cvt.rn.f16x2.f32 h1, $4, $3;
            min.NaN.xorsign.abs.f16x2 s0, h0, c6;
            min.NaN.xorsign.abs.f16x2 s1, h1, c6;
            and.b32 b0, s0, 0x7C007C00;
            and.b32 b1, s1, 0x7C007C00;
            max.f16x2 b0, b0, c1;
            max.f16x2 b1, b1, c1;
            fma.rn.f16x2 h0, b0, cp, s0;
            fma.rn.f16x2 h1, b1, cp, s1;
            fma.rn.f16x2 h0, b0, cn, h0;
            fma.rn.f16x2 h1, b1, cn, h1;
            and.b32 s0, s0, 0x80008000;
            and.b32 s1, s1, 0x80008000;
            or.b32 h0, h0, s0;
            or.b32 h1, h1, s1;
            cvt.rn.satfinite.e4m3x2.f16x2 q0, h0;
            cvt.rn.satfinite.e4m3x2.f16x2 q1, h1;
            mov.b32 $0, {q0, q1};
            }""",
            constraints="=r,r,r,r,r", args=[v], dtype=tl.int8, is_pure=True, pack=4)

    @triton.jit
    def _to_grid(v, MAX: tl.constexpr, MIN_EXP: tl.constexpr, MBITS: tl.constexpr, HW: tl.constexpr):
        """`_round_to_grid`, or with HW (a format the storage dtype has natively: E4M3, E5M2) only the
        saturation, leaving the rounding to the float8 cast of the store (cvt.rn.satfinite: the same RNE)."""
        if HW:
            return tl.minimum(tl.maximum(v, -MAX, propagate_nan=tl.PropagateNan.ALL), MAX,
                              propagate_nan=tl.PropagateNan.ALL)
        return _round_to_grid(v, MAX, MIN_EXP, MBITS)

    @triton.jit
    def _amax_kernel(x_ptr, row_amax_ptr, col_amax_ptr, R, C, stride_r,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STRIP_R: tl.constexpr, STAGES: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr, TENSOR: tl.constexpr):
        """max |x| per row, per column or over the tensor, into int32 views of zeroed float32 buffers: |x| >= 0, so
        the float bits order like the values and one integer atomic max does. A program walks STRIP_R rows of a
        BLOCK_C column strip in BLOCK_R-row tiles (loads pipelined over STAGES), reduces each tile along its rows,
        and keeps an element-wise running maximum that it reduces over the rows once, at the end: a reduction
        across rows per tile cost more than the memory traffic (bench/quantize_passes.py)."""
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        running = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        r0 = tl.program_id(0) * STRIP_R
        for r in tl.range(r0, tl.minimum(r0 + STRIP_R, R), BLOCK_R, num_stages=STAGES):
            rows = r + tl.arange(0, BLOCK_R)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            magnitude = tl.abs(x)
            magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))   # NaN -> Inf: never dropped
            if ROWS:
                tl.atomic_max(row_amax_ptr + rows, tl.max(magnitude, axis=1).to(tl.int32, bitcast=True),
                              mask=rows < R, sem="relaxed")
            running = tl.maximum(running, magnitude)
        if COLS or TENSOR:
            col_max = tl.max(running, axis=0)
            if TENSOR:
                tl.atomic_max(row_amax_ptr, tl.max(col_max, axis=0).to(tl.int32, bitcast=True), sem="relaxed")
            if COLS:
                tl.atomic_max(col_amax_ptr + cols, col_max.to(tl.int32, bitcast=True), mask=cols < C, sem="relaxed")

    @triton.jit
    def _tensor_amax_kernel(x_ptr, amax_ptr, N, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """max |x| over a contiguous x of N elements into the int32 view of a zeroed float32 [1]: program p of P (a
        few per SM) reads blocks p, p + P, p + 2P, ... of BLOCK elements, keeps an element-wise running maximum and
        makes one integer atomic max at the end. The tensorwise pass needs no rows or columns, so its loads are
        whole flat blocks, and a fixed grid has no tail wave."""
        offsets = tl.arange(0, BLOCK)
        running = tl.zeros((BLOCK,), tl.float32)
        for start in tl.range(tl.program_id(0) * BLOCK, N, tl.num_programs(0) * BLOCK, num_stages=STAGES):
            index = start + offsets
            magnitude = tl.abs(tl.load(x_ptr + index, mask=index < N, other=0.0).to(tl.float32))
            running = tl.maximum(running, tl.where(magnitude == magnitude, magnitude, float("inf")))  # NaN -> Inf
        tl.atomic_max(amax_ptr, tl.max(running, axis=0).to(tl.int32, bitcast=True), sem="relaxed")

    @triton.jit
    def _absmax_scales(amax, MAX: tl.constexpr):
        """(scale, inv) = (1 / inv, MAX / amax) or (1, 1) for amax 0; NaN for Inf amax (scales_from_amax)."""
        inv = tl.where(amax > 0, tl.math.div_rn(tl.zeros_like(amax) + MAX, tl.maximum(amax, FLOOR)), 1.0)
        scale = tl.math.div_rn(tl.zeros_like(inv) + 1.0, inv)
        finite = amax < float("inf")
        return tl.where(finite, scale, float("nan")), tl.where(finite, inv, float("nan"))

    @triton.jit
    def _quantize_pair_kernel(x_ptr, row_amax_ptr, col_amax_ptr, q_ptr, qt_ptr, scale_ptr, scale_t_ptr,
                              R, C, stride_r,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TENSOR: tl.constexpr,
                              TRANSPOSE: tl.constexpr,
                              MAX: tl.constexpr, MIN_EXP: tl.constexpr, MBITS: tl.constexpr,
                              MAX_T: tl.constexpr, MIN_EXP_T: tl.constexpr, MBITS_T: tl.constexpr,
                              HW: tl.constexpr, HW_T: tl.constexpr):
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if TENSOR:
            scale, inv = _absmax_scales(tl.load(row_amax_ptr), MAX)
            if (pid_r == 0) & (pid_c == 0):
                tl.store(scale_ptr, scale)
            q = _to_grid(x * inv, MAX, MIN_EXP, MBITS, HW)
        else:
            scale, inv = _absmax_scales(tl.load(row_amax_ptr + rows, mask=rows < R, other=0.0), MAX)
            if pid_c == 0:
                tl.store(scale_ptr + rows, scale, mask=rows < R)
            q = _to_grid(x * inv[:, None], MAX, MIN_EXP, MBITS, HW)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        if TRANSPOSE:
            if TENSOR:
                scale_t, inv_t = _absmax_scales(tl.load(row_amax_ptr), MAX_T)
                if (pid_r == 0) & (pid_c == 0):
                    tl.store(scale_t_ptr, scale_t)
                qt = _to_grid(x * inv_t, MAX_T, MIN_EXP_T, MBITS_T, HW_T)
            else:
                scale_t, inv_t = _absmax_scales(tl.load(col_amax_ptr + cols, mask=cols < C, other=0.0), MAX_T)
                if pid_r == 0:
                    tl.store(scale_t_ptr + cols, scale_t, mask=cols < C)
                qt = _to_grid(x * inv_t[None, :], MAX_T, MIN_EXP_T, MBITS_T, HW_T)
            tl.store(qt_ptr + cols[None, :] * R + rows[:, None], qt.to(qt_ptr.dtype.element_ty), mask=mask)


AMAX_TILE = (32, 128, 512, 3)   # (tile rows, strip columns, strip rows, pipeline stages) of the amax pass
TENSOR_AMAX = (4096, 4, 4, 3)   # flat tensor amax: (block elements, warps, programs per SM, stages); bench/amax_tensor.py
PAIR_TILE = (64, 128)           # (rows, cols) per program of the quantize pass (bench/quantize_passes.py, H200)
PAIR_WARPS = 4
HARDWARE_CAST = True    # E4M3/E5M2: round by the float8 cast itself (False: lowbit's integer rounding; A/B in bench)


def hardware_cast(fmt, device: torch.device) -> bool:
    """Whether the store's float8 cast rounds `fmt` itself: a format its storage dtype holds natively, on a GPU
    (cvt.rn.satfinite; bit-exact against the reference there, bench/quantize.py). Triton's interpreter casts
    differently (it failed the bitwise test on CPU), so the CPU tests run the integer rounding."""
    return HARDWARE_CAST and fmt.name in ("e4m3", "e5m2") and device.type == "cuda"


@functools.cache
def _multiprocessors(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (4 for Triton's interpreter on the CPU: several programs, as on a GPU)."""
    return _multiprocessors(str(device)) if device.type == "cuda" else 4


def launch_amax(x: torch.Tensor, row_amax: torch.Tensor, col_amax: torch.Tensor, per_row: bool, per_col: bool):
    """max |x| into zeroed float32 buffers: per row [R] or over the tensor [1], and per column [C] if per_col."""
    R, C = x.shape
    if not per_row and not per_col and x.is_contiguous():
        block, warps, per_sm, stages = TENSOR_AMAX
        programs = max(1, min(triton.cdiv(x.numel(), block), per_sm * multiprocessors(x.device)))
        _tensor_amax_kernel[(programs,)](x, row_amax.view(torch.int32), x.numel(), BLOCK=block, STAGES=stages,
                                         num_warps=warps)
        return
    block_r, block_c, strip_r, stages = AMAX_TILE
    grid = (triton.cdiv(R, strip_r), triton.cdiv(C, block_c))
    _amax_kernel[grid](x, row_amax.view(torch.int32), col_amax.view(torch.int32), R, C, x.stride(0),
                       BLOCK_R=block_r, BLOCK_C=block_c, STRIP_R=strip_r, STAGES=stages,
                       ROWS=per_row, COLS=per_col, TENSOR=not per_row, num_warps=4)


def amax_buffer(x: torch.Tensor, per_row: bool, per_col: bool) -> torch.Tensor:
    """max |x| in one zeroed float32 buffer (one fill): per row [R] or over the tensor [1], then per column [C]
    (or one unused entry); `split_amax` views its two parts."""
    R, C = x.shape
    amax = torch.zeros((R if per_row else 1) + (C if per_col else 1), device=x.device, dtype=torch.float32)
    launch_amax(x, *split_amax(amax, x, per_row), per_row, per_col)
    return amax


def split_amax(amax: torch.Tensor, x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.shape[0] if per_row else 1
    return amax[:rows], amax[rows:]


def _launch_amax(x: torch.Tensor, per_row: bool, per_col: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return split_amax(amax_buffer(x, per_row, per_col), x, per_row)


def _launch_pair(x, row_amax, col_amax, code: int, code_t: int, transpose: bool, tensor: bool):
    R, C = x.shape
    fmt, fmt_t = FORMAT_OF_CODE[code], FORMAT_OF_CODE[code_t]
    q = torch.empty((R, C), device=x.device, dtype=fmt.storage)
    qt = torch.empty((C, R) if transpose else (0, 0), device=x.device, dtype=fmt_t.storage)
    # separate allocations: cuBLASLt refuses a scale pointer that is not 16-byte aligned (a view into one
    # shared buffer at offset 4 bytes made torch._scaled_mm fail with CUBLAS_STATUS_NOT_SUPPORTED on H100)
    scale = torch.empty(1 if tensor else R, device=x.device, dtype=torch.float32)
    scale_t = torch.empty(0 if not transpose else 1 if tensor else C, device=x.device, dtype=torch.float32)
    block_r, block_c = PAIR_TILE
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    _quantize_pair_kernel[grid](x, row_amax, col_amax, q, qt, scale, scale_t, R, C, x.stride(0),
                                BLOCK_R=block_r, BLOCK_C=block_c, TENSOR=tensor, TRANSPOSE=transpose,
                                MAX=fmt.max, MIN_EXP=fmt.min_normal_exponent, MBITS=fmt.mantissa_bits,
                                MAX_T=fmt_t.max, MIN_EXP_T=fmt_t.min_normal_exponent, MBITS_T=fmt_t.mantissa_bits,
                                HW=hardware_cast(fmt, x.device), HW_T=hardware_cast(fmt_t, x.device),
                                num_warps=PAIR_WARPS)
    return q, qt, scale, scale_t


@torch.library.custom_op("lowbit::quantize_amax", mutates_args=())
def quantize_amax(x: torch.Tensor, per_row: bool, per_col: bool) -> torch.Tensor:
    """amax of |x| [R, C] as `amax_buffer` lays it out (split_amax views its parts). NaN reads as Inf. One output:
    an op's outputs must not alias, and returning the two parts cost two device copies per call (six per fp8
    tensorwise linear step, H100 profile 2026-12-06)."""
    return amax_buffer(x, per_row, per_col)


@quantize_amax.register_fake
def _(x, per_row, per_col):
    return x.new_empty(((x.shape[0] if per_row else 1) + (x.shape[1] if per_col else 1),), dtype=torch.float32)


@torch.library.custom_op("lowbit::tensor_amax", mutates_args=())
def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over x [R, C], float32 [1] (NaN reads as Inf): NVFP4's tensor statistic. An op, so that torch.compile
    never traces the amax kernel's integer view of its buffer (Inductor: make_reindexer NYI on DtypeView)."""
    amax = torch.zeros(1, device=x.device, dtype=torch.float32)
    launch_amax(x, amax, amax, per_row=False, per_col=False)
    return amax


@tensor_amax.register_fake
def _(x):
    return x.new_empty((1,), dtype=torch.float32)


@torch.library.custom_op("lowbit::quantize_pair", mutates_args=())
def quantize_pair_op(x: torch.Tensor, row_amax: torch.Tensor, col_amax: torch.Tensor, code: int, code_t: int,
                     transpose: bool, tensor: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, C] -> (x_q [R, C], x^T_q [C, R] or empty, scale, scale of x^T), absmax scales from the amaxes."""
    q, qt, scale, scale_t = _launch_pair(x, row_amax, col_amax, code, code_t, transpose, tensor)
    return q, qt, scale, scale_t


@quantize_pair_op.register_fake
def _(x, row_amax, col_amax, code, code_t, transpose, tensor):
    R, C = x.shape
    return x.new_empty((R, C), dtype=FORMAT_OF_CODE[code].storage), \
        x.new_empty((C, R) if transpose else (0, 0), dtype=FORMAT_OF_CODE[code_t].storage), \
        x.new_empty((1 if tensor else R,), dtype=torch.float32), \
        x.new_empty((0 if not transpose else 1 if tensor else C,), dtype=torch.float32)


def quantize_pair_triton(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None,
                         amax: torch.Tensor | None = None) -> tuple[QTensor, QTensor | None]:
    """Triton version of scaling.quantize_reference for x and (optionally) x^T; tensorwise/rowwise absmax.
    amax: a tensorwise amax given (delayed scaling: already reduced over shards), which skips the amax pass.

    Eager calls launch the kernels directly (a custom op's Python dispatch costs more than a launch);
    under torch.compile the same work goes through the custom ops, which the compiler sees as opaque ops.
    """
    x = x.contiguous()
    R, C = x.shape
    transpose = quantizer_t is not None
    if transpose and quantizer_t.tensorwise != quantizer.tensorwise:
        raise ValueError("quantize_pair_triton needs both operands tensorwise or both rowwise")
    tensor = quantizer.tensorwise
    if amax is not None and not tensor:
        raise ValueError("quantize_pair_triton: a given amax needs tensorwise quantizers")
    per_row, per_col = not tensor, transpose and not tensor
    code, code_t = FORMAT_CODES[quantizer.fmt.name], FORMAT_CODES[(quantizer_t or quantizer).fmt.name]
    compiling = torch.compiler.is_compiling()
    if amax is not None:
        row_amax = col_amax = amax.reshape(1).to(torch.float32)
    else:
        amax_op = torch.ops.lowbit.quantize_amax if compiling else amax_buffer
        row_amax, col_amax = split_amax(amax_op(x, per_row, per_col), x, per_row)
        # Tensor parallelism: the max over the shards where a scale spans the sharded axis (a tensorwise amax,
        # shared by x and x^T, belongs to `quantizer`: both quantizers of one tensor carry the same group).
        row_amax = reduce_amax(row_amax, quantizer)
        if per_col:
            col_amax = reduce_amax(col_amax, quantizer_t)
    if compiling:
        q, qt, scale, scale_t = torch.ops.lowbit.quantize_pair(x, row_amax, col_amax, code, code_t, transpose, tensor)
    else:
        q, qt, scale, scale_t = _launch_pair(x, row_amax, col_amax, code, code_t, transpose, tensor)
    check_finite(scale, "operand")
    if quantizer.tensorwise:
        scale, scale_t = scale.reshape(()), scale_t.reshape(()) if transpose else None
    else:
        scale, scale_t = scale.reshape(-1, 1), scale_t.reshape(-1, 1) if transpose else None
    first = QTensor(q, scale, quantizer)
    return first, (QTensor(qt, scale_t, quantizer_t) if transpose else None)
