"""A kernel that rounds element-wise onto E2M1's grid by the quantize kernels' `_to_grid` (tests/kernels/test_quantize.py; a module of
its own because Triton resolves a kernel's globals in its module)."""
import triton
import triton.language as tl

from lowbit.kernels.quantize_triton import _to_grid


@triton.jit
def round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(y_ptr + offsets, _to_grid(x, 6.0, 0, 1, False), mask=offsets < n)
