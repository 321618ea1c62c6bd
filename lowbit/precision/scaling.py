"""Scaled quantization of one GEMM operand, pure PyTorch (the reference of lowbit/kernels/quantize.py).

An operand is a 2-D tensor [R, C] whose columns C are the GEMM's contraction axis. A `Quantizer`
says which element format it gets and over which block one scale is shared:
  tensorwise   block (0, 0)      one scale                         scale shape []
  rowwise      block (1, 0)      one scale per row (over all of C) scale shape [R, 1]
  blocks       block (br, bc)    one scale per br x bc tile        scale shape [ceil(R/br), C/bc]
and how the scale is chosen (`scale_rule`):
  absmax  scale = amax / fmt.max (fp32)                            FP8 recipes, FP4 vectorwise
  nvfp4   scale = E4M3(amax_block * (g * fp32(1/6))) / g, g = 448*6 / amax_tensor   (NVIDIA NVFP4: E4M3
          block scale times an FP32 tensor scale; one product per block, in TransformerEngine's order)
  pow2    scale = 2^(floor(log2 amax_block) - 2)                   (OCP MX spec: E8M0 shared exponent,
          2 = emax of E2M1)
The quantized values are round_to_format(x * inv_scale) with inv_scale = 1 / scale computed once per
block in fp32, so x ~= q * scale. FP4 values are stored exactly as float8_e4m3fn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lowbit.precision.formats import E4M3, FloatFormat, cast_to_format, round_to_format


class NonFiniteAmaxError(ValueError):
    """A NaN/Inf reached a quantization amax: the scaled values would silently be garbage."""


@dataclass(frozen=True)
class Quantizer:
    fmt: FloatFormat
    block_rows: int = 1          # 0 = the whole tensor shares one scale (tensorwise)
    block_cols: int = 0          # 0 = a whole row (rowwise / vectorwise)
    scale_rule: str = "absmax"   # absmax | nvfp4 | pow2
    # Tensor parallelism: the process group over which this operand's scale span is split (lowbit.parallel
    # sets it on a layer's shard recipe); its amax is then the max over the group. None: not sharded.
    amax_group: Any = field(default=None, compare=False, repr=False)

    @property
    def tensorwise(self) -> bool:
        return self.block_rows == 0

    @property
    def blocked(self) -> bool:
        """Scales vary along the contraction axis (needs block_scaled_mm)."""
        return not self.tensorwise and self.block_cols > 0

    def check_columns(self, columns: int, what: str) -> None:
        if self.blocked and columns % self.block_cols:
            raise ValueError(f"{what}: the contraction dimension {columns} is not a multiple of the "
                             f"{self.block_cols}-element quantization block of format {self.fmt.name}; exclude "
                             f"this layer (precision.exclude) or choose a recipe/precision.block_size that divides it")


@dataclass
class QTensor:
    """Quantized operand: `data` [R, C] float8 (values on the format grid), `scale` fp32 (see module doc).
    `gain`: NVFP4's FP32 tensor-level inverse scale G (one element; scale * G is the stored E4M3 block scale), which
    the prescaled block GEMM needs to apply the block scales exactly in bf16; None for other scale rules."""

    data: torch.Tensor
    scale: torch.Tensor
    quantizer: Quantizer
    gain: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """float32 [R, C] = data * the scale of each element's block."""
        return self.data.float() * expand_scale(self.scale, self.quantizer, self.data.shape)


def expand_scale(scale: torch.Tensor, quantizer: Quantizer, shape) -> torch.Tensor:
    """Broadcast a scale tensor to every element of an operand of `shape` [R, C] (float32)."""
    rows, cols = shape
    if quantizer.tensorwise or not quantizer.blocked and quantizer.block_rows == 1:
        return scale.reshape(-1, 1) if scale.dim() else scale
    full = scale.repeat_interleave(quantizer.block_rows, dim=0)[:rows]
    block_cols = quantizer.block_cols or cols
    return full.repeat_interleave(block_cols, dim=1)


def check_finite(amax: torch.Tensor, what: str) -> None:
    """Raise on NaN/Inf amax for CPU tensors. On CUDA no host sync is forced: a non-finite amax gives a
    NaN scale (see `scales_from_amax`), so the whole GEMM output turns NaN and the trainer's NaN guard
    stops (or skips) that step with its number -- never a silently wrong finite result."""
    if torch.compiler.is_compiling():   # no data-dependent branch inside a graph: NaN propagates instead
        return
    if amax.device.type == "cpu" and not bool(torch.isfinite(amax).all()):
        raise NonFiniteAmaxError(f"{what}: non-finite values (NaN/Inf) reached the quantizer's amax; the "
                                 f"high-precision tensor already overflowed -- lower the learning rate or check the "
                                 f"inputs (trainer.on_nan=skip skips such steps)")


def reduce_amax(amax: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """The max of `amax` over `quantizer.amax_group` (tensor-parallel shards of one scale span); as is without
    a group. NaN is turned into +Inf first, so that no rank's NaN can be lost in the reduction."""
    if quantizer.amax_group is None:
        return amax
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax.float())
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=quantizer.amax_group)
    return amax


def block_amax(x: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """amax (fp32) of |x| over each scale block: [] | [R, 1] | [ceil(R/br), C/bc]."""
    magnitude = x.float().abs()
    if quantizer.tensorwise:
        return magnitude.amax()
    if not quantizer.blocked and quantizer.block_rows == 1:
        return magnitude.amax(dim=1, keepdim=True)
    rows, cols = x.shape
    br, bc = quantizer.block_rows, quantizer.block_cols or cols
    padded_rows = -(-rows // br) * br
    if padded_rows != rows:                       # a partial last row block: zero rows do not change amax
        magnitude = torch.nn.functional.pad(magnitude, (0, 0, 0, padded_rows - rows))
    return magnitude.reshape(padded_rows // br, br, cols // bc, bc).amax(dim=(1, 3))


AMAX_FLOOR = 2.0 ** -100     # a nonzero amax below this scales as this: fmt.max / amax stays finite (float32 ends
                             # at 2^128). Found on an H200 (2026-12-01): a key projection's output-gradient row with
                             # amax ~1e-38 gave inv = Inf, 0 * Inf = NaN in the FP8 operand, NaN gradients everywhere.


def nvfp4_global_inverse(tensor_amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """NVFP4 FP32 tensor-level inverse scale 448 * 6 / amax (1 for an all-zero tensor), IEEE division."""
    return torch.where(tensor_amax > 0,
                       torch.full_like(tensor_amax, E4M3.max * fmt.max) / tensor_amax.clamp(min=AMAX_FLOOR),
                       torch.ones_like(tensor_amax))


def scales_from_amax(amax: torch.Tensor, quantizer: Quantizer,
                     tensor_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inv_scale), fp32, same shape as `amax`. All-zero blocks get scale 1 (their values stay 0); a block
    whose amax is below AMAX_FLOOR is scaled as if its amax were AMAX_FLOOR (no Inf inverse)."""
    fmt = quantizer.fmt
    amax = amax.float()
    finite = torch.isfinite(amax)
    if quantizer.scale_rule == "absmax":
        # tensor / tensor: IEEE division on CPU and CUDA (a Python scalar numerator or denominator makes
        # torch multiply by a reciprocal instead, which the Triton kernels could not reproduce bit for bit)
        inv = torch.where(amax > 0, torch.full_like(amax, fmt.max) / amax.clamp(min=AMAX_FLOOR), torch.ones_like(amax))
        scale = inv.reciprocal()
    elif quantizer.scale_rule == "pow2":
        exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 127 - 2          # floor(log2 amax) - emax(E2M1)
        exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).clamp(-126, 126)
        scale = ((exponent + 127) << 23).view(torch.float32)                 # 2^e (the E8M0 scale)
        inv = ((127 - exponent) << 23).view(torch.float32)                   # 2^-e, exact
    elif quantizer.scale_rule == "nvfp4":
        if tensor_amax is None:
            tensor_amax = amax.amax()
        tensor_amax = tensor_amax.float()
        global_inv = nvfp4_global_inverse(tensor_amax, fmt)
        # the stored E4M3 scale: amax times one per-tensor factor g / 6 (TransformerEngine's order), no division per
        # block -- the FP4 block kernels' cost was their IEEE divisions (bench/ptx_mix.py)
        factor = global_inv * torch.full_like(global_inv, 1.0 / fmt.max)
        block_scale = round_to_format(amax * factor, E4M3)
        scale = block_scale * global_inv.reciprocal()
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        finite = finite & torch.isfinite(tensor_amax)
    else:
        raise ValueError(f"scale_rule={quantizer.scale_rule!r} is not known; use absmax, nvfp4 or pow2")
    nan = torch.full_like(scale, float("nan"))
    return torch.where(finite, scale, nan), torch.where(finite, inv, nan)


def quantize_reference(x: torch.Tensor, quantizer: Quantizer, noise: torch.Tensor | None = None,
                       what: str = "tensor", amax: torch.Tensor | None = None) -> QTensor:
    """Quantize x [R, C] (fp32/bf16/fp16) along its columns per `quantizer` -> QTensor (pure PyTorch).

    noise: uniform [0, 1) fp32 [R, C] for stochastic rounding, else round-to-nearest-even.
    amax: a tensorwise quantizer's amax given instead of reduced from x (delayed scaling, lowbit/precision/delayed.py):
    the whole tensor's, already reduced over `quantizer.amax_group` (tensor-parallel shards); values beyond it
    saturate at the format's largest magnitude.
    """
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [rows, contraction] tensor, got shape {tuple(x.shape)}")
    quantizer.check_columns(x.shape[1], what)
    if amax is not None and not quantizer.tensorwise:
        raise ValueError(f"{what}: a given amax needs a tensorwise quantizer (one scale), not {quantizer}")
    given = amax is not None
    amax = amax if given else block_amax(x, quantizer)
    tensor_amax = None
    if quantizer.blocked:       # block scales are local to a shard; NVFP4's FP32 tensor scale is not
        if quantizer.scale_rule == "nvfp4":
            tensor_amax = reduce_amax(amax.amax(), quantizer)
    elif not given:
        amax = reduce_amax(amax, quantizer)
    check_finite(amax, what)
    scale, inv = scales_from_amax(amax, quantizer, tensor_amax)
    data = cast_to_format(x.float() * expand_scale(inv, quantizer, x.shape), quantizer.fmt, noise)
    gain = None
    if tensor_amax is not None:
        gain = nvfp4_global_inverse(tensor_amax.float(), quantizer.fmt).reshape(1)
    return QTensor(data, scale, quantizer, gain)
