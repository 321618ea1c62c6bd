"""AWQ-style clipping search: Gram-based errors equal direct float64 output errors; the search lowers them."""
import pytest
import torch

from lowbit.quant.clipping import calibrate_clipping, clip_errors, group_gram, search_ratios
from lowbit.quant.fake_quant import dequantize, from_groups, group_range, make_format, quantize, to_groups
from lowbit.quant.linear import FakeQuantLinear, attach_fake_quant
from tests.quant.tiny import tiny_llama


def direct_errors(weight, x, fmt, ratio):
    """float64 ||X_g (w_og - Q_r(w_og))||^2 per (row, group), by explicit slicing and matmul."""
    grouped = to_groups(weight, fmt)
    lo, hi = group_range(grouped, fmt)
    codes, params = quantize(grouped, lo * ratio, hi * ratio, fmt)
    delta = (weight - from_groups(dequantize(codes, params, fmt), weight.shape[1])).double()
    out = torch.empty(weight.shape[0], -(-weight.shape[1] // fmt.group_size), dtype=torch.float64)
    for g, start in enumerate(range(0, weight.shape[1], fmt.group_size)):
        cols = slice(start, start + fmt.group_size)
        out[:, g] = ((x.double()[:, cols] @ delta[:, cols].T) ** 2).sum(0)
    return out


def test_gram_errors_equal_direct_float64_output_errors():
    torch.manual_seed(0)
    fmt = make_format("int3", 32, partial_groups=True)
    weight, x = torch.randn(6, 80), torch.randn(50, 80)
    gram = group_gram(x, 80, fmt)
    x_padded = torch.cat([x, torch.zeros(50, 16)], 1).double()
    for g in range(3):
        torch.testing.assert_close(gram[g].double(), x_padded[:, 32 * g:32 * g + 32].T @ x_padded[:, 32 * g:32 * g + 32],
                                   rtol=1e-5, atol=1e-4)
    errors = clip_errors(weight, gram, fmt, [1.0, 0.7])
    for i, ratio in enumerate([1.0, 0.7]):
        torch.testing.assert_close(errors[i].double(), direct_errors(weight, x, fmt, ratio), rtol=1e-4, atol=1e-4)


def test_search_picks_the_best_ratio_and_beats_rtn_on_heavy_tailed_weights():
    torch.manual_seed(1)
    fmt = make_format("int2", 64)
    weight = torch.distributions.StudentT(2.0).sample((16, 256))            # outliers: clipping pays off
    calib, held = torch.randn(256, 256), torch.randn(256, 256)
    ratios = search_ratios(weight, group_gram(calib, 256, fmt), fmt, grid=20, max_shrink=0.5)
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0 and (ratios < 1).any()
    grid = [1.0 - k / 20 for k in range(11)]
    all_errors = clip_errors(weight, group_gram(calib, 256, fmt), fmt, grid)
    index = (torch.tensor(grid).view(-1, 1, 1) == ratios).float().argmax(0, keepdim=True)
    chosen = all_errors.gather(0, index)
    assert torch.equal(chosen[0], all_errors.min(0).values)

    def output_error(ratio):
        grouped = to_groups(weight, fmt)
        lo, hi = group_range(grouped, fmt)
        codes, params = quantize(grouped, lo * ratio, hi * ratio, fmt)
        return ((held @ (weight - from_groups(dequantize(codes, params, fmt), 256)).T) ** 2).mean().item()

    assert output_error(ratios) < 0.9 * output_error(torch.ones_like(ratios))   # held-out inputs, not the calibration


@pytest.mark.slow
def test_calibrate_sets_every_layer_and_keeps_the_float_forward_for_activations():
    model = tiny_llama()
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 32))
        float_logits = model(input_ids=ids).logits
    attach_fake_quant(model, make_format("int2", 64, partial_groups=True), ["*.layers.*"], ["*lm_head*"],
                      learnable_clip=True)
    with torch.no_grad():
        rtn_logits = model(input_ids=ids).logits
    summary = calibrate_clipping(model, [ids], grid=10, max_shrink=0.5)
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(summary) == len(layers) == 14 and all(bool(m.calibrated) and m.enabled for m in layers)
    for layer in layers:
        lo, hi = group_range(to_groups(layer.weight, layer.fmt), layer.fmt)
        torch.testing.assert_close(layer.clip_hi.data, hi * layer.clip_ratio)
        torch.testing.assert_close(layer.clip_lo.data, lo * layer.clip_ratio)
    with torch.no_grad():
        clipped_logits = model(input_ids=ids).logits
    assert (clipped_logits - float_logits).pow(2).mean() < (rtn_logits - float_logits).pow(2).mean()
