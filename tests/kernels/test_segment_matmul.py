"""The sparse-rows x dense product behind OCC (lowbit/kernels/segment_matmul.py): the Triton kernel (interpreter on
CPU, the GPU on a CUDA machine) and the PyTorch path against float64 math, and the compressed-row residual that
clamp_outliers builds against the dense x - clamp(x)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from lowbit.kernels.segment_matmul import segment_matmul_add_  # noqa: E402
from lowbit.precision.methods import clamp_outliers  # noqa: E402


def random_segments(segments: int, rows: int, density: float, seed: int):
    """A random sparse [segments, rows] float32 matrix (some segments empty) in segment form, and its dense copy."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.rand(segments, rows, generator=generator) < density
    dense = torch.randn(segments, rows, generator=generator) * kept
    dense[::3] = 0                                     # every third segment has no entries
    seg, idx = dense.nonzero(as_tuple=True)
    seg_ptr = torch.zeros(segments + 1, dtype=torch.int64)
    seg_ptr[1:] = torch.bincount(seg, minlength=segments).cumsum(0)
    return seg_ptr, idx, dense[seg, idx].float(), dense


@pytest.mark.parametrize("use_triton", ["always", "never"])
@pytest.mark.parametrize("out_dtype,b_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("density", [0.1, 0.7])          # 0.7: segments longer than the kernel's ENTRIES step
def test_segment_product_equals_float64(use_triton, out_dtype, b_dtype, density):
    seg_ptr, idx, vals, dense = random_segments(37, 50, density, seed=1)
    generator = torch.Generator().manual_seed(2)
    b = torch.randn(50, 300, generator=generator).to(b_dtype)          # 300 columns: a partial column block
    out = torch.randn(37, 300, generator=generator).to(out_dtype)
    want = out.double() + dense.double() @ b.double()
    got = segment_matmul_add_(out.clone().to(DEVICE), seg_ptr.to(DEVICE), idx.to(DEVICE), vals.to(DEVICE),
                              b.to(DEVICE), use_triton=use_triton).cpu()
    ulp = torch.finfo(out_dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=ulp, atol=1e-5)   # one rounding to out's dtype
    assert torch.equal(got[::3], out[::3])                                 # empty segments untouched, bit for bit


@pytest.mark.parametrize("use_triton", ["always", "never"])
def test_segment_product_into_a_transposed_view(use_triton):
    """out may be any strided view: R^T b written into the transpose of a [N, K] gradient."""
    seg_ptr, idx, vals, dense = random_segments(20, 30, 0.2, seed=3)
    b = torch.randn(30, 70, generator=torch.Generator().manual_seed(4))
    base = torch.randn(70, 20, generator=torch.Generator().manual_seed(5))
    want = base.double().t() + dense.double() @ b.double()
    got = base.clone().to(DEVICE)
    segment_matmul_add_(got.t(), seg_ptr.to(DEVICE), idx.to(DEVICE), vals.to(DEVICE), b.to(DEVICE),
                        use_triton=use_triton)
    torch.testing.assert_close(got.cpu().t().double(), want, rtol=1e-6, atol=1e-5)


def test_bad_shapes_are_refused_with_the_shapes():
    seg_ptr, idx, vals, _ = random_segments(4, 5, 0.5, seed=6)
    with pytest.raises(ValueError, match=r"seg_ptr \(5,\) must have out's 3 rows"):
        segment_matmul_add_(torch.zeros(3, 8), seg_ptr, idx, vals, torch.zeros(5, 8), use_triton="never")
    with pytest.raises(ValueError, match="same number of columns"):
        segment_matmul_add_(torch.zeros(4, 8), seg_ptr, idx, vals, torch.zeros(5, 9), use_triton="never")
    with pytest.raises(ValueError, match="vals must be float32"):
        segment_matmul_add_(torch.zeros(4, 8), seg_ptr, idx, vals.double(), torch.zeros(5, 8), use_triton="never")


@pytest.mark.parametrize("channels", [False, True])
def test_outlier_residual_and_its_products_equal_the_dense_residual(channels):
    """clamp_outliers' residual holds exactly x - clamp(x); R b and R^T b equal float64 products. channels=True:
    two outlier channels (as LLM activations have) go to the dense part, the scattered outliers stay sparse."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(64, 48, generator=generator).to(DEVICE)
    x[5, 7], x[40, 0] = 30.0, -25.0                                    # two clear outliers
    if channels:
        x[:, 3] *= 40.0
        x[::2, 11] -= 50.0
    clamped, outliers = clamp_outliers(x, 0.95, dense_share=0.25 if channels else 1.0)
    dense = (x - clamped).double()                                     # the residual is float32 by definition
    assert torch.equal(outliers.to_dense(48).double(), dense)
    assert outliers.vals.numel() + int((outliers.dense_vals != 0).sum()) == int((dense != 0).sum())
    assert outliers.dense_cols.tolist() == ([3, 11] if channels else [])
    b = torch.randn(48, 33, generator=generator).to(DEVICE)
    out = torch.randn(64, 33, generator=generator).to(DEVICE)
    want = out.double() + dense @ b.double()
    bound = float32_sum_bound(out.double().abs() + dense.abs() @ b.double().abs(), terms=49)
    assert ((outliers.matmul_add(out, b).double() - want).abs() <= bound).all()
    dy = torch.randn(64, 33, generator=generator).to(DEVICE)
    bound = float32_sum_bound(dense.t().abs() @ dy.double().abs(), terms=64)
    assert ((outliers.t_matmul(dy, 48).double() - dense.t() @ dy.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_clamp_and_compaction_equal_the_pytorch_path(dtype):
    """lowbit/kernels/occ_clamp.py (interpreter on CPU, compiled on a GPU) against the PyTorch path of the
    lowbit::occ_clamp op (on x's device), bit for bit: odd shapes (partial tiles), channel and scattered outliers, a NaN, rows
    without outliers, no dense column, every column dense."""
    from lowbit.kernels.occ_clamp import occ_clamp_triton
    from lowbit.precision.methods import occ_clamp_torch

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(37, 150, generator=generator)
    x[:, 4] *= 30.0                                    # a channel of outliers
    x[::3, 131] -= 40.0
    x[7, 60], x[20, 149], x[36, 0] = 9.0, -12.0, float("nan")
    x[10:14] = 0.1                                     # rows without outliers
    x = x.to(DEVICE, dtype)
    threshold = torch.tensor(2.5, dtype=dtype, device=DEVICE)
    for share in (0.1, 1.0, 0.0):
        want = [t.cpu() for t in occ_clamp_torch(x, threshold, share)]
        got = [t.cpu() for t in occ_clamp_triton(x, threshold, share)]
        assert torch.equal(got[0].isnan(), want[0].isnan())
        assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num())
        for name, g, w in zip(("row_ptr", "cols", "vals", "dense_cols"), got[1:5], want[1:5]):
            assert g.dtype == w.dtype and torch.equal(g, w), (share, name)
        assert torch.equal(got[5].isnan(), want[5].isnan()) and torch.equal(got[5].nan_to_num(), want[5].nan_to_num())
    assert torch.equal(want[4], (x.abs() > threshold).any(0).nonzero().squeeze(1).cpu())   # share 0: all dense


def float32_sum_bound(magnitudes: torch.Tensor, terms: int) -> torch.Tensor:
    """The classic bound on a float32 sum of `terms` products in any order: terms * eps * sum of |products|."""
    return (terms + 1) * torch.finfo(torch.float32).eps * magnitudes + 1e-30


def test_occ_layer_compiles_in_one_graph_and_equals_eager():
    """OCC's data-dependent residual lives in custom ops: the OCC linear traces without a graph break when Dynamo
    captures data-dependent sizes, and the AOT-traced forward and backward equal eager bit for bit. (QuantLinear
    itself runs OCC eagerly under compile: this tracing failed end to end on the H200, see linear.quant_linear.)"""
    from lowbit.config import PrecisionConfig
    from lowbit.precision.linear import QuantLinear, occ_linear
    from lowbit.precision.recipes import build_recipe
    torch.library.opcheck(torch.ops.lowbit.occ_matmul_add, (torch.randn(3, 5), torch.tensor([0, 1, 1, 2]),
                          torch.tensor([1, 0]), torch.randn(2), torch.tensor([2]), torch.randn(3, 1),
                          torch.randn(4, 5)), test_utils=("test_faketensor",))
    cfg = PrecisionConfig(recipe="fp4_vectorwise", dge=True, occ=True, occ_quantile=0.97, occ_product="sparse",
                          block_size=32)
    torch.manual_seed(8)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), build_recipe(cfg), name="l")
    x = torch.randn(32, 64)
    x[:, 5] *= 30.0                                                   # an outlier channel: the dense part
    dy = torch.randn(32, 48)

    def forward(x):
        return occ_linear(x, layer.weight, layer.bias, layer.recipe, layer.hadamard_signs)

    def step(x):
        x = x.detach().requires_grad_(True)
        return (forward(x), *torch.autograd.grad(forward(x), (x, layer.weight), dy))
    assert torch.equal(forward(x), layer(x))
    assert torch.equal(torch.compile(layer, backend="aot_eager")(x), layer(x))   # the layer as the trainer runs it
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert torch._dynamo.explain(forward)(x).graph_break_count == 0
        for got, want in zip(torch.compile(step, backend="aot_eager")(x), step(x)):
            assert torch.equal(got, want)
