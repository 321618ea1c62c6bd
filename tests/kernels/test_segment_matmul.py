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
def test_segment_product_equals_float64(use_triton, out_dtype, b_dtype):
    seg_ptr, idx, vals, dense = random_segments(37, 50, 0.1, seed=1)
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


def test_outlier_residual_and_its_products_equal_the_dense_residual():
    """clamp_outliers' compressed rows hold exactly x - clamp(x); R b and R^T b equal float64 products."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(64, 48, generator=generator)
    x[5, 7], x[40, 0] = 30.0, -25.0                                    # two clear outliers
    clamped, outliers = clamp_outliers(x, 0.95)
    dense = (x - clamped).double()                                     # the residual is float32 by definition
    assert torch.equal(outliers.to_dense().double(), dense)
    assert outliers.vals.numel() == int((dense != 0).sum())
    b = torch.randn(48, 33, generator=generator)
    out = torch.zeros(64, 33)
    torch.testing.assert_close(outliers.matmul_add_(out, b).double(), dense @ b.double(), rtol=1e-6, atol=1e-5)
    dy = torch.randn(64, 33, generator=generator)
    torch.testing.assert_close(outliers.t_matmul(dy).double(), dense.t() @ dy.double(), rtol=1e-6, atol=1e-5)
