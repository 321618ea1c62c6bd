"""Real low-bit export: codes packed into bytes + per-group scales/zeros in one safetensors file, and its loader.

Packing (`pack_codes`): b-bit codes (b = 2, 3, 4; FP4 codes are 4-bit) are taken 8 at a time, laid out as
one 8b-bit little-endian integer (code i at bits [b*i, b*i + b)), and stored as b bytes: 8 codes of int3 fill
exactly 3 bytes, int4 two codes per byte, int2 four. The flat code vector of a layer (row-major [out, in],
no group padding) is zero-padded to a multiple of 8.

File layout (tensor names use the layer's module name):
  NAME.qweight   uint8 [ceil(out*in/8) * b]  packed codes
  NAME.scale     float32 [out, n_groups]     (fp4_afpq: positive-side scale)
  NAME.zero      float32 [out, n_groups]     int formats: integer zero points (they may fall outside [0, 2^b-1])
  NAME.scale_neg float32 [out, n_groups]     fp4_afpq only
  every other state-dict tensor of the model as is (embeddings, norms, unquantized layers)
Metadata: "lowbit_quant" = JSON {NAME: {format, group_size, partial_groups, shape, dtype, bias}},
"hf_config" = the model's config as JSON. Scales are float32 so that the loader's dequantization is the
very computation the fake-quantized forward performs (lowbit.quant.fake_quant.dequantize): logits match exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.quant.fake_quant import QuantFormat, dequantize, from_groups, make_format, num_groups
from lowbit.quant.linear import FakeQuantLinear, fake_quant_layers

PACKED_SUFFIXES = ("qweight", "scale", "zero", "scale_neg")
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, values < 2^bits) -> uint8 [ceil(n/8) * bits] packed bytes."""
    if bits not in (2, 3, 4):
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths are 2, 3 and 4")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.max()) >= 2 ** bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    shifts = torch.arange(8, device=flat.device) * bits
    word = (flat << shifts).sum(dim=1)                                     # [n/8], 8*bits bits each
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes, uint8 [count]."""
    chunks = packed.to(torch.int64).reshape(-1, bits)
    word = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def export_packed(model: nn.Module, path: str | Path) -> Path:
    """Write every FakeQuantLinear of `model` packed (plus the model's other tensors) to `path` (.safetensors)."""
    from safetensors.torch import save_file

    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("the model has no FakeQuantLinear layers to export; build it with objective=bitdistill")
    tensors, meta = {}, {}
    skip = set()
    for name, layer in layers.items():
        codes, params = layer.quantized_codes()
        in_features = layer.in_features
        codes = from_groups(codes, in_features)                            # drop partial-group padding
        tensors[f"{name}.qweight"] = pack_codes(codes, layer.fmt.bits).cpu()
        for key, value in params.items():
            tensors[f"{name}.{key}"] = value.float().contiguous().cpu()
        meta[name] = {"format": layer.fmt.name, "group_size": layer.fmt.group_size,
                      "partial_groups": layer.fmt.partial_groups, "shape": [layer.out_features, in_features],
                      "dtype": str(layer.weight.dtype)}
        skip.update({f"{name}.weight", f"{name}.clip_ratio", f"{name}.calibrated", f"{name}.clip_lo", f"{name}.clip_hi"})
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().clone().contiguous().cpu()     # clone: tied weights are one tensor
    config = getattr(model, "config", None)
    metadata = {"lowbit_quant": json.dumps(meta), "hf_config": config.to_json_string() if config is not None else "{}"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _is_packed(key: str, meta: dict) -> bool:
    prefix, _, suffix = key.rpartition(".")
    return prefix in meta and suffix in PACKED_SUFFIXES


def dequantized_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """{layer name: dequantized weight [out, in] in the layer's original dtype} from a packed file."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as file:
        meta = json.loads(file.metadata()["lowbit_quant"])
        for name, info in meta.items():
            fmt: QuantFormat = make_format(info["format"], info["group_size"], info["partial_groups"])
            out_features, in_features = info["shape"]
            groups = num_groups(in_features, fmt)
            codes = unpack_codes(file.get_tensor(f"{name}.qweight"), fmt.bits, out_features * in_features)
            codes = codes.reshape(out_features, in_features)
            padded = torch.cat([codes, codes[:, -1:].expand(-1, groups * fmt.group_size - in_features)], dim=1)
            params = {key: file.get_tensor(f"{name}.{key}") for key in ("scale", "zero", "scale_neg")
                      if f"{name}.{key}" in file.keys()}
            weight = dequantize(padded.reshape(out_features, groups, fmt.group_size), params, fmt)
            out[name] = from_groups(weight, in_features).to(DTYPES[info["dtype"]])
    return out


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A model whose quantized layers hold the dequantized weights of `path` (plain nn.Linear forward).

    model: a skeleton of the same architecture to fill (e.g. freshly loaded); None builds it from the stored
    HF config. FakeQuantLinear layers in a given skeleton are replaced by plain nn.Linear.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with safe_open(str(path), framework="pt") as file:
        meta = json.loads(file.metadata()["lowbit_quant"])
        config = json.loads(file.metadata()["hf_config"])
        others = {key: file.get_tensor(key) for key in file.keys() if not _is_packed(key, meta)}
    if model is None:
        hf_config = AutoConfig.for_model(**config)
        dtype = next(iter(others.values())).dtype if others else torch.float32
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for name, weight in dequantized_weights(path).items():
        layer = model.get_submodule(name)
        if isinstance(layer, FakeQuantLinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
            layer = plain
        if tuple(layer.weight.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: packed weight {tuple(weight.shape)} does not fit the model's "
                             f"{tuple(layer.weight.shape)}; load into the architecture that was exported")
        with torch.no_grad():
            layer.weight.data = weight.to(layer.weight.device)
    missing, unexpected = model.load_state_dict(others, strict=False)
    missing = [k for k in missing if not (k.endswith(".weight") and k[:-len(".weight")] in meta)]
    if unexpected or missing:
        raise ValueError(f"{path}: tensors do not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); load into the architecture that was exported")
    return model
