"""Rounding onto E4M3 / E5M2 / E2M1 equals a float64 nearest-value search exactly (RNE, saturation,
subnormals, signed zero, NaN) -- exhaustively over every grid value, every midpoint (ties) and its
neighbours, and many random values over the whole exponent range."""
import pytest
import torch

from lowbit.precision.formats import E2M1, E4M3, E5M2, cast_to_format, grid_values, round_to_format
from tests.precision.reference import round_float64

FORMATS = [E4M3, E5M2, E2M1]


def probe_values(fmt) -> torch.Tensor:
    grid = grid_values(fmt).float()
    mids = (grid[1:].double() + grid[:-1].double()) / 2
    mids = mids.float()
    assert torch.equal(mids.double(), (grid[1:].double() + grid[:-1].double()) / 2)   # ties are exact in fp32
    near = torch.cat([torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e30))])
    generator = torch.Generator().manual_seed(0)
    randoms = torch.exp2(torch.empty(200_000).uniform_(-30, 20, generator=generator)) * \
        torch.empty(200_000).uniform_(1, 2, generator=generator)
    specials = torch.tensor([0.0, fmt.max, fmt.max * 1.03, fmt.max * 2, 1e30, float("inf"), fmt.min_subnormal / 2,
                             fmt.min_subnormal * 0.5001, fmt.min_subnormal * 1.5, 1e-40, 1e-45])
    values = torch.cat([grid, mids, near, randoms, specials])
    return torch.cat([values, -values])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_to_format_equals_float64_nearest_even_search(fmt):
    x = probe_values(fmt)
    got = round_to_format(x, fmt)
    want = round_float64(x, fmt)
    bad = got.double() != want
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. x={x[bad][:5].tolist()} got={got[bad][:5].tolist()} want={want[bad][:5].tolist()}"
    assert torch.equal(torch.signbit(got), torch.signbit(x))          # signed zero kept
    assert got.abs().max() == fmt.max                                 # saturation, never Inf


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_grid_sizes_and_subnormals(fmt):
    grid = grid_values(fmt)
    expected = {"e4m3": 127, "e5m2": 124, "e2m1": 8}[fmt.name]       # non-negative finite codes (incl. 0)
    assert len(grid) == expected and grid[1] == fmt.min_subnormal and grid[-1] == fmt.max
    if fmt is E2M1:
        assert grid.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_agrees_with_torch_float8_cast_and_round_trips(fmt):
    x = probe_values(fmt)
    x = x[torch.isfinite(x)]
    got = round_to_format(x, fmt)
    assert torch.equal(got.to(fmt.storage).float(), got)                      # on the grid: storage is exact
    torch_cast = x.clamp(-fmt.max, fmt.max).to(fmt.storage).float()           # torch's own RNE cast
    assert torch.equal(torch_cast, got)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cast_to_format_equals_round_to_format_bit_for_bit(fmt):
    """The storage-dtype rounding quantize_reference uses (the float8 cast for E4M3 / E5M2, the grid rounding for
    E2M1) gives round_to_format's values bit for bit: every probe (grid, ties and their neighbours, random,
    saturating, Inf), signed zeros included, eagerly and as torch.compile builds it; NaN stays NaN (Inductor's CPU
    cast sets a NaN's sign bit)."""
    x = torch.cat([probe_values(fmt), torch.tensor([-float("inf"), -0.0, -1e-45])])
    want = round_to_format(x, fmt).to(fmt.storage).view(torch.uint8)
    compiled = torch.compile(cast_to_format, backend="aot_eager" if fmt is E2M1 else "inductor")
    for cast in (cast_to_format, compiled):
        assert torch.equal(cast(x, fmt).view(torch.uint8), want)
        assert torch.isnan(cast(torch.tensor([float("nan"), -float("nan")]), fmt).float()).all()


def test_e2m1_is_exact_in_e4m3_and_nan_propagates():
    grid = grid_values(E2M1).float()
    assert torch.equal(grid.to(torch.float8_e4m3fn).float(), grid)
    assert torch.isnan(round_to_format(torch.tensor([float("nan")]), E4M3)).all()


def test_stochastic_rounding_picks_neighbours_and_is_unbiased():
    x = torch.full((200_000,), 2.3)                # between E2M1 grid points 2 and 3
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    rounded = round_to_format(x, E2M1, noise=noise)
    assert set(rounded.unique().tolist()) == {2.0, 3.0}
    assert abs(rounded.mean().item() - 2.3) < 0.01
    assert torch.equal(round_to_format(torch.tensor([2.0, 6.0, 7.0]), E2M1, noise=torch.full((3,), 0.999)),
                       torch.tensor([2.0, 6.0, 6.0]))


def test_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        round_to_format(torch.ones(3, dtype=torch.bfloat16), E4M3)


def test_nvfp4_block_scales_follow_transformer_engine():
    """NVFP4's scales, rebuilt with numpy's float32 arithmetic and the float64 grid search: tensor scale
    g = 2688 / amax_tensor, stored block scale E4M3(amax_block * (g * fp32(1/6))) -- one product per block, as
    TransformerEngine computes it -- and the operand's scale that block scale / g; values within 1/2 E2M1 step."""
    import numpy as np

    from lowbit.precision.scaling import Quantizer, quantize_reference

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=generator) * torch.logspace(-3, 2, 64)     # blocks from tiny to large
    x[5, 17] = 300.0                                                              # the tensor's amax
    # block amaxes (first blocks, |x| < 0.1 elsewhere) whose scale lands within an ulp of an E4M3 tie: amax / 6 * g
    # (one more rounding) stores another block scale than amax * (g / 6) (found by a search over [4, 8))
    x[0, 3], x[1, 7], x[2, 12] = float.fromhex("0x1.214924p+2"), float.fromhex("0x1.36b6dcp+2"), \
        float.fromhex("0x1.972490p+2")
    got = quantize_reference(x, Quantizer(E2M1, 1, 16, "nvfp4"))
    f32 = np.float32
    g = f32(448.0 * 6.0) / f32(x.abs().max().item())
    block_amax = x.abs().reshape(24, 4, 16).amax(-1).numpy().astype(f32)
    stored = round_float64(torch.from_numpy(block_amax * (g * f32(1.0 / 6.0))), E4M3)
    want = torch.from_numpy(stored.float().numpy() * (f32(1.0) / g))
    assert torch.equal(got.scale, want)
    assert torch.equal(got.gain, torch.tensor([g]))
    half_gap = want.repeat_interleave(16, 1)          # E2M1's largest gap (4 -> 6) is 2 scales: round off <= 1 scale
    assert ((got.dequantize() - x).abs() <= half_gap).all()
