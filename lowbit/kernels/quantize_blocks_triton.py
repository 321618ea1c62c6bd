"""Fused Triton quantize kernel for block scales (fp8 1x128 / 128x128, NVFP4 1x16, MXFP4 1x32).

One read of x [R, C] per launch: each program loads a tile that holds whole scale blocks of its outputs, takes
each block's amax, computes the block scale (absmax | nvfp4 | pow2 rule of lowbit.precision.scaling,
same fp32 operations, IEEE division via div_rn; on GPUs NVFP4's E4M3 block scale is rounded by the float8 cast and
inverted by rcp.rn, the same bits in fewer instructions), rounds onto the element grid, and writes x_q [R, C]
(blocks along C), x^T_q [C, R] (blocks along R, i.e. the transposed operand of the backward GEMM)
and both scale tensors. NVFP4 needs the tensor amax first: one extra read (`_amax_kernel`). Pairs of 1 x b blocks,
b >= 32, run as two launches (SPLIT_PAIRS), x's side and x^T's side, each on a tile holding whole blocks of one side
only: 1.3x faster for 1 x 128 on an H200 than one 128 x 128 tile holding both (0.37 of copy bandwidth).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from lowbit.kernels.quantize_triton import AVAILABLE, FORMAT_CODES, FORMAT_OF_CODE, hardware_cast
from lowbit.precision.formats import E4M3
from lowbit.precision.scaling import QTensor, Quantizer, check_finite, reduce_amax

RULES = {"absmax": 0, "nvfp4": 1, "pow2": 2}

if AVAILABLE:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
    from triton.tools.tensor_descriptor import TensorDescriptor

    from lowbit.kernels.quantize_triton import (FLOOR, _e2m1_bytes_f16x2, _round_to_grid, _round_to_grid_stochastic,
                                                _to_grid, tensor_amax as tensor_amax_op)

    @triton.jit
    def _nvfp4_global(tensor_amax, MAX: tl.constexpr):
        """(G, 1 / G), NVFP4's FP32 tensor scale 448 * MAX / tensor amax (1 for an all-zero tensor, NaN for a
        non-finite one): scaling.nvfp4_global_inverse's fp32 operations (IEEE division), once per program on the
        scalar tensor amax instead of by ~10 one-element PyTorch launches per operand. The numerators are made as
        `0 * value + constant` (exact for a finite value; a non-finite amax ends NaN either way), not by zeros_like,
        which Gluon cannot call: quantize_fp4_gluon compiles this same function."""
        safe = tl.maximum(tensor_amax, FLOOR)
        global_inv = tl.where(tensor_amax > 0, tl.math.div_rn(safe * 0.0 + 448.0 * MAX, safe), 1.0)
        global_inv = tl.where(tensor_amax < float("inf"), global_inv, float("nan"))
        return global_inv, tl.math.div_rn(global_inv * 0.0 + 1.0, global_inv)

    @triton.jit
    def _block_scales(amax, global_inv, global_recip, RULE: tl.constexpr, MAX: tl.constexpr,
                      GPU_MATH: tl.constexpr):
        """(scale, inv) of each block from its amax (fp32), as scaling.scales_from_amax. NVFP4 (RULE 1) takes the
        tensor scale G and 1 / G (_nvfp4_global). GPU_MATH: NVIDIA's float8 cast and reciprocal for the same
        results in fewer instructions (Triton's interpreter has neither: it runs the integer rounding and division)."""
        finite = amax < float("inf")
        if RULE == 0:
            inv = tl.where(amax > 0, tl.math.div_rn(tl.zeros_like(amax) + MAX, tl.maximum(amax, FLOOR)), 1.0)
            scale = tl.math.div_rn(tl.zeros_like(amax) + 1.0, inv)
        elif RULE == 1:
            block_scale = amax * (global_inv * (1.0 / MAX))                 # g / 6: once per tensor
            if GPU_MATH:    # E4M3 by the float8 cast (cvt.rn.satfinite: RNE, saturating at 448, as _round_to_grid)
                block_scale = block_scale.to(tl.float8e4nv).to(tl.float32)
            else:
                block_scale = _round_to_grid(block_scale, 448.0, -6, 3)
            scale = block_scale * global_recip
            if GPU_MATH:    # rcp.rn: the same correctly rounded 1 / scale as the division, 6% fewer SASS operations
                inv = tl.where(scale > 0, libdevice.rcp_rn(scale), 0.0)
            else:
                inv = tl.where(scale > 0, tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale), 0.0)
            scale = tl.where(scale > 0, scale, 1.0)
            finite = tl.where(global_inv == global_inv, finite, False)
        else:
            exponent = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 2
            exponent = tl.where(amax > 0, exponent, 0)
            exponent = tl.minimum(tl.maximum(exponent, -126), 126)
            scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
            inv = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(finite, scale, float("nan"))
        inv = tl.where(finite, inv, float("nan"))
        return scale, inv

    @triton.jit
    def _max_keep_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _block_amax(magnitude, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """amax of each BR x BC block of a [BLOCK_R, BLOCK_C] tile -> [BLOCK_R // BR, BLOCK_C // BC]; a NaN makes
        its block's amax NaN, which gives the block NaN scales as an Inf would (one NaN-propagating max per element:
        turning NaN into Inf first cost two more integer-pipe operations per element). The common shapes reduce
        without 4-D reshapes (fewer layout conversions on the GPU)."""
        if (BR == BLOCK_R) and (BC == BLOCK_C):
            amax = tl.reduce(tl.reduce(magnitude, 1, _max_keep_nan, keep_dims=True), 0, _max_keep_nan, keep_dims=True)
        elif BR == 1:
            if BC == BLOCK_C:
                amax = tl.reduce(magnitude, 1, _max_keep_nan, keep_dims=True)
            else:
                amax = tl.reduce(tl.reshape(magnitude, (BLOCK_R, BLOCK_C // BC, BC)), 2, _max_keep_nan)
        elif BC == 1:
            if BR == BLOCK_R:
                amax = tl.reduce(magnitude, 0, _max_keep_nan, keep_dims=True)
            else:
                amax = tl.reduce(tl.reshape(magnitude, (BLOCK_R // BR, BR, BLOCK_C)), 1, _max_keep_nan)
        else:
            amax = tl.reduce(tl.reduce(tl.reshape(magnitude, (BLOCK_R // BR, BR, BLOCK_C // BC, BC)), 3, _max_keep_nan),
                             1, _max_keep_nan)
        return amax

    @triton.jit
    def _block_expand(value, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """[BLOCK_R // BR, BLOCK_C // BC] per-block values -> [BLOCK_R, BLOCK_C] per element."""
        if ((BR == BLOCK_R) or (BR == 1)) and ((BC == BLOCK_C) or (BC == 1)):
            full = tl.broadcast_to(value, (BLOCK_R, BLOCK_C))
        elif BR == 1:
            full = tl.reshape(tl.broadcast_to(value[:, :, None], (BLOCK_R, BLOCK_C // BC, BC)), (BLOCK_R, BLOCK_C))
        elif BC == 1:
            full = tl.reshape(tl.broadcast_to(value[:, None, :], (BLOCK_R // BR, BR, BLOCK_C)), (BLOCK_R, BLOCK_C))
        else:
            full = tl.reshape(tl.broadcast_to(value[:, None, :, None], (BLOCK_R // BR, BR, BLOCK_C // BC, BC)),
                              (BLOCK_R, BLOCK_C))
        return full

    @triton.jit
    def _uniform_tile(seed, rows, pid_c, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Uniform [0, 1) float32 noise for a [BLOCK_R, BLOCK_C] tile of x (C % 4 == 0), four values per Philox call:
        elements (r, 4j) .. (r, 4j + 3) take the four outputs of Philox(seed, r * C / 4 + j). tl.rand makes one
        call per element and keeps one output of four (with this commit's E2M1 and amax changes, the NVFP4 llama_1b
        step's block quantize kernels went from 331 to 179 ms, H200 2026-12-02)."""
        quads = pid_c * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4)
        a, b, c, d = tl.rand4x(seed, rows[:, None] * (C // 4) + quads[None, :])
        return tl.reshape(tl.join(tl.join(a, b), tl.join(c, d)), (BLOCK_R, BLOCK_C))

    @triton.jit
    def _load_tile(x_ptr, pid_r, pid_c, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """x's [BLOCK_R, BLOCK_C] tile (pid_r, pid_c), zero outside x, in x's dtype."""
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        return tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _quantize_blocks_kernel(x_ptr, q_ptr, qt_ptr, qt_desc, scale_ptr, scale_t_ptr, tensor_amax_ptr, gain_ptr,
                                noise_ptr, R, C, stride_r,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                                BR: tl.constexpr, BC: tl.constexpr, BR_T: tl.constexpr, BC_T: tl.constexpr,
                                TRANSPOSE: tl.constexpr, RULE: tl.constexpr, MAX: tl.constexpr,
                                MIN_EXP: tl.constexpr, MBITS: tl.constexpr, HW: tl.constexpr,
                                SAME_T: tl.constexpr, X_SIDE: tl.constexpr, NOISE: tl.constexpr,
                                TMA_T: tl.constexpr, GPU_MATH: tl.constexpr, PACKED: tl.constexpr,
                                NARROW_Q: tl.constexpr = False):
        """One tile per program, the grid (row tiles, column tiles)."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        x = _load_tile(x_ptr, pid_r, pid_c, R, C, stride_r, BLOCK_R, BLOCK_C)
        _quantize_tile(x, pid_r, pid_c, q_ptr, qt_ptr, qt_desc, scale_ptr, scale_t_ptr, tensor_amax_ptr, gain_ptr,
                       noise_ptr, R, C, BLOCK_R, BLOCK_C, BR, BC, BR_T, BC_T, TRANSPOSE, RULE, MAX, MIN_EXP, MBITS,
                       HW, SAME_T, X_SIDE, NOISE, TMA_T, GPU_MATH, PACKED, NARROW_Q)

    @triton.jit
    def _quantize_pair_persistent_kernel(x_ptr, q_ptr, qt_ptr, qt_desc, scale_ptr, scale_t_ptr, tensor_amax_ptr,
                                         gain_ptr, R, C, stride_r,
                                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BC: tl.constexpr,
                                         RULE: tl.constexpr, MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                                         MBITS: tl.constexpr, HW: tl.constexpr, GPU_MATH: tl.constexpr,
                                         PACKED: tl.constexpr, PREFETCH: tl.constexpr):
        """A 1 x BC pair (x and x^T, round to nearest) by a fixed grid of programs, each walking the tiles
        pid, pid + programs, ... (row tiles fastest, as the one-tile grid runs). PREFETCH 1: the next tile's load is
        issued into registers before this tile's arithmetic and stores, so each program keeps one load in flight
        while it works; PREFETCH = k > 1: Triton's software pipeliner loads k - 1 tiles ahead into shared memory
        (cp.async); 0: each tile loaded when its turn comes."""
        n_r = tl.cdiv(R, BLOCK_R)
        n_tiles = n_r * tl.cdiv(C, BLOCK_C)
        step = tl.num_programs(0)
        if PREFETCH == 1:
            x_next = _load_tile(x_ptr, tl.program_id(0) % n_r, tl.program_id(0) // n_r, R, C, stride_r, BLOCK_R,
                                BLOCK_C)
        for tile in tl.range(tl.program_id(0), n_tiles, step, num_stages=PREFETCH if PREFETCH > 1 else 1):
            if PREFETCH == 1:    # past the last tile the column test masks every element: no memory is touched
                x = x_next
                x_next = _load_tile(x_ptr, (tile + step) % n_r, (tile + step) // n_r, R, C, stride_r, BLOCK_R,
                                    BLOCK_C)
            else:
                x = _load_tile(x_ptr, tile % n_r, tile // n_r, R, C, stride_r, BLOCK_R, BLOCK_C)
            _quantize_tile(x, tile % n_r, tile // n_r, q_ptr, qt_ptr, qt_desc, scale_ptr, scale_t_ptr,
                           tensor_amax_ptr, gain_ptr, x_ptr, R, C, BLOCK_R, BLOCK_C, 1, BC, 1, BC, True, RULE, MAX,
                           MIN_EXP, MBITS, HW, False, True, 0, False, GPU_MATH, PACKED)

    @triton.jit
    def _quantize_tile(x, pid_r, pid_c, q_ptr, qt_ptr, qt_desc, scale_ptr, scale_t_ptr, tensor_amax_ptr, gain_ptr,
                       noise_ptr, R, C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr, BR_T: tl.constexpr, BC_T: tl.constexpr,
                       TRANSPOSE: tl.constexpr, RULE: tl.constexpr, MAX: tl.constexpr,
                       MIN_EXP: tl.constexpr, MBITS: tl.constexpr, HW: tl.constexpr,
                       SAME_T: tl.constexpr, X_SIDE: tl.constexpr, NOISE: tl.constexpr,
                       TMA_T: tl.constexpr, GPU_MATH: tl.constexpr, PACKED: tl.constexpr,
                       NARROW_Q: tl.constexpr = False):
        """Quantize x's tile (pid_r, pid_c) (as loaded by _load_tile) and store its outputs.
        q blocks: BR rows x BC cols of x; q^T blocks (BR_T x BC_T in x^T) cover BC_T rows x BR_T cols of x."""
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = x.to(tl.float32)
        magnitude = tl.abs(x)                   # NaN stays NaN: _block_amax propagates it to its block's scale
        global_inv = 1.0
        global_recip = 1.0
        if RULE == 1:   # NVFP4: the tensor scale from max |x| (NaN as Inf); the first program stores it
            global_inv, global_recip = _nvfp4_global(tl.load(tensor_amax_ptr), MAX)
            if pid_r + pid_c == 0:
                tl.store(gain_ptr, global_inv)

        if X_SIDE:      # off when a second launch does only x^T (split 1 x b pairs)
            amax = _block_amax(magnitude, BLOCK_R, BLOCK_C, BR, BC)             # [BLOCK_R/BR, BLOCK_C/BC]
            scale, inv = _block_scales(amax, global_inv, global_recip, RULE, MAX, GPU_MATH)
            s_rows = pid_r * (BLOCK_R // BR) + tl.arange(0, BLOCK_R // BR)
            s_cols = pid_c * (BLOCK_C // BC) + tl.arange(0, BLOCK_C // BC)
            s_mask = (s_rows[:, None] < tl.cdiv(R, BR)) & (s_cols[None, :] < C // BC)
            tl.store(scale_ptr + s_rows[:, None] * (C // BC) + s_cols[None, :], scale, mask=s_mask)
            inv_full = _block_expand(inv, BLOCK_R, BLOCK_C, BR, BC)
            if NOISE == 1:      # stochastic rounding (x's side alone): noise [R, C] float32 uniform in [0, 1)
                noise = tl.load(noise_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
                q = _round_to_grid_stochastic(x * inv_full, noise, MAX, MIN_EXP, MBITS)
            elif NOISE == 2:    # the same with Philox noise from the seed at noise_ptr, keyed by element index
                noise = _uniform_tile(tl.load(noise_ptr), rows, pid_c, C, BLOCK_R, BLOCK_C)
                q = _round_to_grid_stochastic(x * inv_full, noise, MAX, MIN_EXP, MBITS)
            elif PACKED:        # MXFP4 of a bf16/fp16 x on a GPU: E2M1 two values per instruction (the same bits)
                q = _e2m1_bytes_f16x2(x * inv_full).to(q_ptr.dtype.element_ty, bitcast=True)
            else:
                q = _to_grid(x * inv_full, MAX, MIN_EXP, MBITS, HW)
            if NARROW_Q:    # x_q stored 8 bytes per thread: see NARROW_PAIR_STORE
                cols_q = tl.max_contiguous(tl.multiple_of(cols, 8), 8)
            else:
                cols_q = cols
            tl.store(q_ptr + rows[:, None] * C + cols_q[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        if TRANSPOSE:
            amax_t = _block_amax(magnitude, BLOCK_R, BLOCK_C, BC_T, BR_T)    # [BLOCK_R/BC_T, BLOCK_C/BR_T] (x coords)
            scale_t, inv_t = _block_scales(amax_t, global_inv, global_recip, RULE, MAX, GPU_MATH)
            t_cols = pid_r * (BLOCK_R // BC_T) + tl.arange(0, BLOCK_R // BC_T)     # block index along R
            t_rows = pid_c * (BLOCK_C // BR_T) + tl.arange(0, BLOCK_C // BR_T)     # block index along C
            t_mask = (t_rows[None, :] < tl.cdiv(C, BR_T)) & (t_cols[:, None] < R // BC_T)
            tl.store(scale_t_ptr + t_rows[None, :] * (R // BC_T) + t_cols[:, None], scale_t, mask=t_mask)
            if SAME_T:
                # x^T's blocks are x's blocks transposed, so x^T_q is x_q transposed. Storing the tile x_q again at
                # transposed addresses stores one SSA value twice in two layouts, which Triton 3.6 miscompiles on
                # an H200 (~37% of x^T_q wrong, bit-exact under the interpreter; a barrier or a tl.trans store does
                # not help): read x_q back (an L2 hit) after a barrier instead. bench/quantize.py, 2026-12-01.
                tl.debug_barrier()
                qt = tl.load(q_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0, volatile=True)
                tl.store(qt_ptr + cols[None, :] * R + rows[:, None], qt, mask=mask)
            else:
                inv_t_full = _block_expand(inv_t, BLOCK_R, BLOCK_C, BC_T, BR_T)
                if PACKED:
                    qt = _e2m1_bytes_f16x2(x * inv_t_full).to(qt_ptr.dtype.element_ty, bitcast=True)
                else:
                    qt = _to_grid(x * inv_t_full, MAX, MIN_EXP, MBITS, HW).to(qt_ptr.dtype.element_ty)
                if TMA_T:   # the transposed tile through a swizzled shared-memory tile and a TMA store (clipped)
                    qt_desc.store([pid_c * BLOCK_C, pid_r * BLOCK_R], tl.trans(qt))
                else:
                    tl.store(qt_ptr + cols[None, :] * R + rows[:, None], qt, mask=mask)


# The one-launch FP4 pair stores x_q 8 bytes per thread (a contiguity hint on its columns) instead of 16. Triton
# lays the whole tile out for its widest access: with 16-byte stores of one-byte x_q, each thread held 16 bf16
# values of a row and loaded them as two 16-byte halves, so every 32-byte sector of x was asked for by two load
# instructions (Nsight Compute, H100, 2026-12-06: L1 hit rate 30%, L2 86% busy at DRAM 60%). With 8-byte stores
# a thread holds 8 values, one 16-byte load, and a warp's load covers whole sectors once; for sm_90 (Triton 3.6)
# the MXFP4 pair compiles to 23.5 instead of 25.9 SASS per element (f16x2), NVFP4 to 134 instead of 167 registers.
# H100 (2026-12-06, bench/fp4_pair_tiles.py --narrow, each twice, bit for bit): MXFP4 0.0636 against 0.0641-0.0645 ms
# (float32 steps) and 0.0617 against 0.0621 (f16x2) at 8192 x 4096, 0.2273 against 0.2281-0.2293 / even at 14336;
# NVFP4 0.5-2% slower (0.1207 against 0.1201, 0.4201 against 0.4126-0.4173), so MXFP4 pairs (1 x 32) only.
NARROW_PAIR_STORE = True


SPLIT_PAIRS = True      # 1 x b pairs, b >= 32, in two launches, one per side. H200 2026-12-01 (bench/quantize.py,
                        # both ways in one run): 1 x 128 0.068 / 0.223 ms vs 0.090 / 0.298 one launch, MXFP4 0.093 /
                        # 0.312 vs 0.103 / 0.350; NVFP4 (1 x 16) was slower split, 0.208 / 0.658 vs 0.184 / 0.582


FP4_PAIR_TILES = {16: (16, 128, 1), 32: (32, 128, 2)}   # (rows, columns, warps) of the one launch that writes an
                        # FP4 1 x b pair (NVFP4 b = 16, MXFP4 b = 32). With one or two warps a thread holds whole
                        # columns of a block of x^T, so the x^T side's reduction across rows stays in registers.
                        # H200 2026-12-03 (bench/quantize.py block sweep, every tile bit-exact), 8192 x 4096 / 14336:
                        # NVFP4 0.112 / 0.366 ms against 0.135 / 0.451 by the former (32, 64, 4), MXFP4 0.055 / 0.187
                        # against 0.072 / 0.242 by (32, 128, 4); wider tiles at one warp were slower (32 x 256: 0.095
                        # / 0.329 MXFP4, 1.18 ms NVFP4 at 14336). NVFP4 with GPU_MATH (2026-12-04): 0.100 / 0.327 ms


# x^T_q stored by the tensor-memory accelerator (Hopper+, R % 16 == 0) instead of a layout conversion of one-byte
# values through shared memory (7.5M bank conflicts per MXFP4 pair launch, Nsight Compute, H200 2026-12-02).
# Off: bit-exact on an H200 but not faster (2026-12-02, `bash bench/device_pending.sh tma_t`): MXFP4 pair 0.0955 vs
# 0.0722 ms at 8192 x 4096 (bank conflicts 7.5M -> 14.8M), NVFP4 pair 0.1327 vs 0.1369, end to end unchanged.
# LOWBIT_TMA_TRANSPOSED=1 switches it on for a whole run.
TMA_TRANSPOSED = os.environ.get("LOWBIT_TMA_TRANSPOSED") == "1"


def use_tma_store(x: torch.Tensor, tile_r: int) -> bool:
    """TMA for x^T_q: switched on (TMA_TRANSPOSED), Hopper or newer (or the interpreter), 16-byte rows of x^T_q."""
    if not TMA_TRANSPOSED or x.shape[0] % 16 or tile_r < 16:
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 9


# FP4 block pairs (NVFP4 / MXFP4, x and x^T, round to nearest) on Hopper or newer: "gluon" takes
# lowbit/kernels/quantize_fp4_gluon.py (no value crosses a thread, MXFP4 rounded two values per instruction; 30-40%
# / 11-13% fewer SASS instructions per element than this kernel for MXFP4 / NVFP4, bench/ptx_mix.py --gluon), "triton"
# this module's kernel, the default: on an H100 (2026-12-06, bench/quantize_fp4.py, 8192 x 4096) the Gluon kernel is
# bit for bit but slower, MXFP4 pair 0.078-0.120 ms against 0.066, NVFP4 0.131-0.164 against 0.127.
FP4_PAIR_KERNELS = ("gluon", "triton")
FP4_PAIR_KERNEL = os.environ.get("LOWBIT_FP4_PAIR_KERNEL", "triton")
if FP4_PAIR_KERNEL not in FP4_PAIR_KERNELS:
    raise ValueError(f"LOWBIT_FP4_PAIR_KERNEL={FP4_PAIR_KERNEL!r}: use one of {FP4_PAIR_KERNELS} (or leave it unset: "
                     f"triton)")


def use_gluon_pair(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None) -> bool:
    """Whether quantize_blocks_triton hands this call to the Gluon FP4 pair kernel (FP4_PAIR_KERNEL="gluon", a
    Triton with Gluon, and a pair that kernel supports; else this module's kernel)."""
    if FP4_PAIR_KERNEL != "gluon" or TILE is not None or not x.is_cuda or quantizer_t is None:
        return False
    gluon_supports = _gluon_supports()
    return gluon_supports is not None and gluon_supports(x, quantizer, quantizer_t)


@functools.cache
def _gluon_supports():
    """quantize_fp4_gluon.supports, or None (with one warning) where this Triton has no Gluon."""
    try:
        from lowbit.kernels.quantize_fp4_gluon import supports
    except ImportError as error:
        warnings.warn(f"LOWBIT_FP4_PAIR_KERNEL=gluon needs Triton's Gluon ({error}); FP4 pairs take the Triton kernel")
        return None
    return supports


# MXFP4 (pow2 scales) of a bf16/fp16 x rounded onto E2M1 in f16x2 by this module's kernel too
# (quantize_triton._e2m1_bytes_f16x2, as the Gluon kernel does; the same bits), on GPUs. On by default since two H100
# runs (bench/quantize_fp4.py, bit for bit first) gave 0.0636 against 0.0658 ms (2026-12-06) and 0.0625 against 0.0647
# (8192 x 4096; 0.2229 against 0.2260 at 8192 x 14336; 2026-12-06b): 17% fewer instructions executed (Nsight Compute:
# 27.1M against 32.6M), 2-3% less time. LOWBIT_FP4_TRITON_PACKED=0 takes the float32 steps.
TRITON_PACKED = os.environ.get("LOWBIT_FP4_TRITON_PACKED", "1") != "0"


def f16x2_rounds_exactly(x: torch.Tensor, quantizer: Quantizer) -> bool:
    """Whether quantize_triton._e2m1_bytes_f16x2 gives the float32 steps' bits for this operand: MXFP4 (E2M1 with
    power-of-two scales) of a bfloat16 or float16 x, whose x * 2^k half precision holds exactly wherever E2M1 can
    tell values apart."""
    fmt = quantizer.fmt
    return (quantizer.scale_rule == "pow2" and fmt.mantissa_bits == 1 and fmt.max == 6.0
            and x.dtype in (torch.bfloat16, torch.float16))


TILE: tuple[int, int, int] | None = None   # (rows, columns, warps) for every launch in place of the defaults below;
                                           # bench/quantize.py's block sweep (a tile must hold whole blocks)
# registers per thread for the FP4 pair launch (Triton's maxnreg; LOWBIT_FP4_PAIR_MAXNREG for whole runs); None:
# ptxas picks. NVFP4's pair takes 167 (12 one-warp programs per SM), MXFP4's 127 (`bench/ptx_mix.py --maxnreg 128`:
# 128 with one spilled value). A/B on a GPU: bench/device_pending.sh fp4_maxnreg
def _env_count(name: str, default: int) -> int:
    """A non-negative integer from the environment variable `name`, refused by name and value otherwise."""
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name}={value!r}: give a non-negative integer (or leave it unset: {default})")
    return int(value)


PAIR_MAXNREG: int | None = _env_count("LOWBIT_FP4_PAIR_MAXNREG", 0) or None


# The FP4 pair by a fixed grid of PAIR_PROGRAMS_PER_SM programs per SM, each walking tiles and loading ahead
# (_quantize_pair_persistent_kernel; PAIR_PREFETCH 1: the next tile into registers, k > 1: k - 1 tiles into shared
# memory by Triton's pipeliner, 0: none); PAIR_PROGRAMS_PER_SM = 0: one tile per program (the default).
# Environment: LOWBIT_FP4_PAIR_PROGRAMS_PER_SM, LOWBIT_FP4_PAIR_PREFETCH.
PAIR_PROGRAMS_PER_SM = _env_count("LOWBIT_FP4_PAIR_PROGRAMS_PER_SM", 0)
PAIR_PREFETCH = _env_count("LOWBIT_FP4_PAIR_PREFETCH", 1)


def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (4 under the interpreter, so that programs walk several tiles in the tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def tile_fits(tile_r: int, tile_c: int, x_side: bool, t_side: bool, br: int, bc: int, br_t: int, bc_t: int) -> bool:
    """Whether a tile holds whole blocks of the sides it writes (x's br x bc, x^T's br_t x bc_t, which cover bc_t
    rows x br_t columns of x)."""
    return ((not x_side or (tile_r % br == 0 and tile_c % bc == 0))
            and (not t_side or (tile_r % bc_t == 0 and tile_c % br_t == 0)))


def supports(quantizer: Quantizer, quantizer_t: Quantizer | None) -> bool:
    """Block quantizers this kernel handles, same format and rule on both sides, block sides powers of two:
    1 x b blocks (both outputs), and b x b blocks whose x^T blocks are b x b too (fp8_blockwise's 128 x 128 weights).

    b x b weight blocks were bit-exact under TRITON_INTERPRET=1 but not on GPUs (H100 2026-11-23, H200 2026-12-01)
    until x^T_q was read back from x_q (the kernel's SAME_T path); other 2-D blocks take the PyTorch path.
    """
    def ok(q):
        if not q.blocked or q.block_cols & (q.block_cols - 1):
            return False
        return q.block_rows == 1 or q.block_rows == q.block_cols
    if not AVAILABLE or not ok(quantizer):
        return False
    if quantizer_t is None:
        return True
    return (ok(quantizer_t) and quantizer_t.fmt is quantizer.fmt and quantizer_t.scale_rule == quantizer.scale_rule
            and (quantizer_t.block_rows == 1) == (quantizer.block_rows == 1)
            and (quantizer.block_rows == 1 or quantizer_t.block_cols == quantizer.block_cols))


def quantize_blocks_triton(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None,
                           noise: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                           tensor_amax: torch.Tensor | None = None) -> tuple[QTensor, QTensor | None]:
    """Triton version of scaling.quantize_reference for block quantizers, x and (optionally) x^T. Stochastic
    rounding of x alone: by noise (uniform [0, 1) float32 of x's shape), as the reference rounds with it, or by
    Philox noise drawn in the kernel from seed (an int64 [1] tensor on x's device; elements (r, 4j .. 4j + 3) get
    the four outputs of Philox(seed, r * C / 4 + j): offsets repeat beyond 2^33 elements). tensor_amax: max |x|
    (float32 [1], NaN as Inf), if known, for NVFP4's tensor scale in place of the kernel's own amax pass over x
    (ignored by other rules)."""
    if noise is None and seed is None and use_gluon_pair(x, quantizer, quantizer_t):
        from lowbit.kernels.quantize_fp4_gluon import quantize_fp4_pair_gluon
        return quantize_fp4_pair_gluon(x, quantizer, tensor_amax, quantizer_t=quantizer_t)
    x = x.contiguous()
    R, C = x.shape
    if seed is not None and (quantizer_t is not None or noise is not None or seed.numel() != 1):
        raise ValueError(f"quantize_blocks_triton: seed {tuple(seed.shape)} takes x alone, one value, no noise")
    if noise is not None:
        if quantizer_t is not None or noise.shape != x.shape:
            raise ValueError(f"quantize_blocks_triton: stochastic rounding takes x alone and noise of x's shape "
                             f"{tuple(x.shape)}, got noise {tuple(noise.shape)} with a transposed side "
                             f"{quantizer_t is not None}")
        noise = noise.float().contiguous()
    quantizer.check_columns(C, "operand")
    transpose = quantizer_t is not None
    if transpose:
        quantizer_t.check_columns(R, "operand^T")
    br, bc = quantizer.block_rows, quantizer.block_cols
    br_t, bc_t = (quantizer_t.block_rows, quantizer_t.block_cols) if transpose else (1, 1)
    block_r = max(64 if bc <= 32 else 16, br, bc_t)
    block_c = max(64 if bc <= 32 else 128, bc, br_t)
    fmt = quantizer.fmt
    gain = None                                         # NVFP4's tensor scale G, kept with the operand
    if quantizer.scale_rule == "nvfp4":                 # the FP32 tensor scale needs the tensor amax first
        if tensor_amax is None:
            tensor_amax = tensor_amax_op(x)                     # a custom op (traced, its kernel failed in Inductor)
        tensor_amax = reduce_amax(tensor_amax, quantizer)       # tensor parallelism: over the whole weight/activation
        check_finite(tensor_amax, "operand")
        gain = torch.empty(1, device=x.device, dtype=torch.float32)     # written by the kernel
    q = torch.empty((R, C), device=x.device, dtype=fmt.storage)
    scale = torch.empty((-(-R // br), C // bc), device=x.device, dtype=torch.float32)
    qt = torch.empty((C, R) if transpose else (0, 0), device=x.device, dtype=fmt.storage)
    scale_t = torch.empty((-(-C // br_t), R // bc_t) if transpose else (0, 0), device=x.device, dtype=torch.float32)
    # (x side, x^T side, tile) per launch: one launch for both sides, or, for split 1 x b pairs, x's blocks along
    # its rows and then x^T's blocks down its columns, each with a tile that holds whole blocks of one side only
    fp4_pair = transpose and fmt.mantissa_bits == 1 and br == br_t == 1 and bc == bc_t and bc in FP4_PAIR_TILES
    if fp4_pair:
        launches = [(True, True, FP4_PAIR_TILES[bc])]
    elif SPLIT_PAIRS and transpose and br == 1 and br_t == 1 and bc >= 32:
        launches = [(True, False, (64 if bc <= 32 else 16, max(64 if bc <= 32 else 128, bc), None)),   # x's tile alone
                    (False, True, (max(64, bc_t), 64, None))]
    else:
        launches = [(True, transpose, (block_r, block_c, None))]
    packed = TRITON_PACKED and x.is_cuda and noise is None and seed is None and f16x2_rounds_exactly(x, quantizer)
    for x_side, t_side, (tile_r, tile_c, warps) in launches:
        warps = warps or (8 if tile_r * tile_c >= 128 * 128 else 4)
        options = {"maxnreg": PAIR_MAXNREG} if fp4_pair and PAIR_MAXNREG else {}
        if TILE is not None:
            tile_r, tile_c, warps = TILE
            if not tile_fits(tile_r, tile_c, x_side, t_side, br, bc, br_t, bc_t):
                raise ValueError(f"quantize_blocks_triton.TILE={TILE} does not hold whole blocks ({br} x {bc}, "
                                 f"x^T {br_t} x {bc_t}); pick multiples of the block sides")
        same_t = t_side and br == bc == br_t == bc_t        # x^T_q is x_q transposed: read back, not rounded
        tma_t = t_side and not same_t and use_tma_store(x, tile_r)
        qt_desc = TensorDescriptor.from_tensor(qt, [tile_c, tile_r]) if tma_t else qt
        if fp4_pair and PAIR_PROGRAMS_PER_SM and noise is None and seed is None and not tma_t:
            tiles = triton.cdiv(R, tile_r) * triton.cdiv(C, tile_c)
            _quantize_pair_persistent_kernel[(min(tiles, PAIR_PROGRAMS_PER_SM * _multiprocessors(x.device)),)](
                x, q, qt, qt_desc, scale, scale_t, tensor_amax if gain is not None else x,
                gain if gain is not None else scale, R, C, x.stride(0),
                BLOCK_R=tile_r, BLOCK_C=tile_c, BC=bc, RULE=RULES[quantizer.scale_rule], MAX=fmt.max,
                MIN_EXP=fmt.min_normal_exponent, MBITS=fmt.mantissa_bits, HW=hardware_cast(fmt, x.device),
                GPU_MATH=hardware_cast(E4M3, x.device), PACKED=packed, PREFETCH=PAIR_PREFETCH, num_warps=warps,
                **options)
            continue
        _quantize_blocks_kernel[(triton.cdiv(R, tile_r), triton.cdiv(C, tile_c))](
            x, q, qt, qt_desc, scale, scale_t, tensor_amax if gain is not None else x,
            gain if gain is not None else scale,
            noise if noise is not None else seed if seed is not None else x,
            R, C, x.stride(0),
            BLOCK_R=tile_r, BLOCK_C=tile_c, BR=br, BC=bc, BR_T=br_t, BC_T=bc_t,
            TRANSPOSE=t_side, RULE=RULES[quantizer.scale_rule], MAX=fmt.max,
            MIN_EXP=fmt.min_normal_exponent, MBITS=fmt.mantissa_bits,
            HW=hardware_cast(fmt, x.device), SAME_T=same_t, X_SIDE=x_side,
            NOISE=1 if noise is not None else 2 if seed is not None else 0, TMA_T=tma_t,
            GPU_MATH=hardware_cast(E4M3, x.device), PACKED=packed,
            NARROW_Q=fp4_pair and NARROW_PAIR_STORE and bc == 32, num_warps=warps, **options)
    check_finite(scale, "operand")
    first = QTensor(q, scale, quantizer, gain)
    return first, (QTensor(qt, scale_t, quantizer_t, gain) if transpose else None)
