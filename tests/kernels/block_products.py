"""Float64 block-scaled products for the GEMM tests (tests/kernels/test_gemm.py, tests/precision/test_linear.py):
the product itself, and a CPU stand-in for torch._scaled_mm's block-scaled path that enforces the scale layouts
its CUDA checks accept."""
import torch


def float64_block_product(a_q, a_scale, b_q, b_scale, block_k, a_rows, b_rows):
    """out[m, n] = sum_kb sa[m//a_rows, kb] sb[n//b_rows, kb] sum_{k in kb} a[m,k] b[n,k], in float64 loops over kb."""
    a, b = a_q.double(), b_q.double()
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    rows_a = torch.arange(a.shape[0]) // a_rows
    rows_b = torch.arange(b.shape[0]) // b_rows
    for kb in range(a.shape[1] // block_k):
        ks = slice(kb * block_k, (kb + 1) * block_k)
        partial = a[:, ks] @ b[:, ks].T
        out += partial * a_scale.double()[rows_a, kb][:, None] * b_scale.double()[rows_b, kb][None, :]
    return out


def scale_kind(t: torch.Tensor, scale: torch.Tensor) -> str:
    """torch._scaled_mm's reading of a scale for operand t [R, K] (its CUDA checks, aten/src/ATen/native/cuda/Blas.cpp):
    1x128 = [R, ceil(K/128)] outer-dimension-major, 128x128 = [ceil(R/128), ceil(K/128)] row-major."""
    rows, blocks = t.shape[0], -(-t.shape[1] // 128)
    fits = lambda dim, size, stride: scale.shape[dim] == size and (size <= 1 or scale.stride(dim) == stride)
    if scale.dtype == torch.float32 and scale.dim() == 2:
        if fits(0, rows, 1) and fits(1, blocks, rows):
            return "1x128"
        if fits(0, -(-rows // 128), blocks) and fits(1, blocks, 1):
            return "128x128"
    return f"not a block scale: {tuple(scale.shape)} strides {scale.stride()}"


def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, **_):
    """torch._scaled_mm's block-scaled contract on CPU: the scales must have the layouts its checks accept (a's scale
    for a [M, K], b's scale transposed for b^T [N, K]), not both 128x128; the product in float64."""
    kinds = scale_kind(a, scale_a), scale_kind(b.t(), scale_b.t())
    assert set(kinds) <= {"1x128", "128x128"} and kinds != ("128x128", "128x128"), kinds
    assert a.is_contiguous() and b.t().is_contiguous(), "a row-major, b column-major"
    rows = [1 if kind == "1x128" else 128 for kind in kinds]
    out = float64_block_product(a, scale_a.contiguous(), b.t(), scale_b.t().contiguous(), 128, *rows)
    return out.to(out_dtype)
