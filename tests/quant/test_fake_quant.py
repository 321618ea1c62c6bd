"""Per-group quantize/dequantize against a float64 reference for every format and group size; the STE's gradients."""
import pytest
import torch

from lowbit.quant.fake_quant import (E2M1_GRID, FORMATS, GROUP_SIZES, dequantize, fake_quantize, from_groups,
                                     group_range, make_format, num_groups, quantize, to_groups)


def reference_row_groups(w64: torch.Tensor, group_size: int):
    """Yield (row, column slice) of every group, partial last groups included (float64, no padding tricks)."""
    for row in range(w64.shape[0]):
        for start in range(0, w64.shape[1], group_size):
            yield row, slice(start, min(start + group_size, w64.shape[1]))


def reference_fake_quant(w64: torch.Tensor, name: str, group_size: int, ratio: float):
    """float64 (dequantized weights, codes, distance of each scaled weight to its nearest rounding boundary)."""
    out, codes, margin = torch.empty_like(w64), torch.empty_like(w64), torch.empty_like(w64)
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
    for row, cols in reference_row_groups(w64, group_size):
        g = w64[row, cols]
        if name.startswith("int"):
            qmax = 2 ** int(name[3:]) - 1
            lo, hi = g.min() * ratio, g.max() * ratio
            s = max((hi - lo).item() / qmax, 1e-8)
            z = torch.round(-lo / s)
            x = g.clamp(lo, hi) / s
            q = (torch.round(x) + z).clamp(0, qmax)
            out[row, cols], codes[row, cols] = (q - z) * s, q
            margin[row, cols] = ((x - x.floor()) - 0.5).abs()
            continue
        if name == "fp4_e2m1":
            amax = g.abs().max() * ratio
            s_pos = s_neg = max(amax.item() / 6, 1e-8)
            lo, hi = -amax, amax
        else:
            lo, hi = g.min().clamp(max=0) * ratio, g.max().clamp(min=0) * ratio
            s_pos, s_neg = max(hi.item() / 6, 1e-8), max(-lo.item() / 6, 1e-8)
        c = g.clamp(lo, hi)
        scale = torch.where(c < 0, torch.tensor(s_neg, dtype=torch.float64), torch.tensor(s_pos, dtype=torch.float64))
        x = (c.abs() / scale).clamp(max=6.0)
        distance = (x.unsqueeze(-1) - grid).abs()
        index = distance.argmin(-1)                          # first minimum: a tie goes to the smaller magnitude
        out[row, cols] = torch.where(c < 0, -grid[index], grid[index]) * scale
        codes[row, cols] = index + 8 * (c < 0)
        top2 = distance.topk(2, largest=False).values
        margin[row, cols] = top2[:, 1] - top2[:, 0]
    return out, codes, margin


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("ratio", [1.0, 0.8])
def test_quantize_dequantize_equals_float64_reference(name, group_size, ratio):
    torch.manual_seed(group_size)
    in_features = 2 * group_size + group_size // 2 + 3          # odd, with a partial last group
    weight = torch.randn(5, in_features) * torch.rand(5, 1) * 0.1
    weight[0, 0] = 0.0                                           # a zero, and a group with one sign only
    weight[1, :group_size] = weight[1, :group_size].abs()
    fmt = make_format(name, group_size, partial_groups=True)
    grouped = to_groups(weight, fmt)
    lo, hi = group_range(grouped, fmt)
    codes, params = quantize(grouped, lo * ratio, hi * ratio, fmt)
    ours = from_groups(dequantize(codes, params, fmt), in_features).double()
    ref, ref_codes, margin = reference_fake_quant(weight.double(), name, group_size, ratio)
    clear = margin > 1e-4                                        # float32 vs float64 may round a near-tie either way
    assert clear.float().mean() > 0.99
    assert torch.equal(from_groups(codes, in_features).double()[clear], ref_codes[clear])
    torch.testing.assert_close(ours[clear], ref[clear], rtol=1e-6, atol=1e-9)
    assert ours.unique().numel() <= num_groups(in_features, fmt) * 5 * 2 ** fmt.bits
    assert torch.equal(from_groups(fake_quantize(grouped, lo * ratio, hi * ratio, fmt), in_features), ours.float())


@pytest.mark.parametrize("name", FORMATS)
def test_ste_passes_gradient_inside_the_clip_range_only(name):
    torch.manual_seed(1)
    fmt = make_format(name, 32, partial_groups=True)
    weight = torch.randn(4, 80, requires_grad=True)
    grouped = to_groups(weight, fmt)
    lo, hi = group_range(grouped, fmt)
    lo, hi = lo * 0.7, hi * 0.7
    upstream = torch.randn(4, 80)
    (from_groups(fake_quantize(grouped, lo, hi, fmt), 80) * upstream).sum().backward()
    lo_e = from_groups(lo.unsqueeze(-1).expand_as(grouped), 80)
    hi_e = from_groups(hi.unsqueeze(-1).expand_as(grouped), 80)
    inside = (weight.detach() >= lo_e) & (weight.detach() <= hi_e)
    assert 0 < inside.float().mean() < 1
    assert torch.equal(weight.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_learnable_clip_gets_the_clamp_plus_lsq_gradient_int():
    """int4: d w_hat/d hi = 1[w > hi] + (round(x) - x) / qmax inside, with x = (clamp(w) - lo)/s ... in float64."""
    torch.manual_seed(2)
    fmt = make_format("int4", 32)
    weight = torch.randn(3, 64)
    grouped = to_groups(weight, fmt)
    lo0, hi0 = group_range(grouped, fmt)
    lo = (lo0 * 0.8).requires_grad_()
    hi = (hi0 * 0.8).requires_grad_()
    upstream = torch.randn_like(grouped)
    (fake_quantize(grouped, lo, hi, fmt) * upstream).sum().backward()
    w, l, h, g = grouped.double(), lo.detach().double()[..., None], hi.detach().double()[..., None], upstream.double()
    s = (h - l) / 15
    clipped = torch.where(w > h, h, torch.where(w < l, l, w))
    x = clipped / s
    residual = torch.round(x + torch.round(-l / s)) - torch.round(-l / s) - x   # round(x) - x with the zero point
    d_hi = (w > h).double() + residual / 15
    d_lo = (w < l).double() - residual / 15
    torch.testing.assert_close(hi.grad.double(), (g * d_hi).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lo.grad.double(), (g * d_lo).sum(-1), rtol=1e-4, atol=1e-5)


def test_bad_formats_and_group_sizes_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"objective.qat.format='int5' is not supported.*use 2, 3 or 4 bits"):
        make_format("int5", 128)
    with pytest.raises(ValueError, match="not supported"):
        make_format("fp3", 128)
    with pytest.raises(ValueError, match=r"objective.qat.group_size=48 is not supported.*\[32, 64, 128, 256\]"):
        make_format("int3", 48)
    with pytest.raises(ValueError, match="does not divide the layer's input dimension 576.*partial_groups=true"):
        num_groups(576, make_format("int3", 128))
    assert num_groups(576, make_format("int3", 128, partial_groups=True)) == 5
