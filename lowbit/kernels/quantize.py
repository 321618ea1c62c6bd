"""Quantize dispatch: fused Triton kernels on CUDA, the pure-PyTorch reference elsewhere.

`quantize(x, quantizer)` -> QTensor of x [R, C] scaled along C.
`quantize_pair(x, quantizer, quantizer_t)` -> (QTensor of x along C, QTensor of x^T [C, R] along R): the
operand of a forward GEMM and the transposed copy its backward GEMM needs, from one read of x on CUDA
(lowbit/kernels/quantize_triton.py). The numerics are those of lowbit.precision.scaling exactly.
"""
from __future__ import annotations


import torch

from lowbit.precision.scaling import QTensor, Quantizer, quantize_reference


MAX_KERNEL_ELEMENTS = 2 ** 31     # operands this large (4 GiB of bf16) take the PyTorch path: same numerics, slower


def triton_kind(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None = None) -> str | None:
    """Which Triton kernel handles this operand (pair): "rows" (tensorwise/rowwise absmax, quantize_triton),
    "blocks" (block scales, quantize_blocks_triton), or None (the PyTorch reference)."""
    from lowbit.kernels import quantize_blocks_triton, quantize_triton
    if not quantize_triton.AVAILABLE or x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if x.numel() >= MAX_KERNEL_ELEMENTS:    # the kernels' element offsets are 32-bit; the reference's numerics are the same
        return None
    if quantizer.blocked:
        return "blocks" if quantize_blocks_triton.supports(quantizer, quantizer_t) else None
    rows_ok = lambda q: q.scale_rule == "absmax" and not q.blocked and q.tensorwise == quantizer.tensorwise
    return "rows" if rows_ok(quantizer) and (quantizer_t is None or rows_ok(quantizer_t)) else None


KERNELS = ("auto", "triton", "torch")
_kernels = "triton"
_auto = False           # quantize_kernels=auto: code that runs eagerly (a graph break) takes the Triton kernels


def set_kernels(name: str, compiled: bool = False, fp4_blocks: bool = False) -> None:
    """Process-wide choice for CUDA operands (`precision.quantize_kernels`): "triton" (lowbit's fused quantize
    kernels) or "torch" (the PyTorch reference, same numerics in eager; under torch.compile Inductor fuses it
    with the ops around it); "auto" takes torch for compiled layers and triton in eager, except for FP4 block
    recipes (`fp4_blocks`: nvfp4, mxfp4), which take triton in both. Measured (H200, docs/RESULTS.md issue 3):
    fp8 rowwise end to end (llama_1b, compiled layers) 1.03x bf16 with torch vs 0.93x with triton; one compiled
    llama_1b decoder layer 0.67x bf16 for nvfp4 and 0.78x for mxfp4 with triton vs 0.57x / 0.66x with torch
    (Inductor's code for the 16/32-element blocks along the token axis is slow). Under "auto", a quantization that
    runs eagerly although its layer is compiled (OCC's data-dependent residual breaks the graph) still takes the
    Triton kernels. CPU operands always take the PyTorch reference."""
    global _kernels, _auto
    if name not in KERNELS:
        raise ValueError(f"precision.quantize_kernels={name!r} is not one of {list(KERNELS)}; use auto, triton "
                         f"(lowbit's kernels) or torch (the PyTorch path, fused by torch.compile)")
    _kernels = ("torch" if compiled and not fp4_blocks else "triton") if name == "auto" else name
    _auto = name == "auto"


def kernels() -> str:
    return _kernels


def _triton(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer | None):
    wanted = _kernels == "triton" or (_auto and not torch.compiler.is_compiling())
    kind = triton_kind(x, quantizer, quantizer_t) if x.is_cuda and wanted else None
    if kind == "rows":
        from lowbit.kernels.quantize_triton import quantize_pair_triton
        return quantize_pair_triton
    if kind == "blocks":
        from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton
        return quantize_blocks_triton
    return None


def quantize(x: torch.Tensor, quantizer: Quantizer, noise: torch.Tensor | None = None,
             what: str = "tensor", stochastic: bool = False, tensor_amax: torch.Tensor | None = None,
             amax: torch.Tensor | None = None) -> QTensor:
    """x [R, C] (fp32/bf16/fp16) -> QTensor scaled along C. Stochastic rounding by `noise` (uniform [0, 1) float32
    of x's shape: every path rounds with it bit for bit) or by `stochastic`: the block kernel draws its own Philox
    noise from a seed on the device (no float32 noise tensor written and read per gradient), other paths
    torch.rand's. The row kernel has no stochastic rounding: those operands take the PyTorch path.
    tensor_amax: max |x| (float32 [1]) if the caller has it (the Hadamard kernel's): the NVFP4 block kernel then
    skips its own amax pass; every other path computes it (the same value).
    amax: a tensorwise scale's amax given, not reduced from x (delayed scaling): the whole tensor's, already reduced
    over tensor-parallel shards; the row kernel without its amax pass, or the PyTorch path, whose cast torch.compile
    fuses into x's producer."""
    kernel = _triton(x, quantizer, None)
    blocks = kernel is not None and triton_kind(x, quantizer) == "blocks"
    if amax is not None and (blocks or not quantizer.tensorwise):
        kernel = blocks = None
    given = dict(tensor_amax=tensor_amax) if blocks and tensor_amax is not None else {}
    if stochastic and noise is None:
        if blocks:
            return kernel(x, quantizer, None, seed=torch.randint(0, 2 ** 31 - 1, (1,), device=x.device), **given)[0]
        noise = torch.rand(x.shape, device=x.device)
    if blocks:
        return kernel(x, quantizer, None, noise, **given)[0]
    if kernel is not None and noise is None:
        return kernel(x, quantizer, None, **({} if amax is None else {"amax": amax}))[0]
    return quantize_reference(x, quantizer, noise, what, amax=amax)


def quantize_pair(x: torch.Tensor, quantizer: Quantizer, quantizer_t: Quantizer,
                  what: str = "tensor", amax: torch.Tensor | None = None) -> tuple[QTensor, QTensor]:
    """x [R, C] -> (QTensor [R, C] scaled along C, QTensor [C, R] of x^T scaled along R).
    amax: given for a tensorwise pair that shares one scale (delayed scaling; see `quantize`)."""
    if amax is not None and not shares_scale(quantizer, quantizer_t):
        raise ValueError(f"{what}: a given amax needs a tensorwise pair sharing one scale")
    kernel = _triton(x, quantizer, quantizer_t)
    if kernel is not None and (amax is None or triton_kind(x, quantizer, quantizer_t) == "rows"):
        return kernel(x, quantizer, quantizer_t, **({} if amax is None else {"amax": amax}))
    xq = quantize_reference(x, quantizer, what=what, amax=amax)
    if shares_scale(quantizer, quantizer_t):     # x^T's quantization is the transpose of x's, bit for bit
        return xq, QTensor(xq.data.t(), xq.scale, quantizer_t, xq.gain)
    if transposes_blocks(quantizer, quantizer_t):
        # b x b blocks: x^T's block (j, i) is x's block (i, j) transposed, same amax, same scale, same values; a
        # contiguous copy, since the block GEMM reads its operands along K
        quantizer_t.check_columns(x.shape[0], what + "^T")
        return xq, QTensor(xq.data.t().contiguous(), xq.scale.t().contiguous(), quantizer_t, xq.gain)
    xtq = quantize_reference(x.t(), quantizer_t, what=what + "^T")
    if quantizer_t.blocked:     # the block GEMM reads along K: x^T row-major (TMA tiles), not x's transposed view
        xtq = QTensor(xtq.data.contiguous(), xtq.scale, quantizer_t, xtq.gain)
    return xq, xtq


def shares_scale(quantizer: Quantizer, quantizer_t: Quantizer) -> bool:
    """One tensor-wide scale of the same format, rule and amax group on both sides of a pair: the transposed
    operand needs no second amax reduction or rounding pass (what torch.compile would otherwise run twice)."""
    return (quantizer.tensorwise and quantizer_t.tensorwise and quantizer.fmt == quantizer_t.fmt
            and quantizer.scale_rule == quantizer_t.scale_rule and quantizer.amax_group is quantizer_t.amax_group)


def transposes_blocks(quantizer: Quantizer, quantizer_t: Quantizer) -> bool:
    """b x b blocks (fp8_blockwise's 128 x 128 weight blocks) of the same format and absmax/pow2 rule on both sides
    of a pair: x^T's quantization is x's transposed, so the PyTorch path (under torch.compile: Inductor) need not
    reduce and round x a second time."""
    b = quantizer.block_cols
    return (quantizer.blocked and b > 1 and quantizer.block_rows == b and quantizer_t.block_rows == b
            and quantizer_t.block_cols == b and quantizer.fmt == quantizer_t.fmt
            and quantizer.scale_rule == quantizer_t.scale_rule and quantizer.scale_rule in ("absmax", "pow2"))
