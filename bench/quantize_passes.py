"""The two passes of the rowwise pair quantize kernel (amax, then quantize x and x^T) timed apart, next to the
tensorwise pair's, and candidate amax passes with fewer / cheaper atomics: where does the rowwise pair (0.63-0.64 of a
device copy, H200 2026-12-01) lose against the tensorwise pair (0.84)?

    python bench/quantize_passes.py          # CUDA; every candidate checked against torch.amax first

Candidates for the per-row and per-column amax of |x| (bf16 [R, C]), next to lowbit's `_amax_kernel` (since
2026-12-03 the `acc` design with integer atomics, 32 x 128 tiles, 512-row strips, 3 stages; before, one 64 x 64 tile per
program with float atomics: 40.5 us at 8192 x 4096 against 21.7):
  int       the same with integer atomics on the float bits (|x| >= 0, so the bit patterns order like the values)
  strip     a program walks STRIP_R rows of a BLOCK_C column strip: column maxima kept in registers, one atomic per
            column per strip; per-row integer atomics per tile
  acc       the same walk, the column maxima as an element-wise running maximum tile reduced once at the end (a
            reduction across rows per tile costs more than the memory traffic); integer atomics or, without
            atomics, partial maxima stored plainly and a second small kernel taking their maxima
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels import quantize_triton  # noqa: E402
from lowbit.kernels.quantize_triton import FORMAT_CODES, _launch_amax, _launch_pair  # noqa: E402


@triton.jit
def _amax_int_kernel(x_ptr, row_ptr, col_ptr, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     STRIP_R: tl.constexpr):
    """Per-row and per-column max of |x| into int32 views of float32 buffers (zeros to start)."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_max = tl.zeros((BLOCK_C,), tl.float32)
    r0 = tl.program_id(0) * STRIP_R
    for r in tl.range(r0, tl.minimum(r0 + STRIP_R, R), BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))
        tl.atomic_max(row_ptr + rows, tl.max(magnitude, axis=1).to(tl.int32, bitcast=True), mask=rows < R,
                      sem="relaxed")
        col_max = tl.maximum(col_max, tl.max(magnitude, axis=0))
    tl.atomic_max(col_ptr + cols, col_max.to(tl.int32, bitcast=True), mask=cols < C, sem="relaxed")


def amax_int(x, block_r, block_c, strip_r, warps):
    R, C = x.shape
    amax = torch.zeros(R + C, device=x.device, dtype=torch.float32)
    bits = amax.view(torch.int32)
    grid = (triton.cdiv(R, strip_r), triton.cdiv(C, block_c))
    _amax_int_kernel[grid](x, bits[:R], bits[R:], R, C, x.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                           STRIP_R=strip_r, num_warps=warps)
    return amax[:R], amax[R:]


@triton.jit
def _amax_partial_kernel(x_ptr, row_part_ptr, col_part_ptr, R, C, stride_r, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, STRIP_R: tl.constexpr):
    """No atomics: each program walks STRIP_R rows of a BLOCK_C column strip and stores plainly the row maxima of
    each tile (row_part[column strip, row]) and its strip's column maxima (col_part[row strip, column])."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_max = tl.zeros((BLOCK_C,), tl.float32)
    r0 = pid_r * STRIP_R
    for r in tl.range(r0, r0 + STRIP_R, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))
        tl.store(row_part_ptr + pid_c * R + rows, tl.max(magnitude, axis=1), mask=rows < R)
        col_max = tl.maximum(col_max, tl.max(magnitude, axis=0))
    tl.store(col_part_ptr + pid_r * C + cols, col_max, mask=cols < C)


@triton.jit
def _max_over_parts(part_ptr, out_ptr, n, parts_n, block_id, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """out[i] = max over the parts_n rows of part[:, i], for BLOCK indices i."""
    idx = block_id * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for p0 in range(0, parts_n, PARTS):
        parts = p0 + tl.arange(0, PARTS)
        v = tl.load(part_ptr + parts[:, None] * n + idx[None, :], mask=(parts < parts_n)[:, None] & (idx < n)[None, :],
                    other=0.0)
        acc = tl.maximum(acc, tl.max(v, axis=0))
    tl.store(out_ptr + idx, acc, mask=idx < n)


@triton.jit
def _amax_finish_kernel(row_part_ptr, col_part_ptr, out_ptr, R, C, PR, PC, BLOCK: tl.constexpr,
                        PARTS: tl.constexpr):
    """out[:R] = max over PR partials of each row, out[R:] = max over PC partials of each column."""
    pid = tl.program_id(0)
    row_programs = tl.cdiv(R, BLOCK)
    if pid < row_programs:
        _max_over_parts(row_part_ptr, out_ptr, R, PR, pid, BLOCK, PARTS)
    else:
        _max_over_parts(col_part_ptr, out_ptr + R, C, PC, pid - row_programs, BLOCK, PARTS)


@triton.jit
def _amax_acc_kernel(x_ptr, row_ptr, col_ptr, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     STRIP_R: tl.constexpr, STAGES: tl.constexpr, PARTIAL: tl.constexpr):
    """A program walks STRIP_R rows of a BLOCK_C column strip, keeping an element-wise running maximum tile (reduced
    over rows once, at the end) and reducing each tile along its rows only. PARTIAL: plain stores of partial maxima
    (row_ptr[column strip, row], col_ptr[row strip, column]); else integer atomics on the float bits."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    r0 = pid_r * STRIP_R
    for r in tl.range(r0, r0 + STRIP_R, BLOCK_R, num_stages=STAGES):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))
        if PARTIAL:
            tl.store(row_ptr + pid_c * R + rows, tl.max(magnitude, axis=1), mask=rows < R)
        else:
            tl.atomic_max(row_ptr + rows, tl.max(magnitude, axis=1).to(tl.int32, bitcast=True), mask=rows < R,
                          sem="relaxed")
        acc = tl.maximum(acc, magnitude)
    col_max = tl.max(acc, axis=0)
    if PARTIAL:
        tl.store(col_ptr + pid_r * C + cols, col_max, mask=cols < C)
    else:
        tl.atomic_max(col_ptr + cols, col_max.to(tl.int32, bitcast=True), mask=cols < C, sem="relaxed")


def amax_acc(x, block_r, block_c, strip_r, warps, stages, partial):
    R, C = x.shape
    if not partial:
        amax = torch.zeros(R + C, device=x.device, dtype=torch.float32)
        bits = amax.view(torch.int32)
        _amax_acc_kernel[(triton.cdiv(R, strip_r), triton.cdiv(C, block_c))](
            x, bits[:R], bits[R:], R, C, x.stride(0), BLOCK_R=block_r, BLOCK_C=block_c, STRIP_R=strip_r,
            STAGES=stages, PARTIAL=False, num_warps=warps)
        return amax[:R], amax[R:]
    pr, pc = triton.cdiv(C, block_c), triton.cdiv(R, strip_r)
    row_part = torch.empty((pr, R), device=x.device, dtype=torch.float32)
    col_part = torch.empty((pc, C), device=x.device, dtype=torch.float32)
    _amax_acc_kernel[(pc, pr)](x, row_part, col_part, R, C, x.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                               STRIP_R=strip_r, STAGES=stages, PARTIAL=True, num_warps=warps)
    amax = torch.empty(R + C, device=x.device, dtype=torch.float32)
    block = 256
    _amax_finish_kernel[(triton.cdiv(R, block) + triton.cdiv(C, block),)](row_part, col_part, amax, R, C, pr, pc,
                                                                         BLOCK=block, PARTS=16, num_warps=4)
    return amax[:R], amax[R:]


def amax_partial(x, block_r, block_c, strip_r, warps):
    R, C = x.shape
    pr, pc = triton.cdiv(C, block_c), triton.cdiv(R, strip_r)
    row_part = torch.empty((pr, R), device=x.device, dtype=torch.float32)
    col_part = torch.empty((pc, C), device=x.device, dtype=torch.float32)
    _amax_partial_kernel[(pc, pr)](x, row_part, col_part, R, C, x.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                                   STRIP_R=strip_r, num_warps=warps)
    amax = torch.empty(R + C, device=x.device, dtype=torch.float32)
    block = 256
    _amax_finish_kernel[(triton.cdiv(R, block) + triton.cdiv(C, block),)](row_part, col_part, amax, R, C, pr, pc,
                                                                         BLOCK=block, PARTS=16, num_warps=4)
    return amax[:R], amax[R:]


def ms(fn) -> float:
    """GPU time of fn replayed from a CUDA graph."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def amax_candidates(x):
    """(label, fn) of lowbit's amax pass and every candidate; fn returns (row amax, column amax) where it has both."""
    rows = [("tensor amax (lowbit)", lambda: _launch_amax(x, False, False), False),
            ("row+col amax (lowbit)", lambda: _launch_amax(x, True, True), True)]
    for block_r, block_c, strip_r, warps in ((64, 64, 64, 4), (64, 64, 256, 4), (32, 128, 256, 4)):
        rows.append((f"int atomics {block_r}x{block_c} strip {strip_r} {warps}w",
                     lambda a=(block_r, block_c, strip_r, warps): amax_int(x, *a), True))
    for block_r, block_c, strip_r, warps in ((64, 64, 64, 4), (64, 64, 128, 4), (64, 64, 256, 4), (64, 64, 512, 4),
                                             (32, 64, 256, 4), (32, 128, 256, 4), (64, 128, 256, 8), (64, 128, 512, 8),
                                             (128, 64, 512, 8)):
        rows.append((f"partials {block_r}x{block_c} strip {strip_r} {warps}w",
                     lambda a=(block_r, block_c, strip_r, warps): amax_partial(x, *a), True))
    for tiling in ((32, 64, 256, 4, 2), (32, 64, 512, 4, 3), (64, 64, 256, 4, 2), (64, 64, 512, 4, 2),
                   (64, 64, 512, 4, 3), (32, 128, 256, 4, 2), (32, 128, 512, 4, 3), (16, 128, 256, 4, 3),
                   (64, 128, 512, 8, 2), (32, 256, 512, 8, 3),
                   (32, 128, 512, 1, 3), (16, 256, 512, 1, 3), (32, 256, 512, 2, 3)):   # not run yet (12-03)
        for partial in (False, True):
            block_r, block_c, strip_r, warps, stages = tiling
            label = f"acc {'partials' if partial else 'int atom'} {block_r}x{block_c} s{strip_r} {warps}w {stages}st"
            rows.append((label, lambda a=tiling + (partial,): amax_acc(x, *a), True))
    return rows


def time_amax(x, copy_gbs: float) -> None:
    want_r, want_c = x.float().abs().amax(1), x.float().abs().amax(0)
    read_gb = 2 * x.numel() / 1e9
    for label, fn, both in amax_candidates(x):
        if both:
            got_r, got_c = fn()
            if not (torch.equal(got_r, want_r) and torch.equal(got_c, want_c)):
                print(f"  {label:<40} WRONG", flush=True)
                continue
        gbs = read_gb / ms(fn) * 1e3
        print(f"  {label:<40} {read_gb / gbs * 1e6:7.1f} us  {gbs:6.0f} GB/s read  "
              f"{gbs / copy_gbs:4.2f} of copy", flush=True)


def time_pair(x, copy_gbs: float) -> None:
    """The quantize pass alone (x read, x_q and x^T_q written): tensorwise, and rowwise over tiles."""
    code = FORMAT_CODES["e4m3"]
    moved_gb = 4 * x.numel() / 1e9
    r_amax, c_amax = _launch_amax(x, True, True)
    t_amax, _ = _launch_amax(x, False, False)
    runs = [("tensor pair pass", None, lambda: _launch_pair(x, t_amax, t_amax, code, code, True, True))]
    for tile, warps in (((64, 64), 4), ((64, 128), 4), ((128, 64), 8), ((32, 128), 4), ((64, 64), 8)):
        runs.append((f"rowwise pair pass {tile} {warps}w", (tile, warps),
                     lambda: _launch_pair(x, r_amax, c_amax, code, code, True, False)))
    defaults = quantize_triton.PAIR_TILE, quantize_triton.PAIR_WARPS
    try:
        for label, setting, fn in runs:
            if setting:
                quantize_triton.PAIR_TILE, quantize_triton.PAIR_WARPS = setting
            gbs = moved_gb / ms(fn) * 1e3
            print(f"  {label:<40} {moved_gb / gbs * 1e6:7.1f} us  {gbs:6.0f} GB/s moved  {gbs / copy_gbs:4.2f} of copy",
                  flush=True)
    finally:
        quantize_triton.PAIR_TILE, quantize_triton.PAIR_WARPS = defaults


def main() -> None:
    print(torch.cuda.get_device_name(), flush=True)
    for shape in ((8192, 4096), (8192, 14336), (4096, 8192)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x[5, 7] = -40.0         # a large negative entry: |x| must win
        out = torch.empty_like(x)
        copy_gbs = 4 * x.numel() / 1e9 / ms(lambda: out.copy_(x)) * 1e3
        print(f"\n{shape}: copy {copy_gbs:.0f} GB/s", flush=True)
        time_amax(x, copy_gbs)
        time_pair(x, copy_gbs)


if __name__ == "__main__":
    main()
