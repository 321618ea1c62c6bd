"""FP8 all-gathers under FSDP2 (`parallel.fsdp_fp8_all_gather`): the weights of fp8 tensorwise QuantLinears are cast
to E4M3 on their shards, before FSDP2 gathers them, so each all-gather moves 1 byte per parameter instead of 4 (2 with
`parallel.fsdp_param_dtype=bfloat16`), and the gathered weight is already the forward GEMM's operand.

Tensorwise quantization is element-wise once the scale is known, and the scale needs only the amax of the whole
weight: the maximum of the shards' amaxes (one small all-reduce per weight, once per optimizer step: the cast shard
serves every gather until the weight changes). So the gathered E4M3 weight is, bit for bit, what quantizing the
gathered float32 weight would give. torchao's float8
training does the same with its `enable_fsdp_float8_all_gather`; this is lowbit's own, for its QuantLinear.

Two tensor subclasses carry it through FSDP2's all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`):
- `ShardedFP8Weight` wraps a float32 shard. Every op sees the plain shard (the optimizer, the checkpoint, clipping);
  the ops FSDP2 uses to build and pad the shard keep the wrapper. Before an all-gather it returns the shard in E4M3
  (as bytes) and its scale.
- `GatheredFP8Weight` is the unsharded parameter FSDP2 puts on the module: a float32-typed wrapper around the gathered
  E4M3 data and its scale. QuantLinear uses them as its weight's quantized operands (W_q, and W^T_q: the same bytes
  transposed) and returns a float32 weight gradient, which FSDP2 reduce-scatters as usual.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

aten = torch.ops.aten
QUANTIZED_SHARDS = [0]      # shards quantized so far in this process (a test's count)


# the ops FSDP2 shards, pads and copies a parameter with keep the wrapper; every other op (the optimizer's, a norm, a
# checkpoint's gather) returns plain tensors
_PRESERVE = {aten.empty_like.default, aten.new_zeros.default, aten.slice.Tensor, aten.copy_.default, aten.view.default,
             aten.as_strided.default, aten._to_copy.default, aten._pin_memory.default, aten.split.Tensor,
             aten.clone.default, aten.detach.default, aten.alias.default, aten.narrow.default}


class ShardedFP8Weight(torch.Tensor):
    """A float32 weight shard that FSDP2 all-gathers in E4M3 (see the module docstring); `layer` is its QuantLinear."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor, layer: nn.Module):
        return torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                   storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                   device=inner.device, layout=inner.layout,
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor, layer: nn.Module):
        self._inner = inner
        self._layer = layer

    def __repr__(self) -> str:
        return f"ShardedFP8Weight({self._inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        layer = next(a._layer for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, ShardedFP8Weight))
        unwrapped = pytree.tree_map_only(ShardedFP8Weight, lambda t: t._inner, (args, kwargs or {}))
        out = func(*unwrapped[0], **unwrapped[1])
        if func not in _PRESERVE:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: ShardedFP8Weight(t, layer), out)

    def __tensor_flatten__(self):
        return ["_inner"], self._layer

    @staticmethod
    def __tensor_unflatten__(inner_tensors, layer, outer_size, outer_stride):
        return ShardedFP8Weight(inner_tensors["_inner"], layer)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The shard in E4M3 at the whole weight's scale (its amax: the maximum over the shards, NaN as Inf), by the
        quantizer that QuantLinear would run on the gathered weight: the same bits. Quantized once per change of
        the weight (an optimizer step, an in-place write): the other gathers of the step (every micro-batch's forward
        and backward) reuse it, with no all-reduce."""
        from lowbit.kernels.quantize import quantize
        from lowbit.precision.weight_cache import generation    # fused optimizers write without a version bump

        shard = self._inner.detach()
        key = (shard.data_ptr(), self._inner._version, generation())
        if getattr(self, "_cached", None) is None or self._cached[0] != key:
            amax = shard.float().abs().amax()
            amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
            if mesh.size() > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
            wq = quantize(shard, self._layer.recipe.w, what=f"{self._layer.layer_name} weight", amax=amax)
            self._cached = key, wq.data.view(torch.uint8), wq.scale
            QUANTIZED_SHARDS[0] += 1
        return (self._cached[1],), self._cached[2]

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (data,), scale = outputs, metadata
        data = data.view(torch.float8_e4m3fn)
        if out is not None:         # the same storage as the first gather's output: only the scale is new
            out._scale = scale
            return None
        return GatheredFP8Weight(data, scale, param_dtype), (data,)


class GatheredFP8Weight(torch.Tensor):
    """The unsharded weight as FSDP2 gathered it: E4M3 `_data` [N, K] and its fp32 tensorwise `_scale`; typed `dtype`
    (FSDP2's parameter dtype), so autograd and FSDP2 take the float weight gradient QuantLinear returns for it."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, data.size(), strides=data.stride(),
                                                   storage_offset=data.storage_offset(), dtype=dtype,
                                                   device=data.device, requires_grad=False)

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self._data, self._scale = data, scale

    def __repr__(self) -> str:
        return f"GatheredFP8Weight({tuple(self.shape)}, scale={self._scale})"

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner_tensors, dtype, outer_size, outer_stride):
        return GatheredFP8Weight(inner_tensors["_data"], inner_tensors["_scale"], dtype)

    def dequantize(self) -> torch.Tensor:
        return self._data.to(self.dtype) * self._scale.to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            (t,) = args
            return GatheredFP8Weight(func(t._data), t._scale, t.dtype)
        if func is aten.as_strided.default:
            t, size, stride = args[:3]
            return GatheredFP8Weight(func(t._data, size, stride, *args[3:]), t._scale, t.dtype)
        if func is aten.view.default:
            t, size = args
            return GatheredFP8Weight(func(t._data, size), t._scale, t.dtype)
        # anything else (a statistic, a high-precision GEMM): on the dequantized weight
        return func(*pytree.tree_map_only(GatheredFP8Weight, lambda t: t.dequantize(), args),
                    **pytree.tree_map_only(GatheredFP8Weight, lambda t: t.dequantize(), kwargs))


class GatheredPairs:
    """A gathered weight's operands in the place of a WeightCache (QuantLinearFunction reads `.pairs`)."""

    def __init__(self, pairs: list):
        self.pairs = pairs


def wrap_fp8_weights(model: nn.Module) -> int:
    """Give every fp8 tensorwise QuantLinear of `model` a ShardedFP8Weight (before fully_shard); returns how many.
    Raises when there is none: the option would do nothing."""
    from lowbit.precision.linear import QuantLinear
    from lowbit.precision.weight_cache import watch_optimizer_steps

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    chosen = [m for m in layers if fp8_gather_supported(m)]
    if not chosen:
        found = sorted({m.recipe.name for m in layers}) or "no quantized linears"
        raise ValueError(f"parallel.fsdp_fp8_all_gather=true needs linears in fp8 tensorwise (precision=fp8_tensorwise, "
                         f"as +exp=fp8_llama), E4M3 weights, no AFPQ/DGE and quantized forward and input-gradient GEMMs; "
                         f"this model has {found}. Set precision=fp8_tensorwise or parallel.fsdp_fp8_all_gather=false")
    watch_optimizer_steps()
    for module in chosen:
        module.weight = nn.Parameter(ShardedFP8Weight(module.weight.data, module),
                                     requires_grad=module.weight.requires_grad)
    return len(chosen)


def fp8_gather_supported(layer) -> bool:
    """fp8 tensorwise weights in E4M3, one part (no AFPQ), forward and input-gradient GEMMs quantized, no DGE."""
    recipe = layer.recipe
    return (recipe.w.tensorwise and recipe.w_t.tensorwise and recipe.w.fmt.name == recipe.w_t.fmt.name == "e4m3"
            and not recipe.asymmetric and not recipe.dge and not {"forward", "dgrad"} & set(recipe.high_precision))
