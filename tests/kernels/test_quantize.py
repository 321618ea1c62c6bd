"""The fused Triton quantize kernels equal the PyTorch reference bit for bit (TRITON_INTERPRET=1 on CPU,
small odd shapes; run in a subprocess so the interpreter setting cannot leak into other tests)."""
import os
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def expect_non_finite(quantize, device: str, what: str) -> None:
    """CPU: NonFiniteAmaxError; CUDA (no host sync by design, scaling.check_finite): a NaN scale."""
    from lowbit.precision.scaling import NonFiniteAmaxError
    try:
        first, _ = quantize()
    except NonFiniteAmaxError:
        assert device == "cpu", f"{what}: a host sync on {device}"
        return
    assert device != "cpu" and torch.isnan(first.scale).any(), f"{what} was not reported"


def tiny_normals(n: int, generator: torch.Generator) -> torch.Tensor:
    """n values of magnitude 1e-37 to 2e-37, random signs: normal in float32 and bfloat16 (subnormal inputs convert
    differently under the interpreter), below 448 / float32's max, so fmt.max / amax overflowed before AMAX_FLOOR."""
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return signs * (1 + torch.rand(n, generator=generator)) * 1e-37


def check_triton_equals_reference(device: str = "cpu") -> None:
    from lowbit.precision.formats import E2M1, E4M3, E5M2
    from lowbit.precision.scaling import Quantizer, quantize_reference
    from lowbit.kernels.quantize_triton import quantize_pair_triton

    generator = torch.Generator().manual_seed(0)
    checked = 0
    for rows, cols in [(1, 1), (7, 5), (33, 70), (65, 129)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, cols, generator=generator) * torch.exp2(torch.randint(-12, 12, (rows, cols), generator=generator).float())
            x[0, 0] = 0.0
            if rows > 2:
                x[2] = 0.0                            # an all-zero row: scale 1
                x[1, 0] = -0.0
            if rows > 3:                              # a row of tiny normal values: fmt.max / amax overflowed float32
                x[3] = tiny_normals(cols, generator)
                x[3, 0] = 0.0                         # 0 x Inf was the NaN
            x = x.to(device, dtype)
            for fmt, fmt_t in [(E4M3, E4M3), (E5M2, E5M2), (E2M1, E2M1), (E4M3, E2M1)]:
                for tensorwise in (True, False):
                    q, q_t = (Quantizer(fmt, 0, 0), Quantizer(fmt_t, 0, 0)) if tensorwise else \
                        (Quantizer(fmt, 1, 0), Quantizer(fmt_t, 1, 0))
                    got, got_t = quantize_pair_triton(x, q, q_t)
                    want, want_t = quantize_reference(x, q), quantize_reference(x.t(), q_t)
                    for a, b in ((got, want), (got_t, want_t)):
                        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
                        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), (rows, cols, fmt, tensorwise)
                        assert a.scale.shape == b.scale.shape and torch.equal(a.scale, b.scale)
                        assert torch.isfinite(a.data.float()).all() and torch.isfinite(a.scale).all()
                    only, none = quantize_pair_triton(x, q, None)
                    assert none is None and torch.equal(only.data.view(torch.uint8), want.data.view(torch.uint8))
                    if tensorwise and fmt is fmt_t:     # delayed scaling: an amax given, below x's (saturating) or above
                        for factor in (0.25, 1.0, 3.0):
                            given = x.float().abs().amax() * factor
                            got, got_t = quantize_pair_triton(x, q, q_t, amax=given)
                            want = quantize_reference(x, q, amax=given)
                            assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)), (rows, fmt)
                            assert torch.equal(got_t.data.view(torch.uint8), want.data.t().view(torch.uint8))
                            assert torch.equal(got.scale, want.scale) and torch.equal(got_t.scale, want.scale)
                    checked += 1
    bad = torch.ones(9, 17, device=device)
    bad[3, 4] = float("nan")
    expect_non_finite(lambda: quantize_pair_triton(bad, Quantizer(E4M3, 1, 0), Quantizer(E4M3, 1, 0)), device,
                      "NaN amax")
    print(f"OK {checked}")


def run_under_interpreter(check: str, expected: str) -> None:
    """Run `check` of this module in a fresh process with TRITON_INTERPRET=1 (read when kernels are built)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = f"from tests.kernels.test_quantize import {check} as c; c()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and expected in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_triton_quantize_equals_reference_bitwise_under_interpreter():
    run_under_interpreter("check_triton_equals_reference", "OK 64")


def check_amax_strips(device: str = "cpu") -> None:
    """The amax pass (`_amax_kernel`: programs walk strips of rows, integer atomics on the float bits) equals
    torch.amax of |x| per row, per column and over the tensor, NaN read as Inf, where the strips and the column blocks
    end part-way (several strips per column block, a ragged last one), at the default tiles and at small ones; so does
    the flat tensor amax (`_tensor_amax_kernel`, contiguous x: a few programs per SM walking blocks, the last one
    ragged), and the strip kernel's tensor amax of a row-strided view."""
    from lowbit.kernels import quantize_triton

    generator = torch.Generator().manual_seed(5)
    default, default_flat = quantize_triton.AMAX_TILE, quantize_triton.TENSOR_AMAX
    cases = [(default, default_flat, (1100, 300)), ((8, 16, 40, 2), (64, 1, 1, 1), (97, 45)),
             ((4, 32, 4, 1), (128, 2, 3, 2), (9, 70))]
    try:
        for tile, flat, (rows, cols) in cases:
            quantize_triton.AMAX_TILE, quantize_triton.TENSOR_AMAX = tile, flat
            x = torch.randn(rows, cols, generator=generator) * 3
            x[rows - 1, cols - 1] = -50.0                  # the last tile's corner, negative: |x| must win
            x[rows // 2] = 0.0
            y = x.clone()
            y[1, cols // 2] = float("nan")
            for data in (x, y):
                magnitude = data.abs().nan_to_num(nan=float("inf"))
                for dtype in (torch.float32, torch.bfloat16):
                    xd = data.to(device, dtype)
                    want = magnitude.to(dtype).float()
                    row_amax, col_amax = quantize_triton._launch_amax(xd, True, True)
                    assert torch.equal(row_amax.cpu(), want.amax(1)) and torch.equal(col_amax.cpu(), want.amax(0)), tile
                    row_only, _ = quantize_triton._launch_amax(xd, True, False)
                    tensor, _ = quantize_triton._launch_amax(xd, False, False)
                    assert torch.equal(row_only.cpu(), want.amax(1)) and torch.equal(tensor.cpu(), want.amax().reshape(1))
                    for per_row, per_col in ((True, True), (True, False), (False, False)):   # the op compiled code calls
                        op_row, op_col = quantize_triton.split_amax(torch.ops.lowbit.quantize_amax(xd, per_row, per_col),
                                                                    xd, per_row)
                        assert torch.equal(op_row.cpu(), want.amax(1) if per_row else want.amax().reshape(1))
                        assert not per_col or torch.equal(op_col.cpu(), want.amax(0))
                    wide = torch.zeros(rows, cols + 3, device=device, dtype=dtype)
                    wide[:, :cols] = xd
                    strided, _ = quantize_triton._launch_amax(wide[:, :cols], False, False)
                    assert torch.equal(strided.cpu(), want.amax().reshape(1)), tile
    finally:
        quantize_triton.AMAX_TILE, quantize_triton.TENSOR_AMAX = default, default_flat
    # compiled code reaches the amax through the quantize_amax op (one buffer, split outside it): the same pair as eager
    from lowbit.precision.formats import E4M3, E5M2
    from lowbit.precision.scaling import Quantizer
    pair = torch.compile(lambda t, q, q_t: [(a.data, a.scale) for a in quantize_triton.quantize_pair_triton(t, q, q_t)],
                         backend="aot_eager", dynamic=False)
    xd = (torch.randn(33, 48, generator=generator) * 5).to(device, torch.bfloat16)
    for q, q_t in ((Quantizer(E4M3, 0, 0), Quantizer(E5M2, 0, 0)), (Quantizer(E4M3, 1, 0), Quantizer(E5M2, 1, 0))):
        for (data, scale), want in zip(pair(xd, q, q_t), quantize_triton.quantize_pair_triton(xd, q, q_t)):
            assert torch.equal(data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(scale, want.scale)
    print("OK amax strips")


@pytest.mark.slow
def test_amax_pass_over_strips_under_interpreter():
    run_under_interpreter("check_amax_strips", "OK amax strips")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_quantize_equals_reference_on_gpu():
    """The compiled kernels, where E4M3/E5M2 are rounded by the float8 cast itself, on the same cases."""
    check_triton_equals_reference("cuda")
    check_amax_strips("cuda")
    check_block_kernel_equals_reference("cuda")
    check_e2m1_rounding("cuda")


def e2m1_edge_values() -> torch.Tensor:
    """float32 values where E2M1's rounding can go wrong: every grid point and midpoint (the ties), the float32
    neighbours of each, signed zeros, subnormals, values past the saturation and the non-finite ones."""
    from lowbit.precision.formats import E2M1, grid_values
    grid = grid_values(E2M1).float()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([6.5, 7.0, 1e3, 3e38, 1e-30, 1e-40, 2.0 ** -149])])
    around = torch.cat([points, torch.nextafter(points, torch.full_like(points, float("inf"))),
                        torch.nextafter(points, torch.zeros_like(points))])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    return torch.cat([around, -around, special, torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 3])


def check_e2m1_rounding(device: str = "cpu") -> None:
    """The kernels' E2M1 rounding (`_to_grid`: integer steps) equals formats.round_to_format bit for bit on E2M1's
    edge values (a NaN input saturates to 6 there; the NaN scale of such a tensor reports it, check_finite)."""
    import triton

    from lowbit.precision.formats import E2M1, round_to_format
    from tests.kernels.rounding_kernel import round_kernel

    x = e2m1_edge_values()
    want = round_to_format(x, E2M1)
    got = torch.empty_like(x, device=device)
    round_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), got, x.numel(), BLOCK=1024)
    got, finite = got.cpu(), ~torch.isnan(x)
    same = got[finite].view(torch.int32) == want[finite].view(torch.int32)
    assert same.all(), (x[finite][~same][:8], got[finite][~same][:8], want[finite][~same][:8])
    print(f"OK e2m1 {x.numel()}")


def test_e2m1_rounding_equals_reference_on_edge_values_under_interpreter():
    run_under_interpreter("check_e2m1_rounding", "OK e2m1")


def check_block_kernel_equals_reference(device: str = "cpu") -> None:
    from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton, supports
    from lowbit.precision.formats import E2M1, E4M3, E5M2
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(0)
    cases = [  # (rows, cols, quantizer, quantizer of x^T)
        (48, 80, Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 16, "nvfp4")),
        (32, 96, Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E2M1, 1, 32, "pow2")),
        (32, 64, Quantizer(E4M3, 1, 32), Quantizer(E4M3, 1, 32)),                  # 1 x b activation tiles
        (64, 96, Quantizer(E4M3, 32, 32), Quantizer(E4M3, 32, 32)),                # b x b weight blocks
        (70, 64, Quantizer(E4M3, 32, 32), None),                                   # ragged last row block
        (128, 256, Quantizer(E4M3, 128, 128), Quantizer(E4M3, 128, 128)),          # DeepSeek-V3 weight blocks
        (128, 384, Quantizer(E4M3, 1, 128), Quantizer(E4M3, 1, 128)),              # DeepSeek-V3 activation tiles
        (256, 256, Quantizer(E4M3, 1, 128), Quantizer(E4M3, 1, 128)),              # 2 x 2 programs
        (200, 128, Quantizer(E4M3, 128, 128), None),                               # ragged last weight block
        (256, 128, Quantizer(E5M2, 1, 64), Quantizer(E5M2, 1, 64)),                # 1 x 64 tiles, E5M2
        (17, 48, Quantizer(E2M1, 1, 16, "nvfp4"), None),
    ]
    checked = 0
    for rows, cols, q, q_t in cases:
        if device == "cuda" and not supports(q, q_t):     # 2-D weight blocks take the PyTorch path on GPUs
            continue
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, cols, generator=generator) * torch.exp2(torch.randint(-10, 10, (rows, cols), generator=generator).float())
            x[0, :16] = 0.0                                   # an all-zero block
            x[1] = tiny_normals(cols, generator)             # tiny blocks: no Inf inverse scale
            x[1, ::7] = 0.0                                   # 0 x Inf was the NaN
            x = x.to(device, dtype)
            got, got_t = quantize_blocks_triton(x, q, q_t)
            pairs = [(got, quantize_reference(x, q))] + ([(got_t, quantize_reference(x.t(), q_t))] if q_t else [])
            for a, b in pairs:
                assert a.data.shape == b.data.shape and a.scale.shape == b.scale.shape, (a.scale.shape, b.scale.shape)
                assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), (rows, cols, q)
                assert torch.equal(a.scale, b.scale), (rows, cols, q)
                assert torch.isfinite(a.data.float()).all() and torch.isfinite(a.scale).all(), (rows, cols, q)
                # NVFP4's tensor scale G travels with the operand (the prescaled block GEMM needs it); others: none
                assert (a.gain is None) == (b.gain is None) == (q.scale_rule != "nvfp4"), (rows, cols, q)
                if a.gain is not None:
                    assert torch.equal(a.gain, b.gain), (rows, cols, q)
                    # bf16(scale * G) is the E4M3 block scale, for every block holding a nonzero value (all-zero
                    # blocks carry scale 1, which multiplies only zeros)
                    e4m3 = (a.scale * a.gain).to(torch.bfloat16).float()
                    nonzero = a.data.float().reshape(*a.scale.shape, -1).abs().amax(-1) > 0
                    assert torch.equal(e4m3[nonzero], e4m3.to(torch.float8_e4m3fn).float()[nonzero]), (rows, cols, q)
            # stochastic rounding (gradients): the same noise gives the reference's values bit for bit
            noise = torch.rand(rows, cols, generator=generator).to(device)
            stochastic = quantize_blocks_triton(x, q, None, noise)[0]
            want = quantize_reference(x, q, noise)
            assert torch.equal(stochastic.data.view(torch.uint8), want.data.view(torch.uint8)), (rows, cols, q, "SR")
            assert torch.equal(stochastic.scale, want.scale), (rows, cols, q, "SR")
            assert not torch.equal(stochastic.data.view(torch.uint8), got.data.view(torch.uint8)), "noise unused"
            checked += 1
    bad = torch.ones(32, 32, device=device)
    bad[1, 1] = float("inf")
    expect_non_finite(lambda: quantize_blocks_triton(bad, Quantizer(E2M1, 1, 16, "nvfp4"), None), device, "Inf amax")
    bad[1, 1] = float("nan")        # block amaxes propagate a NaN (not turned into Inf first): still reported
    for q in (Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E4M3, 1, 32)):
        expect_non_finite(lambda: quantize_blocks_triton(bad, q, q), device, f"NaN amax {q}")
    print(f"OK blocks {checked}")


def check_block_kernel_tma_store(device: str = "cpu") -> None:
    """x^T_q stored by TMA (quantize_blocks_triton.TMA_TRANSPOSED, a transposed tile through a tensor descriptor)
    equals the reference bit for bit, as the pointer store does: FP4 pairs (one launch), 1 x b fp8 pairs (split
    launches, x^T's side alone), tiles past the tensor's edge (clipped)."""
    from lowbit.kernels import quantize_blocks_triton as blocks
    from lowbit.precision.formats import E2M1, E4M3, E5M2
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(2)
    cases = [(48, 80, Quantizer(E2M1, 1, 16, "nvfp4")), (32, 96, Quantizer(E2M1, 1, 32, "pow2")),
             (96, 160, Quantizer(E2M1, 1, 32, "pow2")), (32, 64, Quantizer(E4M3, 1, 32)),
             (128, 384, Quantizer(E4M3, 1, 128)), (256, 128, Quantizer(E5M2, 1, 64))]
    blocks.TMA_TRANSPOSED = True
    try:
        for rows, cols, q in cases:
            assert blocks.use_tma_store(torch.empty(rows, cols, device=device), 16), (rows, cols)
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(rows, cols, generator=generator) * 4).to(device, dtype)
                got_t = blocks.quantize_blocks_triton(x, q, q)[1]
                want = quantize_reference(x.t(), q)
                assert torch.equal(got_t.data.view(torch.uint8), want.data.view(torch.uint8)), (rows, cols, q)
                assert torch.equal(got_t.scale, want.scale), (rows, cols, q)
    finally:
        blocks.TMA_TRANSPOSED = False
    print(f"OK tma {len(cases)}")


def nvfp4_scale_edge_blocks() -> torch.Tensor:
    """x [R, 128] whose 1 x 16 blocks put amax * G / 6 (G = 1: the tensor amax is 2688 = 448 * 6) on every E4M3
    grid point and tie and their float32 neighbours, through E4M3's subnormals, below its smallest value and at 448:
    where the block scale's rounding (the kernel's float8 cast on GPUs, integer steps under the interpreter) can
    differ from the reference's."""
    from lowbit.precision.formats import E4M3, grid_values
    grid = grid_values(E4M3).float()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([2.0 ** -10, 2.0 ** -12, 1e-6])]) * 6
    around = torch.cat([points, torch.nextafter(points, torch.full_like(points, float("inf"))),
                        torch.nextafter(points, torch.zeros_like(points))])
    amax = torch.cat([torch.tensor([2688.0]), around[(around > 0) & (around <= 2688)]])
    amax = amax.repeat(2)[:amax.numel() + -amax.numel() % 128]       # 128 blocks per 16 rows (x^T's blocks)
    blocks = torch.rand(amax.numel(), 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    blocks = blocks * amax[:, None] * 0.99
    blocks[:, 0] = amax
    return blocks.reshape(-1, 128)


def check_nvfp4_scale_edges(device: str = "cpu") -> None:
    from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer, quantize_reference

    x = nvfp4_scale_edge_blocks().to(device)
    q = Quantizer(E2M1, 1, 16, "nvfp4")
    got, got_t = quantize_blocks_triton(x, q, q)
    for a, b in ((got, quantize_reference(x, q)), (got_t, quantize_reference(x.t(), q))):
        same = a.scale.view(torch.int32) == b.scale.view(torch.int32)
        assert same.all(), (a.scale[~same][:8], b.scale[~same][:8])
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    print(f"OK nvfp4 scales {got.scale.numel()}")


def test_nvfp4_block_scales_at_e4m3_ties_equal_reference_under_interpreter():
    run_under_interpreter("check_nvfp4_scale_edges", "OK nvfp4 scales")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvfp4_block_scales_at_e4m3_ties_on_gpu():
    """On GPUs the block scale is rounded by the float8 cast and inverted by rcp.rn (quantize_blocks_triton's
    GPU_MATH): the same bits as the reference's integer rounding and IEEE division."""
    check_nvfp4_scale_edges("cuda")


@pytest.mark.slow
def test_block_kernel_tma_store_equals_reference_under_interpreter():
    run_under_interpreter("check_block_kernel_tma_store", "OK tma 6")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper or newer GPU (TMA)")
def test_block_kernel_tma_store_on_gpu():
    check_block_kernel_tma_store("cuda")


@pytest.mark.slow
def test_triton_block_quantize_equals_reference_bitwise_under_interpreter():
    run_under_interpreter("check_block_kernel_equals_reference", "OK blocks 22")


def check_block_kernel_philox(device: str = "cpu") -> None:
    """Stochastic rounding by the kernel's own Philox noise (quantize_blocks_triton(seed=)): every value is one of
    its two neighbouring grid points (the reference's rounding with noise 0 and with noise just below 1), the scales
    are the reference's, one seed repeats, and over 128 seeds each value rounds up about as often as its distance
    from the lower point says (unbiased). NVFP4 1 x 16 and MXFP4 1 x 32 (the gradients' stochastic recipes)."""
    from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(1)
    for q in (Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 32, "pow2")):
        x = (torch.randn(24, 64, generator=generator) * 3).to(device)
        down = quantize_reference(x, q, torch.zeros(x.shape, device=device))
        up = quantize_reference(x, q, torch.full(x.shape, 1 - 2 ** -24, device=device))
        lo, hi = down.dequantize().double(), up.dequantize().double()
        value = x.double()
        seeds = [torch.tensor([s], device=device, dtype=torch.int64) for s in range(128)]
        rounded_up = torch.zeros(x.shape, dtype=torch.float64, device=device)
        for seed in seeds:
            got = quantize_blocks_triton(x, q, None, seed=seed)[0]
            assert torch.equal(got.scale, down.scale), q
            deq = got.dequantize().double()
            assert ((deq == lo) | (deq == hi)).all(), (q, "a value off its two neighbouring grid points")
            rounded_up += (deq == hi) & (hi != lo)
        again = quantize_blocks_triton(x, q, None, seed=seeds[5])[0]
        assert torch.equal(again.data.view(torch.uint8), quantize_blocks_triton(x, q, None, seed=seeds[5])[0]
                           .data.view(torch.uint8)), "one seed, two results"
        between = hi != lo
        want = ((value - lo) / (hi - lo))[between]            # P(round up) for an unbiased rounding
        share = rounded_up[between] / len(seeds)
        assert between.sum() > 500, between.sum()
        assert (share - want).abs().mean() < 0.06 and abs((share - want).mean()) < 0.01, \
            ((share - want).abs().mean().item(), (share - want).mean().item())
    print("OK philox")


@pytest.mark.slow
def test_triton_block_quantize_philox_rounding_is_unbiased_under_interpreter():
    run_under_interpreter("check_block_kernel_philox", "OK philox")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_block_quantize_philox_rounding_on_gpu():
    check_block_kernel_philox("cuda")


def check_hadamard_transpose(device: str = "cpu") -> None:
    """hadamard_transpose_triton(t, D H / sqrt(n)) against the float64 product of t^T's blocks with the transform:
    float32 to 2e-6, bf16 within one bf16 rounding (the interpreter's float32 -> bf16 cast truncates), for n = 16,
    32 and tokens not a multiple of the kernel's tile; hadamard_last_axis (the CPU path) agrees the same way. The amax
    from the same pass is max |result| exactly (NaN as Inf), and NVFP4 quantization given it equals the block
    kernel with its own amax pass."""
    from lowbit.kernels.hadamard_triton import hadamard_transpose_triton
    from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton
    from lowbit.precision.formats import E2M1
    from lowbit.precision.methods import hadamard_last_axis, hadamard_matrix, hadamard_transposed
    from lowbit.precision.scaling import Quantizer

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(2)
    for size, rows, cols in ((16, 96, 80), (32, 160, 48)):
        signs = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
        transform = hadamard_matrix(size, signs).to(device)
        for dtype in (torch.float32, torch.bfloat16):
            t = (torch.randn(rows, cols, generator=generator) * 3).to(device, dtype)
            want = (t.double().t().reshape(cols, rows // size, size) @ transform.double()).reshape(cols, rows)
            got, amax = hadamard_transpose_triton(t, transform)
            assert got.shape == (cols, rows) and got.is_contiguous() and got.dtype == dtype
            assert torch.equal(amax, got.float().abs().max().reshape(1)), "the fused amax is not max |result|"
            tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
            torch.testing.assert_close(got.double(), want, **tol)
            torch.testing.assert_close(hadamard_last_axis(t.t(), transform).double(), want, **tol)
            if device == "cuda":    # as compiled layers run it: Dynamo traces the launch into the graph (no custom
                # op, no graph break) and Inductor's wrapper calls it, same bits (the interpreter cannot trace: it
                # runs kernels on real storage)
                for fn in (hadamard_transpose_triton, hadamard_transposed):
                    traced = torch.compile(fn, fullgraph=True)(t, transform)
                    difference = (traced[0].float() - got.float()).abs().max().item()
                    assert torch.equal(traced[0], got) and torch.equal(traced[1], amax), \
                        (fn.__name__, size, dtype, difference, traced[1], amax)
        # NVFP4 quantization of the result with the kernel's amax equals it with the block kernel's own amax pass
        q = Quantizer(E2M1, 1, 16, "nvfp4")
        own, given = (quantize_blocks_triton(got, q, None, **extra)[0] for extra in ({}, {"tensor_amax": amax}))
        assert torch.equal(own.data.view(torch.uint8), given.data.view(torch.uint8))
        assert torch.equal(own.scale, given.scale) and torch.equal(own.gain, given.gain)
    bad = torch.ones(32, 64, device=device)
    bad[3, 5] = float("nan")
    assert hadamard_transpose_triton(bad, transform)[1].item() == float("inf"), "NaN lost in the fused amax"
    print("OK hadamard")


@pytest.mark.slow
def test_hadamard_transpose_kernel_equals_float64_under_interpreter():
    run_under_interpreter("check_hadamard_transpose", "OK hadamard")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hadamard_transpose_kernel_on_gpu():
    check_hadamard_transpose("cuda")


def check_block_kernel_in_one_launch() -> None:
    """The same cases with 1 x b pairs in one launch for both sides (quantize_blocks_triton.SPLIT_PAIRS off)."""
    from lowbit.kernels import quantize_blocks_triton
    quantize_blocks_triton.SPLIT_PAIRS = False
    check_block_kernel_equals_reference()


@pytest.mark.slow
def test_triton_block_quantize_in_one_launch_equals_reference_under_interpreter():
    run_under_interpreter("check_block_kernel_in_one_launch", "OK blocks 22")


def check_block_kernel_tiles() -> None:
    """FP4 block pairs (NVFP4 1 x 16, MXFP4 1 x 32) under tiles other than the defaults (quantize_blocks_triton.TILE,
    what bench/quantize.py's block sweep times), split and in one launch, bit for bit the reference; a tile that
    cuts a block is refused."""
    from lowbit.kernels import quantize_blocks_triton as blocks
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(1)
    checked = 0
    for q in (Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 32, "pow2")):
        x = (torch.randn(96, 160, generator=generator)
             * torch.exp2(torch.randint(-8, 8, (96, 160), generator=generator).float())).to(torch.bfloat16)
        for tile in ((32, 32, 4), (128, 32, 4), (32, 64, 8)):
            for split in (True, False):
                blocks.TILE, blocks.SPLIT_PAIRS = tile, split
                got, got_t = blocks.quantize_blocks_triton(x, q, q)
                for a, b in ((got, quantize_reference(x, q)), (got_t, quantize_reference(x.t(), q))):
                    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), (q, tile, split)
                    assert torch.equal(a.scale, b.scale), (q, tile, split)
                checked += 1
    blocks.TILE = (16, 16, 4)
    try:
        blocks.quantize_blocks_triton(x, Quantizer(E2M1, 1, 32, "pow2"), None)
        raise AssertionError("a 16 x 16 tile cut 1 x 32 blocks")
    except ValueError as error:
        assert "TILE=(16, 16, 4) does not hold whole blocks (1 x 32" in str(error), error
    print(f"OK tiles {checked}")


@pytest.mark.slow
def test_triton_block_quantize_under_other_tiles_equals_reference_under_interpreter():
    run_under_interpreter("check_block_kernel_tiles", "OK tiles 12")


def check_block_kernel_persistent(device: str = "cpu") -> None:
    """FP4 block pairs by the persistent kernel (quantize_blocks_triton.PAIR_PROGRAMS_PER_SM: a fixed grid whose
    programs walk the tiles, loading ahead into registers, through Triton's pipeliner, or not), bit for bit the
    reference: partial tiles, more programs than tiles, outliers, NVFP4's tensor scale, and a non-finite block
    reported by its NaN scale."""
    from lowbit.kernels import quantize_blocks_triton as blocks
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(2)
    checked = 0
    saved = blocks.PAIR_PROGRAMS_PER_SM, blocks.PAIR_PREFETCH
    try:
        for q in (Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 32, "pow2")):
            # on a GPU (132 SMs) also a shape with more tiles than programs, so that programs walk several tiles
            for rows, cols in ((96, 160), (32, 128), (160, 96)) + (((1056, 4000),) if device == "cuda" else ()):
                x = (torch.randn(rows, cols, generator=generator)
                     * torch.exp2(torch.randint(-8, 8, (rows, cols), generator=generator).float())).to(torch.bfloat16)
                x[3, 5:9] *= 80.0
                x = x.to(device)
                want = quantize_reference(x, q), quantize_reference(x.t(), q)
                for per_sm, prefetch in ((1, 1), (3, 1), (2, 0), (2, 3)):
                    blocks.PAIR_PROGRAMS_PER_SM, blocks.PAIR_PREFETCH = per_sm, prefetch
                    for a, b in zip(blocks.quantize_blocks_triton(x, q, q), want):
                        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), (q, rows, per_sm)
                        assert torch.equal(a.scale, b.scale), (q, rows, per_sm)
                        assert (a.gain is None) == (b.gain is None) and (a.gain is None or torch.equal(a.gain, b.gain))
                    checked += 1
            bad = torch.ones(64, 128, device=device, dtype=torch.bfloat16)
            bad[40, 100] = float("inf")
            expect_non_finite(lambda: blocks.quantize_blocks_triton(bad, q, q), device, "operand")
    finally:
        blocks.PAIR_PROGRAMS_PER_SM, blocks.PAIR_PREFETCH = saved
    print(f"OK persistent {checked}")


@pytest.mark.slow
def test_persistent_fp4_pair_kernel_equals_reference_under_interpreter():
    run_under_interpreter("check_block_kernel_persistent", "OK persistent 24")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_persistent_fp4_pair_kernel_on_gpu():
    check_block_kernel_persistent("cuda")


def test_square_block_pair_is_one_quantization_transposed():
    """The PyTorch path of a b x b block pair (fp8_blockwise's weights) quantizes x once and transposes data and
    scales (lowbit.kernels.quantize.transposes_blocks): bit for bit what quantizing x^T on its own gives, eager and
    under torch.compile; a ragged x^T still raises the reference's error; 1 x b tiles still quantize x^T on their own."""
    from lowbit.kernels.quantize import quantize_pair, transposes_blocks
    from lowbit.precision.formats import E4M3, E5M2
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 96, generator=generator) * torch.exp2(torch.randint(-9, 9, (64, 96), generator=generator).float())
    x[:32, :32] = 0.0                                  # an all-zero block
    x[40, :7] = tiny_normals(7, generator)
    cases = [(Quantizer(E4M3, 32, 32), True), (Quantizer(E5M2, 32, 32, "pow2"), True), (Quantizer(E4M3, 1, 32), False),
             (Quantizer(E4M3, 16, 16), True)]
    compiled = torch.compile(lambda t, q: [(a.data, a.scale) for a in quantize_pair(t, q, q)], backend="aot_eager")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for q, square in cases:
            assert transposes_blocks(q, q) == square, q
            want = [quantize_reference(xd, q), quantize_reference(xd.t(), q)]
            for got in (quantize_pair(xd, q, q), [SimpleNamespace(data=d, scale=s) for d, s in compiled(xd, q)]):
                for a, b in zip(got, want):
                    assert torch.equal(a.data.contiguous().view(torch.uint8), b.data.contiguous().view(torch.uint8)), q
                    assert torch.equal(a.scale, b.scale), (q, dtype)
            assert quantize_pair(xd, q, q)[1].data.is_contiguous()       # K-contiguous for the block GEMM
    assert not transposes_blocks(Quantizer(E4M3, 32, 32), Quantizer(E5M2, 32, 32))
    with pytest.raises(ValueError, match="128"):
        quantize_pair(torch.randn(200, 128), Quantizer(E4M3, 128, 128), Quantizer(E4M3, 128, 128))


def test_tensorwise_pair_shares_one_scale_and_equals_two_quantizations():
    """The PyTorch path of a tensorwise pair quantizes once and transposes (lowbit.kernels.quantize.shares_scale):
    bit for bit what quantizing x and x^T separately gives, eager and under torch.compile; pairs whose sides differ
    in format, rule or scale span still quantize x^T on its own."""
    from lowbit.kernels.quantize import quantize_pair, shares_scale
    from lowbit.precision.formats import E4M3, E5M2
    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(37, 50, generator=generator) * torch.exp2(torch.randint(-9, 9, (37, 50), generator=generator).float())
    x[4] = 0.0
    x[5, :7] = tiny_normals(7, generator)
    cases = [(Quantizer(E4M3, 0, 0), Quantizer(E4M3, 0, 0), True), (Quantizer(E5M2, 0, 0), Quantizer(E5M2, 0, 0), True),
             (Quantizer(E4M3, 0, 0, "pow2"), Quantizer(E4M3, 0, 0, "pow2"), True),
             (Quantizer(E4M3, 0, 0), Quantizer(E5M2, 0, 0), False), (Quantizer(E4M3, 1, 0), Quantizer(E4M3, 1, 0), False),
             (Quantizer(E4M3, 0, 0), Quantizer(E4M3, 0, 0, "pow2"), False)]
    compiled = torch.compile(lambda t, q, q_t: [(a.data, a.scale) for a in quantize_pair(t, q, q_t)], backend="aot_eager")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for q, q_t, shared in cases:
            assert shares_scale(q, q_t) == shared, (q, q_t)
            want = [quantize_reference(xd, q), quantize_reference(xd.t(), q_t)]
            got = quantize_pair(xd, q, q_t)
            for a, b in zip(got, want):
                assert a.quantizer == b.quantizer and a.data.shape == b.data.shape and a.data.stride() == b.data.stride()
                assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), (q, q_t, dtype)
                assert torch.equal(a.scale, b.scale), (q, q_t, dtype)
            for (data, scale), b in zip(compiled(xd, q, q_t), want):
                assert torch.equal(data.contiguous().view(torch.uint8), b.data.contiguous().view(torch.uint8))
                assert torch.equal(scale, b.scale)


def test_operands_past_32_bit_offsets_take_the_reference_path():
    """The Triton quantize kernels index elements with 32-bit offsets: an operand of 2^31 elements or more goes to
    the PyTorch reference (same numerics); one just below still takes the kernels (shapes only: meta tensors)."""
    from lowbit.kernels import quantize_triton
    from lowbit.kernels.quantize import MAX_KERNEL_ELEMENTS, triton_kind
    from lowbit.precision.formats import E2M1, E4M3
    from lowbit.precision.scaling import Quantizer

    if not quantize_triton.AVAILABLE:
        pytest.skip("triton is not installed")
    big = torch.empty(2 ** 16, MAX_KERNEL_ELEMENTS // 2 ** 16, device="meta", dtype=torch.bfloat16)
    below = torch.empty(2 ** 16, MAX_KERNEL_ELEMENTS // 2 ** 16 - 1, device="meta", dtype=torch.bfloat16)
    for q, kind in ((Quantizer(E4M3, 1, 0), "rows"), (Quantizer(E4M3, 0, 0), "rows"),
                    (Quantizer(E2M1, 1, 16, "nvfp4"), "blocks")):
        assert triton_kind(big, q, q) is None, q
        assert triton_kind(below, q, q) == kind, q
