"""Training recipes: how each operand of the three GEMMs of a linear layer is quantized.

For y = x W^T with x [M, K] (M tokens), W [N, K]:
  forward  y  [M, N] = x  [M, K] . W   [N, K]^T   contraction K: x per token,   W per output channel
  dgrad    dx [M, K] = dy [M, N] . W^T [K, N]^T   contraction N: dy per token,  W^T per input channel
  wgrad    dW [N, K] = dy^T [N, M] . x^T [K, M]^T contraction M: dy^T per output channel, x^T per input channel
Each operand is passed with its contraction axis last, so one `Quantizer` (scaling along the last axis)
describes it; the "transposed axes for the backward GEMMs" are the `*_t` quantizers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from lowbit.kernels.hadamard_triton import SIZES
from lowbit.precision.formats import E2M1, E4M3, get_format
from lowbit.precision.scaling import Quantizer

log = logging.getLogger(__name__)

GEMMS = ("forward", "dgrad", "wgrad")      # y = x W^T, dx = dy W, dW = dy^T x
RECIPES = ("fp8_tensorwise", "fp8_rowwise", "fp8_blockwise", "fp4_vectorwise", "nvfp4", "mxfp4")
NVFP4_BLOCK = 16        # NVIDIA NVFP4: 16-element blocks, E4M3 block scale + FP32 tensor scale
MXFP4_BLOCK = 32        # OCP MX v1.0: 32-element blocks, E8M0 (power-of-two) scale


@dataclass(frozen=True)
class Recipe:
    name: str
    x: Quantizer            # x    [M, K] forward
    w: Quantizer            # W    [N, K] forward
    dy: Quantizer           # dy   [M, N] dgrad
    w_t: Quantizer          # W^T  [K, N] dgrad
    dy_t: Quantizer         # dy^T [N, M] wgrad
    x_t: Quantizer          # x^T  [K, M] wgrad
    token_multiple: int = 16        # tokens M are zero-padded to a multiple of this (exact; logged once)
    dge: bool = False               # arXiv 2501.17116 sec. 3.1: Differentiable Gradient Estimator (weights)
    dge_k: float = 5.0
    dge_clip: float = 3.0
    occ: bool = False               # arXiv 2501.17116 sec. 3.2: Outlier Clamping and Compensation (activations)
    occ_quantile: float = 0.99
    occ_scope: str = "tensor"       # OCC's threshold: one quantile per tensor (the paper's) | per token (causal)
    occ_product: str = "dense"      # OCC's compensation products: dense (bf16 GEMMs, compiles) | fp8 (E4M3 residual,
                                    # FP8 GEMMs) | sparse (compressed rows)
    stochastic_rounding: bool = False   # dy / dy^T rounded stochastically (unbiased gradients)
    hadamard: int = 0               # block size of the random Hadamard transform on wgrad inputs (0 = off)
    asymmetric: bool = False        # AFPQ (arXiv 2311.01792): separate scales for W's positive/negative values
    high_precision: tuple[str, ...] = ()    # GEMMs computed unquantized in the compute dtype: forward | dgrad | wgrad
    block_gemm: str = "cublas"      # block GEMM scheme: cublas (fp8_blockwise: cuBLASLt where it takes the operands,
                                    # else rescale) | rescale | prescale | dequant (lowbit.kernels.gemm)
    outlier_group: Any = field(default=None, compare=False, repr=False)   # TP: x is a shard; OCC's quantile spans the group


def _uniform(fmt, block_rows, block_cols, rule="absmax") -> Quantizer:
    return Quantizer(fmt, block_rows, block_cols, rule)


def build_recipe(cfg) -> Recipe:
    """The Recipe of a PrecisionConfig (`cfg.recipe` one of RECIPES)."""
    if cfg.grad_format not in ("e4m3", "e5m2"):
        raise ValueError(f"precision.grad_format={cfg.grad_format!r} is not supported; use e4m3 or e5m2")
    grad = get_format(cfg.grad_format)
    name = cfg.recipe
    if name == "fp8_tensorwise":
        act, wgt, g = (_uniform(E4M3, 0, 0),) * 2 + (_uniform(grad, 0, 0),)
        quantizers = dict(x=act, w=wgt, dy=g, w_t=wgt, dy_t=g, x_t=act)
        multiple = 16
    elif name == "fp8_rowwise":
        row, grow = _uniform(E4M3, 1, 0), _uniform(grad, 1, 0)
        quantizers = dict(x=row, w=row, dy=grow, w_t=row, dy_t=grow, x_t=row)
        multiple = 16
    elif name == "fp8_blockwise":       # DeepSeek-V3 (arXiv 2412.19437 sec. 3.3.2): 1x128 tiles, 128x128 weight blocks
        b = cfg.block_size
        tile, square, gtile = _uniform(E4M3, 1, b), _uniform(E4M3, b, b), _uniform(grad, 1, b)
        quantizers = dict(x=tile, w=square, dy=gtile, w_t=square, dy_t=gtile, x_t=tile)
        multiple = max(16, b)
    elif name == "fp4_vectorwise":      # arXiv 2501.17116: W4A4 per-channel / per-token absmax, gradients FP8
        row4, grow = _uniform(E2M1, 1, 0), _uniform(grad, 1, 0)
        quantizers = dict(x=row4, w=row4, dy=grow, w_t=row4, dy_t=grow, x_t=row4)
        multiple = 16
    elif name in ("nvfp4", "mxfp4"):    # every GEMM input in FP4 blocks (NVIDIA NVFP4 recipe / Quartet)
        block, rule = (NVFP4_BLOCK, "nvfp4") if name == "nvfp4" else (MXFP4_BLOCK, "pow2")
        q = _uniform(E2M1, 1, block, rule)
        quantizers = dict(x=q, w=q, dy=q, w_t=q, dy_t=q, x_t=q)
        multiple = max(16, block)
    else:
        raise ValueError(f"precision.recipe={name!r} is not a quantized recipe; use bf16 or one of {list(RECIPES)}")
    fp4_weights = quantizers["w"].fmt is E2M1
    for option in ("dge", "asymmetric"):
        if getattr(cfg, option) and not fp4_weights:
            raise ValueError(f"precision.{option}=true applies to FP4 weights only; recipe {name} has "
                             f"{quantizers['w'].fmt.name} weights (use fp4_vectorwise, nvfp4 or mxfp4)")
    if cfg.asymmetric and quantizers["w"].blocked:
        raise ValueError(f"precision.asymmetric=true is implemented for per-channel FP4 weights (fp4_vectorwise), "
                         f"not for the block recipe {name}")
    if cfg.occ and not 0.5 < cfg.occ_quantile < 1.0:
        raise ValueError(f"precision.occ_quantile={cfg.occ_quantile} must lie in (0.5, 1), e.g. 0.99")
    occ_product = cfg.occ_product
    if occ_product not in ("dense", "fp8", "sparse"):
        raise ValueError(f"precision.occ_product={occ_product!r} is not supported; use dense (the residual's products "
                         f"as bf16 GEMMs), fp8 (the residual rounded to E4M3, FP8 GEMMs) or sparse (compressed rows "
                         f"and a gather kernel)")
    occ_scope = cfg.occ_scope
    if occ_scope not in ("tensor", "token"):
        raise ValueError(f"precision.occ_scope={occ_scope!r} is not supported; use tensor (one clamp quantile over the "
                         f"activation tensor, as in arXiv 2501.17116) or token (each token's own quantile: causal)")
    if cfg.occ and occ_scope == "token" and occ_product == "sparse":
        raise ValueError(f"precision.occ_scope=token needs precision.occ_product=dense or fp8 (got "
                         f"{occ_product!r}): the compressed-row residual takes one threshold per tensor")
    block_gemm = cfg.block_gemm
    if block_gemm not in ("auto", "cublas", "rescale", "prescale", "dequant"):
        raise ValueError(f"precision.block_gemm={block_gemm!r} is not supported; use auto (the default: dequant for "
                         f"nvfp4 / mxfp4, cublas otherwise), cublas, rescale, prescale or dequant")
    if block_gemm == "auto":
        # H200, 2026-12-02 (bench/linear.py, compiled, two runs): fwd+bwd of one nvfp4 / mxfp4 linear 0.65-0.76x /
        # 0.86-0.93x of bf16 by dequant against 0.27-0.28x / 0.33-0.35x prescaled and 0.14x / 0.24x rescaled.
        # fp8_blockwise (H200, 2026-12-04, bench/block_gemm.py --cublas, two calls): cuBLASLt's block-scaled GEMM
        # 1,091-1,126 TFLOP/s (1x128 x 128x128) and 876-914 (1x128 x 1x128) against the Triton kernel's 580-717
        block_gemm = "dequant" if name in ("nvfp4", "mxfp4") else "cublas"
    if block_gemm == "cublas" and name in ("nvfp4", "mxfp4"):
        raise ValueError(f"precision.block_gemm=cublas takes 128-element K blocks (cuBLASLt's block scaling on "
                         f"Hopper); recipe {name} has {NVFP4_BLOCK if name == 'nvfp4' else MXFP4_BLOCK}-element blocks: "
                         f"use dequant, prescale or rescale")
    if block_gemm in ("prescale", "dequant") and name not in ("nvfp4", "mxfp4"):
        raise ValueError(f"precision.block_gemm={block_gemm} applies the block scales in bf16, exact only for FP4 "
                         f"blocks with E4M3 or power-of-two scales (recipes nvfp4, mxfp4); recipe {name} needs "
                         f"rescale")
    hadamard = cfg.hadamard_size if cfg.hadamard else 0
    if hadamard and hadamard & (hadamard - 1):
        raise ValueError(f"precision.hadamard_size={hadamard} must be a power of two (16 as in NVIDIA's NVFP4 recipe)")
    if hadamard and not SIZES[0] <= hadamard <= SIZES[1]:
        log.warning("precision.hadamard_size=%d: the fused Hadamard kernel takes %d..%d; CUDA runs apply this "
                    "transform as a float32 block product (hadamard_last_axis), ~3x slower on an H200", hadamard, *SIZES)
    high_precision = _high_precision(cfg, hadamard)
    return Recipe(name=name, token_multiple=max(multiple, hadamard), dge=cfg.dge, dge_k=cfg.dge_k,
                  dge_clip=cfg.dge_clip, occ=cfg.occ, occ_quantile=cfg.occ_quantile, occ_product=occ_product,
                  occ_scope=occ_scope,
                  stochastic_rounding=cfg.stochastic_rounding, hadamard=hadamard, asymmetric=cfg.asymmetric,
                  high_precision=high_precision, block_gemm=block_gemm, **quantizers)


def _high_precision(cfg, hadamard: int) -> tuple[str, ...]:
    """precision.high_precision, checked: GEMMs among forward, dgrad, wgrad, and no option that acts on one of them."""
    gemms = tuple(dict.fromkeys(cfg.high_precision))
    unknown = [g for g in gemms if g not in GEMMS]
    if unknown:
        raise ValueError(f"precision.high_precision={list(cfg.high_precision)}: {unknown} are not GEMMs of a linear "
                         f"layer; use any of {list(GEMMS)} (e.g. [wgrad] keeps the weight gradient in high precision)")
    conflicts = {"forward": [("occ", cfg.occ), ("dge", cfg.dge), ("asymmetric", cfg.asymmetric)],
                 "wgrad": [("hadamard", bool(hadamard))]}
    for gemm in gemms:
        for option, on in conflicts.get(gemm, []):
            if on:
                raise ValueError(f"precision.{option}=true acts on the quantized {gemm} GEMM, which "
                                 f"precision.high_precision={list(gemms)} leaves unquantized; drop one of the two")
    if len(gemms) == len(GEMMS):
        raise ValueError(f"precision.high_precision={list(gemms)} leaves no GEMM quantized; use precision=bf16")
    return gemms


def occ_residual_quantizer(quantizer: Quantizer) -> Quantizer:
    """precision.occ_product=fp8: OCC's residual in E4M3 with one absmax scale per row along the contraction axis
    (per token for the forward GEMM, per input channel for the weight gradient's), over the same amax group as
    the operand it compensates."""
    return replace(quantizer, fmt=E4M3, block_rows=1, block_cols=0, scale_rule="absmax")


def with_grad_format(recipe: Recipe, fmt_name: str) -> Recipe:
    """The same recipe with another FP8 gradient format (for tests and ablations)."""
    fmt = get_format(fmt_name)
    return replace(recipe, dy=replace(recipe.dy, fmt=fmt), dy_t=replace(recipe.dy_t, fmt=fmt))
