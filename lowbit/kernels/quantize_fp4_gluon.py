"""FP4 block pairs (NVFP4 1 x 16, MXFP4 1 x 32: x_q with blocks along x's rows, x^T_q with blocks down its columns)
in Gluon, Triton's explicit-layout language, with the numerics of quantize_blocks_triton (its scale and E2M1
functions, called here: the same bits) and each side's work laid out so that no value crosses a thread:

- x's side: the tile is loaded as [rows, blocks, B] with a thread holding one whole block (B contiguous values:
  16-byte loads), so the block's amax is a reduction inside the thread and its B bytes of x_q one or two 16-byte
  stores;
- x^T's side: the same tile (B rows) is loaded again, a thread holding V whole columns of it (B rows x V values),
  so each column's block amax is again inside the thread, and the thread's B bytes of each x^T_q row leave as one or
  two 16-byte stores (the load-time layout and the store-time layout differ only in register order).

The second load of the tile comes from the L1/L2 caches, not from memory (RELOAD; or, switched off, the tile
moves to x^T's layout through shared memory in bf16). The Triton kernel instead reduces one side across threads
and moves one-byte values through shared memory for the transposed store (bank conflicts; Nsight Compute, H200
2026-12-02). MXFP4 of a bf16/fp16 x is rounded two values per instruction in half precision (_e2m1_bytes_f16x2:
exact there, the same bits). Static counts (bench/ptx_mix.py --gluon, sm_90): 18.8-21.6 SASS instructions per
element for an MXFP4 pair (default tile) against the Triton kernel's 31.1, 31.5-32.2 for NVFP4 against 36.2.

Gluon has no interpreter: on CPU the kernel is compiled for sm_90 and the packed rounding's steps are checked on
every bfloat16 (tests/kernels/test_quantize_gluon.py); on a GPU its outputs are compared bit for bit with the
PyTorch reference and the Triton kernel. Not yet run on a GPU (none lent on 2026-12-05), so
quantize_blocks_triton.FP4_PAIR_KERNEL keeps the Triton kernel by default (LOWBIT_FP4_PAIR_KERNEL=gluon selects
this one; `bash bench/device_pending.sh fp4_pair` tests and times it).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from lowbit.kernels import quantize_blocks_triton as triton_blocks
from lowbit.kernels import quantize_triton as triton_rows
from lowbit.precision.scaling import QTensor, Quantizer, check_finite, reduce_amax

# the Triton kernel's functions, compiled as Gluon functions: one definition of the numerics
_round_to_e2m1 = gluon.jit(triton_rows._round_to_e2m1.fn)
_e2m1_bytes_f16x2 = gluon.jit(triton_rows._e2m1_bytes_f16x2.fn)
_block_scales = gluon.jit(triton_blocks._block_scales.fn)
_max_keep_nan = gluon.jit(triton_blocks._max_keep_nan.fn)
_nvfp4_global = gluon.jit(triton_blocks._nvfp4_global.fn)

RULES = {"nvfp4": 1, "pow2": 2}
# (rows = the block, columns, warps, columns per thread on x^T's side) per block size; bench/quantize_fp4.py times
# others (to be chosen on a GPU)
TILES = {16: (16, 128, 1, 4), 32: (32, 128, 2, 2)}
PACKED = os.environ.get("LOWBIT_FP4_PACKED", "1") == "1"     # see packed_rounding
RELOAD = True       # x^T's side loads the tile again (cache hits); False: a layout conversion through shared memory


@gluon.jit
def _to_e2m1(v, out_dtype: gl.constexpr, PACKED: gl.constexpr):
    """v rounded onto E2M1 and cast to out_dtype (float8 storage): by _e2m1_bytes_f16x2 (PACKED) or the float32
    steps of the Triton kernel."""
    if PACKED:
        return _e2m1_bytes_f16x2(v).to(out_dtype, bitcast=True)
    return _round_to_e2m1(v).to(out_dtype)


@gluon.jit
def fp4_pair_kernel(x_ptr, q_ptr, qt_ptr, scale_ptr, scale_t_ptr, tensor_amax_ptr, gain_ptr, R, C, stride_r,
                    B: gl.constexpr, BK: gl.constexpr, V: gl.constexpr, RULE: gl.constexpr,
                    PACKED: gl.constexpr, RELOAD: gl.constexpr):
    """One [B, BK] tile of x [R, C] per program: x_q [R, C] and its scales [R, C / B]; x^T_q [C, R] and its
    scales [C, R / B]. R and C are multiples of B (the wrapper checks). The layouts span the launch's warps."""
    WARPS: gl.constexpr = gl.num_warps()
    TPR: gl.constexpr = 32 // (BK // B)                     # threads per row group on x's side
    x_layout: gl.constexpr = gl.BlockedLayout([1, 1, B], [TPR, BK // B, 1], [WARPS, 1, 1], [2, 1, 0])
    t_load: gl.constexpr = gl.BlockedLayout([B, V], [1, 32], [1, WARPS], [1, 0])
    t_store: gl.constexpr = gl.BlockedLayout([B, V], [1, 32], [1, WARPS], [0, 1])
    pid_r = gl.program_id(0)
    pid_c = gl.program_id(1)
    r0 = pid_r * B
    c0 = pid_c * BK

    global_inv = 1.0
    global_recip = 1.0
    if RULE == 1:       # NVFP4: the FP32 tensor scale from max |x| (NaN as Inf); the first program stores it
        global_inv, global_recip = _nvfp4_global(gl.load(tensor_amax_ptr), 6.0)
        if pid_r + pid_c == 0:
            gl.store(gain_ptr, global_inv)

    # x's side: [B rows, BK / B blocks, B values], one block per thread
    rows = r0 + gl.arange(0, B, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
    blocks = gl.arange(0, BK // B, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
    values = gl.arange(0, B, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
    rows2 = gl.expand_dims(rows, 1)                                         # [B, 1]
    block_cols = pid_c * (BK // B) + gl.expand_dims(blocks, 0)              # [1, BK / B]
    rows3 = gl.expand_dims(rows2, 2)
    cols3 = gl.expand_dims(block_cols, 2) * B + gl.expand_dims(gl.expand_dims(values, 0), 1)
    mask3 = (rows3 < R) & (cols3 < C)
    x_raw = gl.load(x_ptr + rows3 * stride_r + cols3, mask=mask3, other=0.0)
    x = x_raw.to(gl.float32)
    amax = gl.reduce(gl.abs(x), 2, _max_keep_nan)                           # NaN stays NaN: its block's scale too
    scale, inv = _block_scales(amax, global_inv, global_recip, RULE, 6.0, True)
    gl.store(scale_ptr + rows2 * (C // B) + block_cols, scale, mask=(rows2 < R) & (block_cols < C // B))
    q = _to_e2m1(x * gl.expand_dims(inv, 2), q_ptr.dtype.element_ty, PACKED)
    gl.store(q_ptr + rows3 * C + cols3, q, mask=mask3)

    # x^T's side: the same B rows again, V whole columns per thread
    t_rows = r0 + gl.arange(0, B, layout=gl.SliceLayout(1, t_load))
    t_cols = c0 + gl.arange(0, BK, layout=gl.SliceLayout(0, t_load))
    t_mask = (gl.expand_dims(t_rows, 1) < R) & (gl.expand_dims(t_cols, 0) < C)
    if RELOAD:
        xt = gl.load(x_ptr + gl.expand_dims(t_rows, 1) * stride_r + gl.expand_dims(t_cols, 0), mask=t_mask,
                     other=0.0).to(gl.float32)
    else:           # through shared memory instead (the layout conversion Triton's compiler picks)
        xt = gl.convert_layout(gl.reshape(x_raw, [B, BK]), t_load).to(gl.float32)
    amax_t = gl.reduce(gl.abs(xt), 0, _max_keep_nan)                        # [BK]: one block of x^T per column
    scale_t, inv_t = _block_scales(amax_t, global_inv, global_recip, RULE, 6.0, True)
    gl.store(scale_t_ptr + t_cols * (R // B) + pid_r, scale_t, mask=t_cols < C)
    qt = _to_e2m1(xt * gl.expand_dims(inv_t, 0), qt_ptr.dtype.element_ty, PACKED)
    qt = gl.convert_layout(qt, t_store)              # the same threads and values: registers reordered only
    s_rows = r0 + gl.arange(0, B, layout=gl.SliceLayout(1, t_store))
    s_cols = c0 + gl.arange(0, BK, layout=gl.SliceLayout(0, t_store))
    gl.store(qt_ptr + gl.expand_dims(s_cols, 0) * R + gl.expand_dims(s_rows, 1), qt,
             mask=(gl.expand_dims(s_rows, 1) < R) & (gl.expand_dims(s_cols, 0) < C))


def supports(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None) -> bool:
    """An FP4 1 x B pair (NVFP4 or MXFP4, the same quantizer on both sides, deterministic rounding) of a bf16/fp16/
    fp32 x on a Hopper-or-newer GPU."""
    if quantizer_t is None or not x.is_cuda or x.dim() != 2:
        return False
    same = (quantizer.fmt is quantizer_t.fmt and quantizer.scale_rule == quantizer_t.scale_rule
            and quantizer.block_rows == quantizer_t.block_rows == 1
            and quantizer.block_cols == quantizer_t.block_cols)
    return (same and quantizer.fmt.mantissa_bits == 1 and quantizer.fmt.max == 6.0
            and quantizer.scale_rule in RULES and quantizer.block_cols in TILES
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and _capability(x.device) >= 9)


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def packed_rounding(x: torch.Tensor, quantizer: Quantizer) -> bool:
    """Whether E2M1 is rounded two values per instruction in half precision (_e2m1_bytes_f16x2): exact for
    MXFP4's power-of-two scales of a bfloat16 or float16 x only (PACKED switches it off for all)."""
    return PACKED and triton_blocks.f16x2_rounds_exactly(x, quantizer)


def quantize_fp4_pair_gluon(x: torch.Tensor, quantizer: Quantizer, tensor_amax: torch.Tensor | None = None,
                            tile: tuple[int, int, int, int] | None = None, packed: bool | None = None,
                            reload: bool | None = None,
                            quantizer_t: Quantizer | None = None) -> tuple[QTensor, QTensor]:
    """x [R, C] -> (x_q, x^T_q) as quantize_blocks_triton(x, quantizer, quantizer_t) for an FP4 1 x B quantizer
    (bit for bit; see the module's docstring; quantizer_t: x^T's, the same format and blocks, default quantizer).
    tensor_amax: NVFP4's max |x| if known (else one pass over x).
    tile: (B, columns, warps, columns per thread on x^T's side) in place of TILES[B]. packed: E2M1 rounded in
    f16x2 (True; only where exact, see packed_rounding) or in float32 steps (False); None: packed_rounding."""
    x = x.contiguous()
    R, C = x.shape
    B = quantizer.block_cols
    quantizer_t = quantizer if quantizer_t is None else quantizer_t
    if not supports(x, quantizer, quantizer_t):
        raise ValueError(f"quantize_fp4_pair_gluon: not an FP4 1 x 16/32 pair on a Hopper GPU: x {x.dtype} on "
                         f"{x.device}, {quantizer} / {quantizer_t}; use quantize_blocks_triton")
    quantizer.check_columns(C, "operand")
    quantizer_t.check_columns(R, "operand^T")
    rows, BK, warps, V = tile or TILES[B]
    if packed and not triton_blocks.f16x2_rounds_exactly(x, quantizer):
        raise ValueError(f"quantize_fp4_pair_gluon: packed=True rounds exactly only MXFP4 (pow2 scales) of a bf16 or "
                         f"fp16 x, got {quantizer.scale_rule} scales of {x.dtype}; pass packed=None")
    if rows != B or BK % (32 * V * warps) or BK % B or 32 % (BK // B):
        raise ValueError(f"quantize_fp4_pair_gluon: tile {(rows, BK, warps, V)} does not fit {B}-element blocks; "
                         f"rows must be {B} and columns a multiple of 32 x {V} x {warps} holding at most 32 blocks")
    gain = None
    if quantizer.scale_rule == "nvfp4":
        if tensor_amax is None:
            tensor_amax = triton_blocks.tensor_amax_op(x)
        tensor_amax = reduce_amax(tensor_amax, quantizer)
        check_finite(tensor_amax, "operand")
        gain = torch.empty(1, device=x.device, dtype=torch.float32)
    storage = quantizer.fmt.storage
    q = torch.empty((R, C), device=x.device, dtype=storage)
    qt = torch.empty((C, R), device=x.device, dtype=storage)
    scale = torch.empty((R, C // B), device=x.device, dtype=torch.float32)
    scale_t = torch.empty((C, R // B), device=x.device, dtype=torch.float32)
    packed = packed_rounding(x, quantizer) if packed is None else packed
    fp4_pair_kernel[(R // B, triton.cdiv(C, BK))](
        x, q, qt, scale, scale_t, tensor_amax if gain is not None else scale, gain if gain is not None else scale,
        R, C, x.stride(0), B=B, BK=BK, V=V, RULE=RULES[quantizer.scale_rule], PACKED=packed,
        RELOAD=RELOAD if reload is None else reload, num_warps=warps)
    check_finite(scale, "operand")
    return QTensor(q, scale, quantizer, gain), QTensor(qt, scale_t, quantizer_t, gain)


def sm90_binary(block: int = 32, rule: str = "pow2", tile: tuple[int, int, int, int] | None = None,
                packed: bool = False, reload: bool = True, dtype: str = "bf16") -> dict:
    """The kernel compiled for sm_90 without a GPU (x of `dtype`: bf16, fp16 or fp32): lowbit.kernels.sass.dump's
    {"sass", "registers", "spill_bytes", "shared_bytes"}. For the CPU tests and bench/ptx_mix.py --gluon."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from lowbit.kernels import sass as machine_code

    rows, BK, warps, V = tile or TILES[block]
    names = fp4_pair_kernel.arg_names
    signature = {name: "i32" for name in names}
    signature.update(x_ptr="*" + dtype, q_ptr="*fp8e4nv", qt_ptr="*fp8e4nv", scale_ptr="*fp32", scale_t_ptr="*fp32",
                     tensor_amax_ptr="*fp32", gain_ptr="*fp32")
    constants = dict(B=block, BK=BK, V=V, RULE=RULES[rule], PACKED=packed, RELOAD=reload)
    signature.update({name: "constexpr" for name in constants})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in
             ("x_ptr", "q_ptr", "qt_ptr", "scale_ptr", "scale_t_ptr", "R", "C", "stride_r")}
    source = GluonASTSource(fn=fp4_pair_kernel, signature=signature, attrs=attrs,
                            constexprs={(names.index(name),): value for name, value in constants.items()})
    return machine_code.dump(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)))
