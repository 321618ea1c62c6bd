"""QuantLinear: an nn.Linear whose forward, input-gradient and weight-gradient GEMMs all run on
quantized operands (lowbit/precision/recipes.py says which format and scaling axis each gets).

Master weights, their gradients and the optimizer state stay in the weight's own dtype (float32 by
default); only GEMM inputs are quantized, on the fly, every step. QuantLinear keeps nn.Linear's
`weight`/`bias` parameters, so its state_dict (and an HF export) is that of a plain nn.Linear.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from lowbit.kernels.dge_triton import dge_weight_gradient_triton
from lowbit.kernels.quantize import quantize, quantize_pair
from lowbit.precision.fp8_gather import GatheredFP8Weight, GatheredPairs
from lowbit.precision.gemm import quantized_matmul
from lowbit.precision.methods import clamp_outliers, dge_derivative, hadamard_matrix, hadamard_transposed, residual_from
from lowbit.precision.recipes import GEMMS, Recipe, occ_residual_quantizer
from lowbit.precision.sharded import shard_recipe, tensor_parallel_layout
from lowbit.precision.scaling import QTensor, expand_scale, reduce_amax

log = logging.getLogger("lowbit")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOGGED: set[str] = set()
# LOWBIT_NAN_PROBE=1 (eager runs, a diagnosis aid; lowbit/train/nan_probe.py does the rest): every quantized GEMM's
# inputs, scales and outputs are checked, one host synchronisation each.
NAN_PROBE = os.environ.get("LOWBIT_NAN_PROBE") == "1"


def probe(what: str, shape: tuple, **tensors) -> None:
    """Raise FloatingPointError at the first non-finite tensor, naming it, its layer's [N, K] and its largest
    finite magnitude."""
    for name, t in tensors.items():
        if t is None:
            continue
        bad = ~torch.isfinite(t.float())
        if bool(bad.any()):
            largest = t.float()[~bad].abs().max().item() if bool((~bad).any()) else 0.0
            raise FloatingPointError(f"LOWBIT_NAN_PROBE: {what} of a QuantLinear [N, K] = {shape}: {name} "
                                     f"{tuple(t.shape)} {t.dtype} has {int(bad.sum())} non-finite entries; finite "
                                     f"max |.| {largest:.3e}")


def log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the token rows of t [M, C] to a multiple of `multiple` (exact: zero rows add nothing)."""
    extra = (-t.shape[0]) % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def note_padding(tokens: int, token_multiple: int) -> None:
    """Log once that `tokens` rows (an input's and its output gradient's) will be zero-padded. Not inside a traced
    graph: a side effect there is a graph break (logging) or is dropped; the trainer calls this before compiling
    with the tokens its linears will see (lowbit.train.run)."""
    if tokens % token_multiple and not torch.compiler.is_compiling():
        log_once(f"precision: an input has {tokens} tokens, not a multiple of {token_multiple}; zero-padding them "
                 f"and their output gradient (exact, costs one copy each; use a batch x sequence that is a multiple "
                 f"of {token_multiple} to avoid it)")


def weight_parts(weight: torch.Tensor, asymmetric: bool) -> list[torch.Tensor]:
    """AFPQ (arXiv 2311.01792): W = max(W, 0) + min(W, 0), each part scaled by its own absmax, i.e.
    separate scales for positive and negative values; the GEMM is the sum of one GEMM per part."""
    return [weight.clamp(min=0), weight.clamp(max=0)] if asymmetric else [weight]


def _quantize_operand(t: torch.Tensor, quantizer, quantizer_t, what: str, direct: bool, transposed: bool,
                      transform: torch.Tensor | None = None,
                      amax: torch.Tensor | None = None) -> tuple[QTensor | None, QTensor | None]:
    """t [R, C] quantized along C and t^T along R (after the Hadamard `transform`, if any), each only where its GEMM is
    quantized (precision.high_precision); one fused pass when both are wanted. amax: a tensorwise amax given (delayed
    scaling: no Hadamard transform)."""
    if direct and transposed and transform is None:
        return quantize_pair(t, quantizer, quantizer_t, what, amax=amax)
    tq = quantize(t, quantizer, what=what, amax=amax) if direct else None
    if not transposed:
        return tq, None
    tt, tt_amax = (t.t().contiguous(), None) if transform is None else hadamard_transposed(t, transform)
    return tq, quantize(tt, quantizer_t, what=what + "^T", tensor_amax=tt_amax, amax=amax)


def quantize_weight(weight: torch.Tensor, recipe: Recipe, quantized: dict[str, bool]) -> list[tuple]:
    """[(W_q along K, W^T_q along N)] per weight part (two under AFPQ), each None where its GEMM is unquantized."""
    return [_quantize_operand(part, recipe.w, recipe.w_t, "weight", quantized["forward"], quantized["dgrad"])
            for part in weight_parts(weight, recipe.asymmetric)]


class QuantLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the three GEMMs quantized per `recipe` (those in recipe.high_precision run unquantized in
    the compute dtype, as nn.Linear runs them). x [..., K], W [N, K], b [N] -> y [..., N]."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, hadamard_signs, weight_cache=None, amax=None, sink=None,
                scaling=("current", "current"), clamped=None, *outliers):
        """weight_cache: a refreshed WeightCache of `weight` (precision.cache_weights) or None (quantize W here).
        amax, sink, scaling: delayed scaling of x and dy (lowbit/precision/delayed.py; tensorwise): `scaling` is the
        (x, dy) pair of modes; an operand in mode "delayed" is scaled by its entry of `amax` [2]; ("record", "record")
        scales both by their own amaxes, as "current" does, and returns those as the gradient of `sink` [2].
        clamped, outliers: OCC's clamp(x) [tokens, K] and residual (Outliers.tensors() or DenseResidual.tensors()),
        computed by quant_linear outside this function."""
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        quantized = {gemm: gemm not in recipe.high_precision for gemm in GEMMS}
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]) if clamped is None else clamped
            tokens = x2.shape[0]
            x2 = pad_rows(x2, recipe.token_multiple)
            residual = residual_from(outliers) if clamped is not None else None
            transform = hadamard_matrix(recipe.hadamard, hadamard_signs) if recipe.hadamard else None
            x_mode, dy_mode = scaling if sink is not None else ("current", "current")
            x_amax = None           # current scaling: reduced inside quantize
            if x_mode == "delayed":
                x_amax = amax[0]
            elif x_mode == "record":    # reduced here (over TP shards too), to be recorded
                x_amax = reduce_amax(x2.float().abs().amax(), recipe.x)
            xq, xtq = _quantize_operand(x2, recipe.x, recipe.x_t, "activation", quantized["forward"],
                                        quantized["wgrad"], transform, amax=x_amax)
            pairs = weight_cache.pairs if weight_cache is not None else quantize_weight(weight, recipe, quantized)
            # x in the compute dtype, for an unquantized forward or wgrad GEMM (cast once for both)
            x_plain = None if quantized["forward"] and quantized["wgrad"] else x2.to(out_dtype)
            if quantized["forward"]:
                y = _sum_matmuls(xq, [wq for wq, _ in pairs], out_dtype, recipe.block_gemm)[:tokens]
            else:
                y = x_plain[:tokens] @ weight.to(out_dtype).t()
            residual_saved, residual_fp8 = outliers, False      # what backward needs of the residual
            if residual is not None and recipe.occ_product == "fp8":
                # Compensation at FP8 rate: R per token in E4M3 times W's quantized parts (FP4 values are E4M3); R^T
                # per input channel for wgrad's compensation, from the same pass, saved instead of R (1 byte/entry)
                rq, rtq = _quantize_operand(pad_rows(residual.values, recipe.token_multiple),
                                            occ_residual_quantizer(recipe.x), occ_residual_quantizer(recipe.x_t),
                                            "OCC residual", True, quantized["wgrad"], transform)
                y = y + _sum_matmuls(rq, [wq for wq, _ in pairs], out_dtype, recipe.block_gemm)[:tokens]
                if rtq is not None:
                    residual_saved, residual_fp8 = (rtq.data, rtq.scale), True
            elif residual is not None:      # Compensation: y + (x - clamp(x)) W_hat^T, in high precision
                w_hat = sum(wq.dequantize() for wq, _ in pairs)
                y = residual.matmul_add(y, w_hat.t())    # one rounding to y's dtype
            if bias is not None:
                y = y + bias.to(out_dtype)
            if NAN_PROBE:
                probe("forward", tuple(weight.shape), x=x2, x_scale=None if xq is None else xq.scale,
                      xt_scale=None if xtq is None else xtq.scale,
                      w_scale=None if pairs[0][0] is None else pairs[0][0].scale, y=y)
        ctx.recipe, ctx.tokens, ctx.x_shape, ctx.x_dtype = recipe, tokens, x.shape, x.dtype
        ctx.has_bias, ctx.compute_dtype, ctx.parts = bias is not None, out_dtype, len(pairs)
        weight_scales = [wq.scale for wq, _ in pairs] if quantized["forward"] else []
        # wgrad's x: quantized x^T, or x itself in the compute dtype; dgrad's W: quantized W^T parts, or W itself
        x_saved = [xtq.data, xtq.scale, xtq.gain] if quantized["wgrad"] else [x_plain, None, None]
        wt_saved = [t for _, wtq in pairs for t in (wtq.data, wtq.scale, wtq.gain)] if quantized["dgrad"] else []
        ctx.occ_inputs = 0 if clamped is None else 1 + len(outliers)
        ctx.residual_fp8 = residual_fp8             # R^T saved quantized (occ_product=fp8) instead of R
        ctx.residual_tensors, ctx.weight_scales, ctx.wt_saved = len(residual_saved), len(weight_scales), len(wt_saved)
        ctx.dy_mode = dy_mode
        delayed_saved = (amax if dy_mode == "delayed" else None, x_amax if x_mode == "record" else None)
        ctx.save_for_backward(weight, *x_saved, *wt_saved, *weight_scales, *residual_saved, *delayed_saved,
                              transform if transform is not None else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        recipe: Recipe = ctx.recipe
        quantized = {gemm: gemm not in recipe.high_precision for gemm in GEMMS}
        weight, x_data, x_scale, x_gain, *rest = ctx.saved_tensors
        n_wt, n_scales = ctx.wt_saved, ctx.weight_scales
        wt_saved, weight_scales = rest[:n_wt], rest[n_wt:n_wt + n_scales]
        outliers, transform = rest[n_wt + n_scales:n_wt + n_scales + ctx.residual_tensors], rest[-1]
        given_amax, recorded_x_amax = rest[-3:-1]
        residual = residual_from(outliers) if ctx.occ_inputs and not ctx.residual_fp8 else None
        rtq = QTensor(*outliers, occ_residual_quantizer(recipe.x_t)) if ctx.residual_fp8 else None
        cd = ctx.compute_dtype
        dx = dw = db = None
        want_dx, want_dw = ctx.needs_input_grad[:2]
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = pad_rows(dy.reshape(-1, dy.shape[-1]), recipe.token_multiple)
            dy_amax = None          # current scaling: reduced inside quantize
            if ctx.dy_mode == "delayed":
                dy_amax = given_amax[1]
            elif ctx.dy_mode == "record":
                dy_amax = reduce_amax(dy2.float().abs().amax(), recipe.dy)
            quantize_dy, quantize_dyt = want_dx and quantized["dgrad"], want_dw and quantized["wgrad"]
            stochastic = recipe.stochastic_rounding      # each quantization of dy draws its own uniform noise
            dyq = dytq = None
            if not stochastic and transform is None and quantize_dy and quantize_dyt:
                dyq, dytq = quantize_pair(dy2, recipe.dy, recipe.dy_t, "output gradient", amax=dy_amax)   # one pass
            if want_dx and quantized["dgrad"]:
                wtqs = [QTensor(*wt_saved[3 * i:3 * i + 2], recipe.w_t, wt_saved[3 * i + 2]) for i in range(ctx.parts)]
                dyq = dyq if dyq is not None else quantize(dy2, recipe.dy, stochastic=stochastic,
                                                           what="output gradient", amax=dy_amax)
                dx = _sum_matmuls(dyq, wtqs, cd, recipe.block_gemm)[:ctx.tokens]
            elif want_dx:
                dx = dy2[:ctx.tokens].to(cd) @ weight.to(cd)
            if dx is not None:
                dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
            if quantize_dyt and dytq is None:
                dyt, dyt_amax = ((dy2.t().contiguous(), None) if transform is None
                                 else hadamard_transposed(dy2, transform))
                dytq = quantize(dyt, recipe.dy_t, stochastic=stochastic, what="output gradient^T",
                                tensor_amax=dyt_amax, amax=dy_amax)
            if want_dw:
                if quantized["wgrad"]:
                    # float32 master weights: straight from the GEMM's float32 accumulator (no rounding to cd and no
                    # cast pass; 9 ms of a 766 ms llama_1b fp8 step on an H200); otherwise in cd, as before
                    wgrad_dtype = torch.float32 if weight.dtype == torch.float32 else cd
                    dw = quantized_matmul(dytq, QTensor(x_data, x_scale, recipe.x_t, x_gain), wgrad_dtype,
                                          recipe.block_gemm).float()
                else:
                    dw = (dy2.t().to(cd) @ x_data).float()
                if rtq is not None:         # at FP8 rate: the quantized dy^T (made for the wgrad GEMM) times R^T
                    dw = dw + quantized_matmul(dytq, rtq, torch.float32).float()
                elif residual is not None:  # the compensation's weight gradient: dy^T (x - clamp(x))
                    dw = dw + residual.t_matmul(dy2[:ctx.tokens], weight.shape[1]).t()
                if recipe.dge:               # arXiv 2501.17116 eq. 8: dL/dW = dL/dW_q * f'(W / scale)
                    dge = (dge_weight_gradient_triton if dw.is_cuda and not torch.compiler.is_compiling()
                           else dge_weight_gradient)            # compiled layers fuse the PyTorch path themselves
                    dw = dge(dw, weight, list(weight_scales), recipe.w, recipe.dge_k, recipe.dge_clip)
                dw = dw.to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.float().sum(0).to(weight.dtype)
            if NAN_PROBE:
                probe("backward", tuple(weight.shape), dy=dy2, dy_scale=None if dyq is None else dyq.scale,
                      dyt_scale=None if dytq is None else dytq.scale, dx=dx, dw=dw)
        # delayed scaling's record: the (x, dy) amaxes leave as the gradient of `sink` (summed into its leaf)
        dsink = torch.stack([recorded_x_amax, dy_amax]) if ctx.dy_mode == "record" else None
        return (dx, dw, db, None, None, None, None, dsink, None) + (None,) * ctx.occ_inputs


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias, recipe: Recipe, hadamard_signs,
                 weight_cache=None, delayed: tuple = (None, None, ("current", "current"))) -> torch.Tensor:
    """QuantLinearFunction; with OCC, its clamp and residual are computed first (lowbit.precision.methods).
    recipe.occ_product="dense" (the default): the residual is a full matrix and its products GEMMs, static shapes,
    so torch.compile keeps the layer in one graph; "fp8": the same, its products in FP8 (the residual rounded to E4M3
    per token / per input channel). "sparse": compressed rows with data-dependent sizes; under
    torch.compile such a layer runs eagerly (torch.compiler.disable): tracing the sizes through
    (capture_dynamic_output_shape_ops) compiles with Inductor on CPU (torch 2.13) but failed in Inductor's
    scheduler on the H200 end to end (torch 2.11, 2026-12-01, docs/bench_h200_2026-12-01/e2e_call3_traced_failed.log)."""
    note_padding(x.shape[:-1].numel(), recipe.token_multiple)
    if not recipe.occ:
        return QuantLinearFunction.apply(x, weight, bias, recipe, hadamard_signs, weight_cache, *delayed)
    if recipe.occ_product in ("dense", "fp8"):
        return occ_linear(x, weight, bias, recipe, hadamard_signs, weight_cache)
    return _occ_linear_eager(x, weight, bias, recipe, hadamard_signs, weight_cache)


def occ_linear(x, weight, bias, recipe: Recipe, hadamard_signs, weight_cache=None) -> torch.Tensor:
    product = "dense" if recipe.occ_product == "fp8" else recipe.occ_product      # fp8: a full residual matrix too
    clamped, residual = clamp_outliers(x.detach().reshape(-1, x.shape[-1]), recipe.occ_quantile, recipe.outlier_group,
                                       product=product, scope=recipe.occ_scope)
    return QuantLinearFunction.apply(x, weight, bias, recipe, hadamard_signs, weight_cache, None, None,
                                     ("current", "current"), clamped, *residual.tensors())


_occ_linear_eager = torch.compiler.disable(occ_linear)


def _sum_matmuls(a: QTensor, bs: list[QTensor], out_dtype: torch.dtype, block_gemm: str) -> torch.Tensor:
    if len(bs) == 1:
        return quantized_matmul(a, bs[0], out_dtype, block_gemm)
    return sum(quantized_matmul(a, b, torch.float32, block_gemm) for b in bs).to(out_dtype)


def dge_weight_gradient(dw: torch.Tensor, weight: torch.Tensor, scales: list[torch.Tensor], quantizer, k: float,
                        clip: float) -> torch.Tensor:
    """DGE's weight gradient: dw [N, K] float32 times f'(W / s), s the forward scale of W's own element (per sign
    under AFPQ: scales = [positive, negative])."""
    w = weight.float()
    scale = expand_scale(scales[0], quantizer, w.shape)
    if len(scales) == 2:
        scale = torch.where(w >= 0, scale, expand_scale(scales[1], quantizer, w.shape))
    return dw * dge_derivative(w / scale, quantizer.fmt, k, clip)


class QuantLinear(nn.Linear):
    """nn.Linear computing with quantized GEMMs per `recipe`; same parameters and state_dict keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Recipe, name: str = "", seed: int = 0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe, self.layer_name = recipe, name
        what = f"layer {name or 'QuantLinear'} [{out_features} x {in_features}]"
        for quantizer, columns in ((recipe.x, in_features), (recipe.w, in_features), (recipe.dy, out_features),
                                   (recipe.w_t, out_features)):
            quantizer.check_columns(columns, what)
        signs = torch.randint(0, 2, (max(recipe.hadamard, 1),), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self.register_buffer("hadamard_signs", signs.float(), persistent=False)   # not in the state_dict
        self.stats_armed = False
        self.last_stats: dict[str, float] = {}
        self.shard_recipe: Recipe | None = None      # set under tensor parallelism (prepare_tensor_parallel),
        self.shard_layout = ""                       # with its layout: colwise | rowwise
        self.weight_cache = None                     # a WeightCache under precision.cache_weights (weight_cache.py)
        self.delayed = None                          # a DelayedScaling under precision.scaling=delayed (delayed.py),
        self.delayed_amax = self.delayed_sink = None     # and this layer's tensors in it

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, name: str = "", seed: int = 0) -> "QuantLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                     recipe=recipe, name=name, seed=seed)
        module.weight, module.bias = linear.weight, linear.bias           # the same Parameters (no copy)
        module.hadamard_signs = module.hadamard_signs.to(linear.weight.device)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.layer_name or 'QuantLinear'}: input dtype {x.dtype} is not supported; quantized "
                            f"linears take float32, bfloat16 or float16 (cast the input, or exclude the layer)")
        if isinstance(self.weight, DTensor):
            return self._forward_tensor_parallel(x)
        if self.stats_armed and self.training:
            from lowbit.precision.stats import record
            record(self, x, self.weight, self.recipe)
        cache = self.weight_cache if self.weight_cache is not None and self.weight_cache.pairs is not None else None
        if isinstance(self.weight, GatheredFP8Weight):      # FSDP2 gathered it in E4M3 (parallel.fsdp_fp8_all_gather)
            weight = self.weight        # its E4M3 bytes and scale (inner tensors; a method call would break the graph)
            cache = GatheredPairs([(QTensor(weight._data, weight._scale, self.recipe.w),
                                    QTensor(weight._data.t(), weight._scale, self.recipe.w_t))])
        if self.delayed is None:
            return quant_linear(x, self.weight, self.bias, self.recipe, self.hadamard_signs, cache)
        return quant_linear(x, self.weight, self.bias, self.recipe, self.hadamard_signs, cache,
                            self.delayed.operands(self))

    # ---- tensor parallelism (DTensor weights from parallelize_module) -----------------------------------
    def prepare_tensor_parallel(self) -> None:
        """Build and check this layer's shard recipe once its weight is a DTensor (lowbit.parallel calls this
        right after sharding, so a shard the recipe cannot tile fails before training)."""
        self.shard_layout = tensor_parallel_layout(self.weight, self.layer_name)
        local = self.weight.to_local().shape[0 if self.shard_layout == "colwise" else 1]
        self.shard_recipe = shard_recipe(self.recipe, self.shard_layout, self.weight.device_mesh.get_group(), local,
                                         self.layer_name or "QuantLinear")

    def _forward_tensor_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank runs the quantized GEMMs on its shards (QuantLinearFunction on local tensors) with the
        shard recipe; the output is Shard(-1) (column-parallel) or Partial (row-parallel) for the style's
        output redistribution, exactly as nn.Linear's sharded F.linear would return it."""
        if self.shard_recipe is None:
            self.prepare_tensor_parallel()
        layout = self.shard_layout
        if isinstance(x, DTensor):
            # Column-parallel: x is replicated and each rank's dx = dy_shard W_shard is a partial sum (the
            # DTensor machinery all-reduces it); row-parallel: x is Shard(-1) and dx is this rank's shard.
            x_local = x.to_local(grad_placements=(Partial(),) if layout == "colwise" else None)
        else:
            x_local = x
        weight = self.weight.to_local()
        bias = self.bias.to_local() if self.bias is not None and layout == "colwise" else None
        if self.stats_armed and self.training:
            from lowbit.precision.stats import record
            record(self, x_local, weight, self.shard_recipe)
        delayed = () if self.delayed is None else (self.delayed.operands(self),)
        y = quant_linear(x_local, weight, bias, self.shard_recipe, self.hadamard_signs, None, *delayed)
        mesh = self.weight.device_mesh
        if layout == "colwise":
            return DTensor.from_local(y, mesh, (Shard(y.dim() - 1),), run_check=False)
        y = DTensor.from_local(y, mesh, (Partial(),), run_check=False)
        return y if self.bias is None else y + self.bias      # the replicated bias, once, after the sum

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"
