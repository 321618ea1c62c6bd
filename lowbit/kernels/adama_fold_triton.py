"""AdamA's per-micro-batch fold as one Triton kernel (lowbit/optim/adama.py has the PyTorch path).

For one parameter's micro-batch gradient g (float32 or bf16), its float32 moments m, v, and the norm ||g||
(already computed, so the clipping scale needs no extra pass), in one read of g, m, v and one write of m, v:

    sq <- sq + ||g||^2                  (the parameter's running squared norm of the step, for grad_norm)
    s = min(clip / (||g|| + 1e-6), 1)   (clip > 0; else s = 1)      g <- s g
    first fold of the step:  m <- beta1 m,  v <- beta2 v
    m <- m + (1 - beta1) g,  v <- v + (1 - beta2) g g

The PyTorch path runs these as six to eight separate passes (about 40-56 bytes per element against this
kernel's 20 for float32 gradients); the operations and their order are the same.

The update after the last micro-batch is one kernel too (`update`), one read of p, m, v and one write of p
(and of v with the cross-term correction), where the foreach path makes five passes with a v-sized temporary:

    v <- v + c m m                      (second_moment=cross_corrected only; c given)
    d = sqrt(v) / sqrt(1 - beta2^t) + eps
    p <- p (1 - lr wd);  p <- p - lr / (1 - beta1^t) m / d

second_moment="summed" (`fold_summed`, `update_summed`): during a step v's float32 word holds two bfloat16 halves,
v rounded (high half) and the running sum S of the step's gradients (low half); the update then forms Adam's own
m <- beta1 m + (1 - beta1) S and v <- beta2 v + (1 - beta2) S^2 and writes v back as float32 (one read of p, m, v
and one write of each).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    AVAILABLE = False

BLOCK = 2048

if AVAILABLE:
    @triton.jit
    def _fold_kernel(g_ptr, m_ptr, v_ptr, norm_ptr, sq_ptr, n, clip, beta1, beta2, one_minus_beta1,
                     one_minus_beta2, CLIP: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
        if tl.program_id(0) == 0:           # one writer: the running squared norm stays deterministic
            norm0 = tl.load(norm_ptr)
            tl.store(sq_ptr, tl.load(sq_ptr) + norm0 * norm0)
        # 1 - beta arrive computed in double and rounded once, as torch's `alpha=1 - beta1` scalar is
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
        if CLIP:
            norm = tl.load(norm_ptr)
            scale = tl.minimum(tl.math.div_rn(clip + tl.zeros_like(norm), norm + 1e-6), 1.0)
            g = g * scale
        if FIRST:
            m = m * beta1
            v = v * beta2
        m = m + one_minus_beta1 * g
        v = v + one_minus_beta2 * g * g          # (value * g) * g, addcmul's order
        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)


if AVAILABLE:
    @triton.jit
    def _update_kernel(p_ptr, m_ptr, v_ptr, n, bias2_sqrt, eps, decay, step_size, cross,
                       CROSS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(v_ptr + offsets, mask=mask, other=1.0)
        if CROSS:
            v = v + cross * m * m                # addcmul's order: (value * m) * m
            tl.store(v_ptr + offsets, v, mask=mask)
        denominator = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt + tl.zeros_like(v)) + eps
        master = p.to(tl.float32) * decay
        master = master + step_size * tl.math.div_rn(m, denominator)   # addcdiv: p + value * (m / d)
        tl.store(p_ptr + offsets, master.to(p_ptr.dtype.element_ty), mask=mask)


if AVAILABLE:
    @triton.jit
    def _bfloat16_high(x):
        """x (float32) rounded to bfloat16, to nearest even, as the high 16 bits of an int32 (integer arithmetic: the
        interpreter's float cast truncates)."""
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 32767 + ((bits >> 16) & 1)) & -65536
        return tl.where(x != x, 2143289344, rounded)     # NaN stays NaN (0x7FC00000), whatever its payload

    @triton.jit
    def _fold_summed_kernel(g_ptr, v_ptr, norm_ptr, sq_ptr, n, clip, CLIP: tl.constexpr, FIRST: tl.constexpr,
                            BLOCK: tl.constexpr):
        if tl.program_id(0) == 0:
            norm0 = tl.load(norm_ptr)
            tl.store(sq_ptr, tl.load(sq_ptr) + norm0 * norm0)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if CLIP:
            norm = tl.load(norm_ptr)
            scale = tl.minimum(tl.math.div_rn(clip + tl.zeros_like(norm), norm + 1e-6), 1.0)
            g = g * scale
        words = v_ptr.to(tl.pointer_type(tl.int32))
        if FIRST:       # v (float32) -> its bfloat16 rounding in the high half; the sum starts at g
            v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
            high = _bfloat16_high(v)
            total = g
        else:
            bits = tl.load(words + offsets, mask=mask, other=0)
            high = bits & -65536                                   # 0xFFFF0000
            total = (bits << 16).to(tl.float32, bitcast=True) + g  # the low half is the sum's bfloat16 bits
        low = (_bfloat16_high(total) >> 16) & 65535
        tl.store(words + offsets, high | low, mask=mask)


if AVAILABLE:
    @triton.jit
    def _update_summed_kernel(p_ptr, m_ptr, v_ptr, scale_ptr, n, beta1, beta2, one_minus_beta1, one_minus_beta2,
                              bias2_sqrt, eps, decay, step_size, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
        bits = tl.load(v_ptr.to(tl.pointer_type(tl.int32)) + offsets, mask=mask, other=0)
        total = (bits << 16).to(tl.float32, bitcast=True)         # the step's summed gradient, bfloat16
        if SCALE:                                                   # global-norm clipping's coefficient
            total = total * tl.load(scale_ptr)
        v = (bits & -65536).to(tl.float32, bitcast=True)           # v before the step, rounded to bfloat16
        m = m * beta1 + one_minus_beta1 * total                     # mul_(beta1).add_(S, alpha=1 - beta1)
        v = v * beta2 + one_minus_beta2 * total * total             # mul_(beta2).addcmul_(S, S, value=1 - beta2)
        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)
        denominator = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt + tl.zeros_like(v)) + eps
        master = p.to(tl.float32) * decay
        master = master + step_size * tl.math.div_rn(m, denominator)
        tl.store(p_ptr + offsets, master.to(p_ptr.dtype.element_ty), mask=mask)


def fold_summed(grad: torch.Tensor, exp_avg_sq: torch.Tensor, norm: torch.Tensor, sq_norm: torch.Tensor,
                clip: float, first: bool) -> None:
    """second_moment=summed: add one micro-batch gradient (clipped as `fold` clips) to the step's bfloat16 sum held
    in the low half of v's words; the first fold of a step also rounds v into the high half (module doc)."""
    n = _require("fold_summed: gradient", grad, exp_avg_sq, exp_avg_sq)
    if n == 0:
        return
    _fold_summed_kernel[(triton.cdiv(n, BLOCK),)](grad, exp_avg_sq, norm, sq_norm, n, float(clip), CLIP=clip > 0,
                                                 FIRST=first, BLOCK=BLOCK)


def update_summed(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float,
                  beta2: float, lr: float, weight_decay: float, eps: float, bias1: float, bias2_sqrt: float,
                  scale: torch.Tensor | None = None) -> None:
    """second_moment=summed: Adam's moments from the step's summed gradient (times `scale`, a float32 0-d tensor on
    the parameter's device, if given: global-norm clipping), then the update of `update`."""
    n = _require("update_summed: parameter", param, exp_avg, exp_avg_sq)
    if n == 0:
        return
    _update_summed_kernel[(triton.cdiv(n, BLOCK),)](param, exp_avg, exp_avg_sq, exp_avg if scale is None else scale, n,
                                                   float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2,
                                                   float(bias2_sqrt), float(eps), 1.0 - lr * weight_decay, -lr / bias1,
                                                   SCALE=scale is not None, BLOCK=BLOCK)


def update(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float, weight_decay: float,
           eps: float, bias1: float, bias2_sqrt: float, cross: float = 0.0) -> None:
    """AdamA's parameter update of one tensor in place (module doc); cross > 0 adds cross * m^2 to v first."""
    n = _require("update: parameter", param, exp_avg, exp_avg_sq)
    if n == 0:
        return
    _update_kernel[(triton.cdiv(n, BLOCK),)](param, exp_avg, exp_avg_sq, n, float(bias2_sqrt), float(eps),
                                            1.0 - lr * weight_decay, -lr / bias1, float(cross), CROSS=cross > 0,
                                            BLOCK=BLOCK)


def supports(grad: torch.Tensor, exp_avg: torch.Tensor) -> bool:
    """The kernel's cases: contiguous float32/bf16 gradients, float32 moments of the same layout, plain tensors (a
    tensor-parallel DTensor shard takes the PyTorch path)."""
    from torch.distributed.tensor import DTensor
    return (AVAILABLE and not isinstance(grad, DTensor) and not isinstance(exp_avg, DTensor)
            and grad.dtype in (torch.float32, torch.bfloat16) and grad.is_contiguous()
            and exp_avg.is_contiguous() and exp_avg.dtype == torch.float32 and grad.numel() == exp_avg.numel())


def _require(what: str, tensor: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> int:
    """The element count, once the tensors are a case of the kernels; else an error naming them and the fix."""
    if not supports(tensor, exp_avg) or exp_avg_sq.shape != exp_avg.shape or not exp_avg_sq.is_contiguous():
        raise ValueError(f"AdamA fused {what} {tensor.dtype} {tuple(tensor.shape)} (contiguous "
                         f"{tensor.is_contiguous()}) with moments {exp_avg.dtype} {tuple(exp_avg.shape)} is not a case "
                         f"of the kernel; set optim.fused=false for the PyTorch path")
    return tensor.numel()


def fold(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, norm: torch.Tensor,
         sq_norm: torch.Tensor, clip: float, beta1: float, beta2: float, first: bool) -> None:
    """Fold one micro-batch gradient into (exp_avg, exp_avg_sq) in place; `norm` = ||grad|| (float32, 0-d);
    `sq_norm` (float32, 0-d) gets norm^2 added, as `sq_norm.add_(norm.square())` would."""
    n = _require("fold: gradient", grad, exp_avg, exp_avg_sq)
    if n == 0:
        return
    _fold_kernel[(triton.cdiv(n, BLOCK),)](grad, exp_avg, exp_avg_sq, norm, sq_norm, n, float(clip), float(beta1),
                                          float(beta2), 1.0 - beta1, 1.0 - beta2, CLIP=clip > 0, FIRST=first,
                                          BLOCK=BLOCK)
