"""QuantLinear of every recipe: forward and autograd backward equal float64 math on the same
quantized operands (to 1e-3 relative); master weights and state_dict stay those of nn.Linear."""
import math

import pytest
import torch

from lowbit.config import PrecisionConfig
from lowbit.precision.formats import get_format
from lowbit.precision.linear import QuantLinear, pad_rows, weight_parts
from lowbit.precision.methods import clamp_outliers, hadamard_last_axis, hadamard_matrix
from lowbit.precision.recipes import build_recipe
from lowbit.precision.scaling import NonFiniteAmaxError, Quantizer, quantize_reference
from tests.precision.reference import dge_float64

BASE = dict(grad_format="e4m3", dge=False, dge_k=5.0, dge_clip=3.0, occ=False, occ_quantile=0.99, occ_product="dense",
            occ_scope="tensor",
            stochastic_rounding=False, hadamard=False, hadamard_size=16, asymmetric=False, block_size=32,
            high_precision=[])

CASES = [
    ("fp8_tensorwise", {}), ("fp8_tensorwise", {"grad_format": "e5m2"}), ("fp8_rowwise", {}),
    ("fp8_rowwise", {"grad_format": "e5m2"}), ("fp8_blockwise", {}), ("fp4_vectorwise", {}),
    ("fp4_vectorwise", {"dge": True, "occ": True}), ("fp4_vectorwise", {"dge": True, "occ": True, "occ_product": "sparse"}),
    ("fp4_vectorwise", {"dge": True, "occ": True, "occ_scope": "token"}),
    ("fp4_vectorwise", {"dge": True, "occ": True, "occ_product": "fp8"}),
    ("fp4_vectorwise", {"occ": True, "occ_product": "fp8", "hadamard": True}), ("nvfp4", {"occ": True, "occ_product": "fp8"}),
    ("fp4_vectorwise", {"asymmetric": True, "dge": True}),
    ("fp4_vectorwise", {"hadamard": True}), ("nvfp4", {}), ("nvfp4", {"hadamard": True}), ("mxfp4", {}),
    # GEMMs left unquantized (precision.high_precision), the others as the recipe quantizes them
    ("fp8_rowwise", {"high_precision": ["wgrad"]}), ("fp8_tensorwise", {"high_precision": ["forward"]}),
    ("fp4_vectorwise", {"dge": True, "occ": True, "high_precision": ["dgrad", "wgrad"]}),
    ("nvfp4", {"high_precision": ["dgrad"]}),
]


E4M3_ROWS = Quantizer(get_format("e4m3"), 1, 0)     # occ_product=fp8: the residual, one absmax scale per row


def precision_cfg(recipe, **overrides):
    return PrecisionConfig(recipe=recipe, **{**BASE, **overrides})


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def reference_forward_backward(x, weight, bias, dy, recipe, signs):
    """Float64 reference of QuantLinear's quantized math (quantizers shared, GEMMs in float64; the GEMMs in
    recipe.high_precision on the unquantized operands)."""
    hp = recipe.high_precision
    deq = lambda t, q: quantize_reference(t, q).dequantize().double()
    x2 = x.reshape(-1, x.shape[-1])
    residual = torch.zeros_like(x2, dtype=torch.float64)
    if recipe.occ:                    # the quantile is over the tokens, before any padding
        x2, sparse = clamp_outliers(x2, recipe.occ_quantile, product="dense" if recipe.occ_scope == "token" else "sparse",
                                    scope=recipe.occ_scope)
        residual = sparse.to_dense(x2.shape[1]).double()
    x2 = pad_rows(x2, recipe.token_multiple)
    residual = pad_rows(residual, recipe.token_multiple)
    dense_residual = residual.float()
    if recipe.occ_product == "fp8":  # the residual rounded to E4M3 per token for the forward GEMM (wgrad's below)
        residual = deq(dense_residual, E4M3_ROWS)
    parts = weight_parts(weight.detach(), recipe.asymmetric)
    w_hat = sum(deq(p, recipe.w) for p in parts)
    wt_hat = sum(deq(p.t(), recipe.w_t) for p in parts)
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    if "forward" in hp:
        y = (x2.double() @ weight.detach().double().t())[:tokens] + bias.double()
    else:
        y = ((deq(x2, recipe.x) + residual) @ w_hat.t())[:tokens] + bias.double()
    dy2 = pad_rows(dy.reshape(-1, dy.shape[-1]), recipe.token_multiple)
    if "dgrad" in hp:
        dx = (dy2.double() @ weight.detach().double())[:tokens]
    else:
        dx = (deq(dy2, recipe.dy) @ wt_hat.t())[:tokens]
    xt, dyt = x2.t(), dy2.t()
    if recipe.hadamard:
        transform = hadamard_matrix(recipe.hadamard, signs)
        xt, dyt = hadamard_last_axis(xt, transform), hadamard_last_axis(dyt, transform)
    if recipe.occ_product == "fp8":     # R^T per input channel, transformed along the tokens as x^T is
        rt = dense_residual.t() if not recipe.hadamard else hadamard_last_axis(dense_residual.t(), transform)
        residual_t = deq(rt.contiguous(), E4M3_ROWS)
    if "wgrad" in hp:
        dw = dyt.double() @ xt.double().t() + dy2.double().t() @ residual
    elif recipe.occ_product == "fp8":
        dw = deq(dyt.contiguous(), recipe.dy_t) @ (deq(xt.contiguous(), recipe.x_t) + residual_t).t()
    else:
        dw = deq(dyt.contiguous(), recipe.dy_t) @ deq(xt.contiguous(), recipe.x_t).t() + dy2.double().t() @ residual
    if recipe.dge:
        w = weight.detach().double()
        scales = [quantize_reference(p, recipe.w).scale.double() for p in parts]
        scale = scales[0] if len(scales) == 1 else torch.where(w >= 0, scales[0], scales[1])
        scale = scale.expand_as(w) if scale.shape[-1] == 1 else scale.repeat_interleave(w.shape[1] // scale.shape[1], 1)
        dw = dw * dge_float64(w / scale, recipe.w.fmt, recipe.dge_k, recipe.dge_clip)
    return y, dx, dw, dy2.double()[:tokens].sum(0)


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}" for n, o in CASES])
def test_forward_and_backward_equal_float64_reference(name, options):
    torch.manual_seed(0)
    recipe = build_recipe(precision_cfg(name, **options))
    linear = torch.nn.Linear(64, 96)
    layer = QuantLinear.from_linear(linear, recipe, name="layer", seed=3)
    x = (torch.randn(3, 7, 64) * torch.logspace(-2, 1, 64)).requires_grad_()     # odd token count, outlier channels
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    want_y, want_dx, want_dw, want_db = reference_forward_backward(x.detach(), linear.weight, linear.bias, dy,
                                                                   recipe, layer.hadamard_signs)
    assert y.dtype == torch.float32 and y.shape == (3, 7, 96)
    assert relative_error(y.reshape(-1, 96), want_y) < 1e-3
    assert relative_error(x.grad.reshape(-1, 64), want_dx) < 1e-3
    assert relative_error(linear.weight.grad, want_dw) < 1e-3
    assert relative_error(linear.bias.grad, want_db) < 1e-5
    assert linear.weight.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    # the quantized layer stays close to the high-precision one (FP8 ~ few %, FP4 ~ 20 %)
    exact = linear(x.detach())
    assert (y - exact).norm() / exact.norm() < (0.06 if name.startswith("fp8") else 0.3)


def test_high_precision_gemm_runs_in_the_autocast_dtype_and_conflicts_fail_clearly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp8_rowwise", high_precision=["forward"])))
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert y.dtype == want.dtype == torch.bfloat16
    assert relative_error(y.float(), want.double()) < 1e-2          # nn.Linear's bf16 GEMM, up to the bias rounding
    for options, message in [({"high_precision": ["backward"]}, r"\['backward'\] are not GEMMs"),
                             ({"high_precision": ["forward", "dgrad", "wgrad"]}, "use precision=bf16"),
                             ({"high_precision": ["forward"], "occ": True}, "occ=true acts on the quantized forward"),
                             ({"high_precision": ["wgrad"], "hadamard": True}, "precision.hadamard=true acts on")]:
        with pytest.raises(ValueError, match=message):
            build_recipe(precision_cfg("fp4_vectorwise", **options))


def test_gradient_format_is_used_for_gradients_only():
    recipe = build_recipe(precision_cfg("fp8_rowwise", grad_format="e5m2"))
    assert recipe.dy.fmt is get_format("e5m2") and recipe.dy_t.fmt is get_format("e5m2")
    assert recipe.x.fmt is get_format("e4m3") and recipe.w.fmt is get_format("e4m3")


def test_state_dict_matches_nn_linear_and_parameters_are_shared():
    linear = torch.nn.Linear(32, 16)
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp8_rowwise")))
    assert layer.weight is linear.weight
    assert list(layer.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]


def test_hadamard_size_outside_the_kernel_is_logged(caplog):
    """A transform size the fused kernel does not take (16..64) is a documented fallback, logged at recipe build."""
    with caplog.at_level("WARNING", logger="lowbit.precision.recipes"):
        build_recipe(precision_cfg("nvfp4", hadamard=True, hadamard_size=128))
    assert "precision.hadamard_size=128: the fused Hadamard kernel takes 16..64" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowbit.precision.recipes"):
        build_recipe(precision_cfg("nvfp4", hadamard=True, hadamard_size=16))
    assert "hadamard_size" not in caplog.text


@pytest.mark.parametrize("size", [2, 16, 32])
def test_hadamard_transform_equals_the_float64_matrix_product(size):
    """hadamard_last_axis (float32) equals t @ (D H / sqrt(size)) per block in float64, with H built independently, and is
    orthogonal: (dy^T Q)(x^T Q)^T = dy^T x, what the weight gradient relies on."""
    generator = torch.Generator().manual_seed(size)
    signs = torch.randint(0, 2, (size,), generator=generator) * 2 - 1
    transform = hadamard_matrix(size, signs)
    plain = torch.ones(1, 1, dtype=torch.float64)
    while plain.shape[0] < size:                             # Sylvester's construction, independently
        plain = torch.cat([torch.cat([plain, plain], 1), torch.cat([plain, -plain], 1)], 0)
    exact = signs.double().reshape(-1, 1) * plain / size ** 0.5
    dyt, xt = torch.randn(6, 3 * size, generator=generator), torch.randn(5, 3 * size, generator=generator)
    got = hadamard_last_axis(dyt, transform)
    want = (dyt.double().reshape(6, 3, size) @ exact).reshape(6, -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double() @ hadamard_last_axis(xt, transform).double().t(),
                               dyt.double() @ xt.double().t(), rtol=1e-5, atol=1e-5)
    assert hadamard_last_axis(dyt.bfloat16(), transform).dtype == torch.bfloat16


@pytest.mark.parametrize("name,asymmetric", [("fp4_vectorwise", False), ("fp4_vectorwise", True), ("nvfp4", False),
                                              ("mxfp4", False)])
def test_dge_kernel_equals_float64(name, asymmetric):
    """The DGE weight gradient as one Triton kernel (what eager CUDA backward passes run; here the interpreter) and
    as PyTorch ops both equal dw * f'(W / s) in float64: per-channel scales (and AFPQ's per-sign ones), 16- and
    32-element block scales, rows not a multiple of the block."""
    from lowbit.kernels.dge_triton import dge_weight_gradient_triton
    from lowbit.kernels.quantize import quantize_reference
    from lowbit.precision.linear import dge_weight_gradient
    from lowbit.precision.scaling import expand_scale

    recipe = build_recipe(precision_cfg(name, dge=True, asymmetric=asymmetric))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"      # the kernel takes CUDA tensors (or the interpreter)
    for rows, cols in ((48, 64), (37, 96)):
        weight, dw = torch.randn(rows, cols, device=device), torch.randn(rows, cols, device=device)
        parts = weight_parts(weight, asymmetric)
        scales = [quantize_reference(p, recipe.w).scale for p in parts]
        full = [expand_scale(s, recipe.w, weight.shape).expand_as(weight) for s in scales]
        scale = full[0] if len(full) == 1 else torch.where(weight >= 0, full[0], full[1])
        want = dw.double().cpu() * dge_float64((weight.double() / scale.double()).cpu(), recipe.w.fmt, recipe.dge_k,
                                               recipe.dge_clip)
        for fn in (dge_weight_gradient, dge_weight_gradient_triton):
            got = fn(dw, weight, scales, recipe.w, recipe.dge_k, recipe.dge_clip)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
        bf16 = weight.bfloat16()             # bf16 master weights: the kernel reads them as they are
        torch.testing.assert_close(dge_weight_gradient_triton(dw, bf16, scales, recipe.w, recipe.dge_k, recipe.dge_clip),
                                   dge_weight_gradient(dw, bf16, scales, recipe.w, recipe.dge_k, recipe.dge_clip),
                                   rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_and_no_bias():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp4_vectorwise", dge=True)))
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and linear.weight.grad.dtype == torch.float32


def test_stochastic_rounding_gradients_are_unbiased_on_average():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    recipe = build_recipe(precision_cfg("nvfp4", stochastic_rounding=True))
    layer = QuantLinear.from_linear(linear, recipe)
    x, dy = torch.randn(32, 64), torch.randn(32, 32)
    grads = []
    for _ in range(40):
        linear.weight.grad = None
        layer(x).backward(dy)
        grads.append(linear.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])                    # really random
    exact = dy.t() @ quantize_reference(x.t(), recipe.x_t).dequantize().t()   # x^T is rounded to nearest
    mean_error = (torch.stack(grads).mean(0) - exact).norm() / exact.norm()
    single_error = (grads[0] - exact).norm() / exact.norm()
    assert mean_error < single_error / 4


def test_bad_inputs_fail_clearly():
    linear = torch.nn.Linear(64, 48)
    with pytest.raises(ValueError, match="not a multiple of the 32-element"):
        QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp8_blockwise")), name="mlp.up")
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp8_rowwise")), name="mlp.up")
    with pytest.raises(TypeError, match="float64 is not supported"):
        layer(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(NonFiniteAmaxError, match="NaN/Inf"):
        layer(torch.full((4, 64), float("inf")))
    with pytest.raises(ValueError, match="FP4 weights only"):
        build_recipe(precision_cfg("fp8_rowwise", dge=True))
    with pytest.raises(ValueError, match="not a quantized recipe"):
        build_recipe(precision_cfg("fp3"))
    with pytest.raises(ValueError, match="grad_format"):
        build_recipe(precision_cfg("fp8_rowwise", grad_format="e3m4"))


def test_quantization_statistics_match_direct_computation():
    from lowbit.precision.formats import E2M1
    from lowbit.precision.scaling import Quantizer
    from lowbit.precision.stats import collect, operand_stats

    x = torch.tensor([[6.0, 0.1, -3.0, 0.0], [1.0, 2.0, 0.04, -0.5]])
    quantized = quantize_reference(x, Quantizer(E2M1, 1, 0))          # row scales 1 and 1/3
    stats = operand_stats(x, quantized)
    dequantized = quantized.dequantize().double()
    sqnr = 10 * torch.log10(x.double().pow(2).sum() / (x.double() - dequantized).pow(2).sum())
    assert stats["absmax"] == 6.0 and stats["clamped"] == 0.0
    assert stats["flushed"] == 2 / 8                                  # 0.1 -> 0 and 0.04 -> 0
    assert abs(stats["sqnr_db"] - sqnr.item()) < 1e-4
    linear = torch.nn.Linear(4, 3)
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg("fp4_vectorwise", occ=True)), name="l")
    model = torch.nn.Sequential(layer)
    assert collect(model) == {}                                      # arms the layer
    model(torch.randn(200, 4))
    logged = collect(model)
    assert 0.0 < logged["quant/l/x/clamped"] <= 0.02 and logged["quant/l/w/clamped"] == 0.0
    assert set(logged) == {f"quant/l/{o}/{k}" for o in "xw" for k in ("absmax", "clamped", "flushed", "sqnr_db")}


def occ_layers(products):
    """fp4 vectorwise + DGE + OCC layers sharing one weight, one per OCC product; an input whose channel 7 is an
    outlier channel; step(layer, x) -> (y, dx, dW) for a fixed dy."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    layers = {product: QuantLinear.from_linear(linear, build_recipe(precision_cfg(
        "fp4_vectorwise", dge=True, occ=True, occ_quantile=0.95, occ_product=product)), name="l")
        for product in products}
    x = torch.randn(40, 64) * torch.logspace(-1, 1, 64)
    x[:, 7] *= 30.0
    dy = torch.randn(40, 48)

    def step(layer, x):
        x = x.detach().requires_grad_(True)
        y = layer(x)
        return (y, *torch.autograd.grad(y, (x, linear.weight), dy.to(y.dtype)))
    return layers, x, step


def test_occ_dense_product_compiles_in_one_graph_and_equals_sparse():
    """OCC with occ_product=dense (the default): static shapes, so the layer traces without a graph break; its
    forward and gradients equal the sparse product's (compressed rows) to float32 rounding, with bfloat16 inputs
    within bfloat16's rounding of the residual."""
    layers, x, step = occ_layers(("dense", "sparse"))
    dense, sparse = step(layers["dense"], x), step(layers["sparse"], x)
    for got, want in zip(dense, sparse):
        assert relative_error(got, want.double()) < 1e-6
    assert torch._dynamo.explain(layers["dense"])(x).graph_break_count == 0
    for got, want in zip(step(torch.compile(layers["dense"], backend="aot_eager"), x), dense):
        assert torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):       # bfloat16 residual: rounded once, 2^-9 relative
        dense16, sparse16 = step(layers["dense"], x), step(layers["sparse"], x)
    for got, want in zip(dense16, sparse16):
        assert relative_error(got.float(), want.double()) < 1e-2


def test_occ_fp8_product_compiles_in_one_graph_and_equals_eager():
    """occ_product=fp8 (the residual rounded to E4M3 per row, its products FP8 GEMMs) keeps the layer in one graph
    like dense, compiled == eager bit for bit (aot_eager), and stays within E4M3's rounding of the outliers of the
    bf16-product layer."""
    layers, x, step = occ_layers(("dense", "fp8"))
    fp8, dense = step(layers["fp8"], x), step(layers["dense"], x)
    assert torch._dynamo.explain(layers["fp8"])(x).graph_break_count == 0
    for got, want in zip(step(torch.compile(layers["fp8"], backend="aot_eager"), x), fp8):
        assert torch.equal(got, want)
    errors = [relative_error(got, want.double()) for got, want in zip(fp8, dense)]
    assert errors[1] < 1e-6                       # dx does not involve the residual
    assert 1e-5 < errors[0] < 0.03 and 1e-5 < errors[2] < 0.03, errors      # y and dW: E4M3 (2^-4) on the outliers

    def saved(layer):                             # (shape, dtype) of what autograd keeps for backward
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            step(layer, x)
        return found
    # dense keeps R [tokens, K] in x's dtype; fp8 keeps R^T [K, padded tokens] in E4M3 (made in the forward's pass)
    dense_saved, fp8_saved, rt = saved(layers["dense"]), saved(layers["fp8"]), ((64, 48), torch.float8_e4m3fn)
    assert ((40, 64), torch.float32) in dense_saved and ((40, 64), torch.float32) not in fp8_saved
    assert fp8_saved.count(rt) == dense_saved.count(rt) + 1       # beside x^T and W^T


def test_occ_product_must_be_known():
    with pytest.raises(ValueError, match="occ_product='csr'.*dense"):
        build_recipe(precision_cfg("fp4_vectorwise", occ=True, occ_product="csr"))


@pytest.mark.parametrize("name", ["fp8_tensorwise", "fp8_rowwise", "fp8_blockwise", "fp4_vectorwise", "nvfp4", "mxfp4"])
def test_tiny_gradient_rows_stay_finite(name):
    """An output-gradient row far below float32's normal range (an H200 run, 2026-12-01: a key projection's row at
    ~1e-38 made fmt.max / amax overflow, 0 x Inf = NaN, and every gradient NaN): now scaled as amax = 2^-100."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 128, bias=False)
    layer = QuantLinear.from_linear(linear, build_recipe(precision_cfg(name)), name="k_proj")
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 128)
    dy[5] *= 1e-38
    dy[6] = torch.finfo(torch.float32).tiny / 8 * torch.sign(dy[6])    # subnormal
    dy[:, 7] *= 1e-39                                                  # a tiny column (the weight gradient's scale axis)
    layer(x).backward(dy)
    assert torch.isfinite(x.grad).all() and torch.isfinite(linear.weight.grad).all()
    assert x.grad[5].abs().max() < 1e-30 and x.grad[6].abs().max() < 1e-30


def test_occ_token_threshold_is_each_rows_quantile():
    """occ_scope=token: row r is clamped at the smallest of its top ceil((1 - q) K) |x| values (float64 sort)."""
    torch.manual_seed(0)
    x = torch.randn(37, 200) * torch.logspace(-1, 1, 200)
    clamped, residual = clamp_outliers(x, 0.97, product="dense", scope="token")
    count = math.ceil(0.03 * 200)
    want = x.double().abs().sort(dim=1, descending=True).values[:, count - 1:count]
    assert torch.equal(clamped.double(), torch.maximum(torch.minimum(x.double(), want), -want))
    assert torch.equal(residual.to_dense(200), x - clamped)
    assert ((x.abs() > want.float()).sum(1) < count).all()


def test_occ_scope_must_be_known_and_token_needs_dense():
    with pytest.raises(ValueError, match="occ_scope='batch'.*tensor.*token"):
        build_recipe(precision_cfg("fp4_vectorwise", occ=True, occ_scope="batch"))
    with pytest.raises(ValueError, match="occ_scope=token needs precision.occ_product=dense"):
        build_recipe(precision_cfg("fp4_vectorwise", occ=True, occ_scope="token", occ_product="sparse"))


def test_padding_is_logged_once_outside_the_traced_graph(caplog):
    """Tokens that are not a multiple of the recipe's tile are zero-padded: logged once, eagerly or by the trainer
    before compiling (lowbit.precision.note_padding), never from inside a traced graph, where the log was a graph
    break on the first trace (14 graphs for one fp8_blockwise decoder layer)."""
    import logging

    from lowbit import precision
    from lowbit.precision import linear as linear_module

    recipe = build_recipe(precision_cfg("fp8_blockwise"))
    assert 40 % recipe.token_multiple
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 128), recipe, name="l")
    x = torch.randn(40, 256)
    linear_module._LOGGED.clear()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    assert not linear_module._LOGGED
    with caplog.at_level(logging.INFO, logger="lowbit"):
        layer(x)
        layer(x)
        precision.note_padding(40, precision_cfg("fp8_blockwise"))
    messages = [r.getMessage() for r in caplog.records if "zero-padding" in r.getMessage()]
    assert len(messages) == 1 and f"40 tokens, not a multiple of {recipe.token_multiple}" in messages[0]


def layer_against_float64(recipe, device: str = "cpu", compiled: bool = False, features: tuple[int, int] = (64, 96),
                          batch: tuple[int, int] = (3, 7)) -> dict[str, float]:
    """QuantLinear(K -> N), (K, N) = `features`, forward and backward of x [*batch, K] on `device` (through
    torch.compile's Inductor if `compiled`): the relative errors of y, dx, dW against the float64 reference of the
    same quantized math."""
    torch.manual_seed(0)
    K, N = features
    linear = torch.nn.Linear(K, N)
    layer = QuantLinear.from_linear(linear, recipe, name="layer", seed=3).to(device)
    x = (torch.randn(*batch, K) * torch.logspace(-2, 1, K)).to(device).requires_grad_()
    y = (torch.compile(layer) if compiled else layer)(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    want_y, want_dx, want_dw, _ = reference_forward_backward(x.detach().cpu(), layer.weight.detach().cpu(),
                                                             layer.bias.detach().cpu(), dy.cpu(), recipe,
                                                             layer.hadamard_signs.cpu())
    return {"y": relative_error(y.detach().cpu().reshape(-1, N), want_y),
            "dx": relative_error(x.grad.cpu().reshape(-1, K), want_dx),
            "dw": relative_error(layer.weight.grad.cpu(), want_dw)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_prescaled_block_gemm_gets_exact_gains_in_all_three_gemms(name, monkeypatch):
    """precision.block_gemm=prescale: the forward, dgrad and wgrad GEMMs each reach the block-scaled GEMM with the
    operands' gains (NVFP4's tensor scales G, saved through backward; 1 for MXFP4), and the Triton kernel's prescaled
    scheme (interpreter; on CPU the layer would otherwise use the float32 reference) gives the float64 result."""
    from lowbit.kernels.gemm_triton import _pick_config, block_scaled_mm_triton
    from lowbit.precision import gemm as precision_gemm

    calls = []

    def triton_gemm(a_q, a_scale, b_q, b_scale, *, block_k, a_rows, b_rows, out_dtype, gains):
        calls.append(gains)
        assert gains is not None, "a GEMM of the layer ran without gains"
        return block_scaled_mm_triton(a_q, a_scale, b_q, b_scale, block_k=block_k, a_rows=a_rows, b_rows=b_rows,
                                      out_dtype=out_dtype, gains=gains,
                                      config=_pick_config(a_q.shape[0], b_q.shape[0], block_k, prescale=True))
    monkeypatch.setattr(precision_gemm, "block_scaled_mm", triton_gemm)
    errors = layer_against_float64(build_recipe(precision_cfg(name, block_gemm="prescale")))
    assert len(calls) == 3
    if name == "nvfp4":          # G of x, W, dy, W^T, dy^T, x^T: each operand's own tensor scale, not 1
        assert all(g.item() != 1.0 for gains in calls for g in gains)
    assert max(errors.values()) < 1e-5, errors
    with pytest.raises(ValueError, match="block_gemm=prescale applies the block scales in bf16"):
        build_recipe(precision_cfg("fp8_blockwise", block_gemm="prescale"))
    with pytest.raises(ValueError, match="block_gemm='fast' is not supported"):
        build_recipe(precision_cfg(name, block_gemm="fast"))


def test_block_gemm_default_is_dequant_for_fp4_blocks_only():
    """precision.block_gemm=auto (the default) resolves to the dequant scheme for nvfp4 / mxfp4 and to the rescaled
    one for fp8_blockwise, whose scales are not exact in bf16."""
    assert PrecisionConfig().block_gemm == "auto"
    for name, scheme in (("nvfp4", "dequant"), ("mxfp4", "dequant"), ("fp8_blockwise", "cublas"),
                         ("fp4_vectorwise", "cublas")):
        assert build_recipe(precision_cfg(name)).block_gemm == scheme, name
    assert build_recipe(precision_cfg("nvfp4", block_gemm="rescale")).block_gemm == "rescale"
    with pytest.raises(ValueError, match="block_gemm=cublas takes 128-element K blocks"):
        build_recipe(precision_cfg("nvfp4", block_gemm="cublas"))


@pytest.mark.parametrize("block_gemm", ["cublas", "rescale"])
def test_fp8_blockwise_layer_through_cublas_layouts_equals_float64(block_gemm, monkeypatch):
    """fp8_blockwise with 128-element blocks at block_gemm=cublas: all three GEMMs (x . W, dy . W^T, dy^T . x^T) reach
    cuBLASLt's block-scaled GEMM, here torch._scaled_mm's CPU stand-in that enforces its scale layouts
    (tests/kernels/test_gemm.py), and the layer equals float64; block_gemm=rescale never calls it."""
    from lowbit.kernels import gemm as kernels_gemm
    from lowbit.precision import gemm as precision_gemm
    from tests.kernels.block_products import fake_scaled_mm

    calls = []

    def counted(*args, **kwargs):
        calls.append((kwargs["a_rows"], kwargs["b_rows"]))
        return kernels_gemm.block_scaled_mm_cublas(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    monkeypatch.setattr(precision_gemm, "_cublas_blocks_on", lambda device: True)
    monkeypatch.setattr(precision_gemm, "block_scaled_mm_cublas", counted)
    recipe = build_recipe(precision_cfg("fp8_blockwise", block_size=128, block_gemm=block_gemm))
    errors = layer_against_float64(recipe, features=(512, 512), batch=(4, 128))
    assert max(errors.values()) < 1e-5, errors
    assert sorted(calls) == ([(1, 1), (1, 128), (1, 128)] if block_gemm == "cublas" else [])


def test_cublas_block_gemm_choice_compiles_in_one_graph():
    """block_gemm=cublas decides per GEMM whether cuBLASLt takes it (a Python check, its device part evaluated once
    while tracing): a whole fp8_blockwise layer still compiles without a graph break, and matches eager (CPU: the
    float32 reference GEMM, whose sums Inductor may order differently)."""
    recipe = build_recipe(precision_cfg("fp8_blockwise", block_size=128, block_gemm="cublas"))
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(512, 256), recipe, name="layer")
    x = torch.randn(2, 64, 512)
    compiled, eager = torch.compile(layer, fullgraph=True)(x), layer(x)
    assert relative_error(compiled.detach(), eager.detach().double()) < 1e-5


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_dequant_block_gemm_layer_equals_float64(name, monkeypatch):
    """precision.block_gemm=dequant: all three GEMMs of a layer go through the dequant scheme with their operands'
    gains, and forward and backward equal float64 of the same quantized math."""
    from lowbit.precision import gemm as precision_gemm

    calls = []
    dequant = precision_gemm.block_scaled_mm_dequant

    def counted(*args, **kwargs):
        calls.append(kwargs["gains"])
        return dequant(*args, **kwargs)
    monkeypatch.setattr(precision_gemm, "block_scaled_mm_dequant", counted)
    errors = layer_against_float64(build_recipe(precision_cfg(name, block_gemm="dequant")))
    assert len(calls) == 3
    assert max(errors.values()) < 1e-5, errors
    with pytest.raises(ValueError, match="block_gemm=dequant applies the block scales in bf16"):
        build_recipe(precision_cfg("fp8_blockwise", block_gemm="dequant"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8")
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("block_gemm", ["rescale", "prescale", "dequant"])
def test_block_gemm_schemes_on_gpu_equal_float64(name, block_gemm):
    """Each block GEMM scheme of the FP4 block recipes, forward and backward of one layer."""
    errors = layer_against_float64(build_recipe(precision_cfg(name, block_gemm=block_gemm)), "cuda")
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8")
@pytest.mark.parametrize("name,options", [("fp8_tensorwise", {}), ("fp8_rowwise", {}), ("fp8_blockwise", {}),
                                          ("fp4_vectorwise", {"dge": True, "occ": True}), ("nvfp4", {}), ("mxfp4", {})])
def test_recipes_compiled_by_inductor_on_gpu_equal_float64(name, options):
    """Each recipe's layer through torch.compile (Inductor, as the trainer compiles decoder layers), forward and
    backward: the Triton kernels traced by Dynamo must lower (NVFP4's tensor amax did not, 2026-12-03)."""
    errors = layer_against_float64(build_recipe(precision_cfg(name, **options)), "cuda", compiled=True)
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="cuBLASLt's block-scaled FP8 GEMM is Hopper-only")
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_blockwise_by_cublas_on_gpu_equals_float64(compiled, monkeypatch):
    """fp8_blockwise (1x128 / 128x128, block_gemm=auto -> cublas) on a Hopper GPU, eager and through Inductor: all
    three GEMMs run on cuBLASLt's block-scaled GEMM and the layer equals float64 of the same quantized math."""
    from lowbit.kernels import gemm as kernels_gemm
    from lowbit.precision import gemm as precision_gemm

    calls = []

    def counted(*args, **kwargs):
        calls.append((kwargs["a_rows"], kwargs["b_rows"]))
        return kernels_gemm.block_scaled_mm_cublas(*args, **kwargs)
    monkeypatch.setattr(precision_gemm, "block_scaled_mm_cublas", counted)
    recipe = build_recipe(precision_cfg("fp8_blockwise", block_size=128, block_gemm="auto"))
    errors = layer_against_float64(recipe, "cuda", compiled=compiled, features=(512, 512), batch=(4, 128))
    assert max(errors.values()) < 1e-3, errors
    assert sorted(set(calls)) == [(1, 1), (1, 128)] and len(calls) >= 3, calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8")
@pytest.mark.parametrize("asymmetric", [False, True])
def test_fp4_vectorwise_with_dge_on_gpu_equals_float64(asymmetric):
    """fp4 vectorwise with DGE on CUDA in eager mode: the weight gradient comes from the fused DGE kernel."""
    recipe = build_recipe(precision_cfg("fp4_vectorwise", dge=True, asymmetric=asymmetric))
    errors = layer_against_float64(recipe, "cuda")
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8")
@pytest.mark.parametrize("name,size", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_block_recipes_with_hadamard_on_gpu_equal_float64(name, size):
    """The random Hadamard transform of the wgrad operands by the fused transpose kernel
    (lowbit/kernels/hadamard_triton.py) on CUDA: the layer equals the float64 reference, which applies the
    transform as a float64 matrix product."""
    recipe = build_recipe(precision_cfg(name, hadamard=True, hadamard_size=size))
    errors = layer_against_float64(recipe, "cuda")
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.parametrize("name,overrides", [("fp8_tensorwise", {}), ("fp4_vectorwise", {"dge": True, "occ": True})])
def test_compiled_linears_that_share_an_input_quantize_it_once(name, overrides):
    """q, k and v read the same normalised hidden states. Compiled as the trainer compiles a decoder layer (AOTAutograd
    with Inductor's partitioner, whose common-subexpression pass merges identical nodes), the input's amaxes, and with
    OCC its quantile (a top-k), are computed as often for the three layers as for q alone, and the result equals eager
    bit for bit. The weights keep one amax each."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    recipe = build_recipe(precision_cfg(name, **overrides))

    class Projections(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            torch.manual_seed(0)
            self.names = names
            for p, n in (("q", 64), ("k", 32), ("v", 32))[:len(names)]:
                setattr(self, p, QuantLinear.from_linear(torch.nn.Linear(64, n), recipe, name=p))

        def forward(self, h):
            h = torch.nn.functional.rms_norm(h, (64,))
            return sum(getattr(self, p)(h).square().sum() for p in self.names)

    def placeholders(node, seen):
        """The graph inputs a node is computed from."""
        if node.op == "placeholder":
            return {node}
        out = set()
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                out |= placeholders(arg, seen)
        return out

    def counts(names):
        """(amaxes of the input in the compiled forward, amaxes and top-ks in forward and backward together);
        checks compiled == eager."""
        found = []

        def backend(gm, inputs):
            def keep(graph_module, _):
                found.append(graph_module.graph)
                return graph_module
            return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep,
                                         partition_fn=min_cut_rematerialization_partition)

        module = Projections(names)
        h = torch.randn(2, 20, 64) * torch.logspace(-1, 1, 64)
        module(h).backward()
        eager_grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        torch._dynamo.reset()
        torch.compile(module, backend=backend)(h).backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), eager_grads))
        forward, backward = ([n for n in graph.nodes if n.op == "call_function"] for graph in found)
        x_input = [n for n in found[0].nodes if n.op == "placeholder" and tuple(n.meta["val"].shape) == (2, 20, 64)][0]
        from_x = sum(n.target == torch.ops.aten.amax.default and x_input in placeholders(n, set()) for n in forward)
        return (from_x, sum(n.target == torch.ops.aten.amax.default for n in forward + backward),
                sum(n.target == torch.ops.aten.topk.default for n in forward + backward))

    (x_amaxes, amaxes, topks), three = counts("q"), counts("qkv")
    assert x_amaxes >= 1 and topks == (1 if recipe.occ else 0)
    # k and v add their weights' and output gradients' amaxes, and nothing for the input they share with q
    assert three[1:] == (3 * amaxes - 2 * x_amaxes, topks), ((x_amaxes, amaxes, topks), three)
