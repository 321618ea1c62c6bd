"""Model FLOPs per token and peak device FLOP/s, for MFU.

Convention (PaLM appendix B, as torchtitan reports MFU): a training token costs
6 * (parameters in matrix multiplies, lm_head included, embedding lookups excluded)
+ 12 * layers * hidden * seq_len for attention scores and values (not halved for causal masking).
"""
from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) peak tensor FLOP/s per device by datasheet, per dtype of the matrix units.
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "fp8": 1978.9e12},   # SXM5
    "H200": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp8": 1513.0e12},
    "A100": {"bf16": 312.0e12},
    "L40S": {"bf16": 362.1e12, "fp8": 733.0e12},
}


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that enter a matrix multiply per token: every Linear weight (lm_head included).

    A DTensor (TP, FSDP2) counts its global shape; a DeepSpeed ZeRO-3 partitioned weight, whose local tensor is
    empty, counts its full size (`ds_numel`).
    """
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of an HF decoder `model` at `seq_len`."""
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * matmul_parameters(model) + attention


def peak_flops(device: torch.device, matmul_dtype: str = "bf16") -> float | None:
    """Datasheet peak FLOP/s of `device` for `matmul_dtype` (bf16 | fp8); None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):   # most specific name first ("H100 PCIe")
        if key in name and ("PCIe" in key) == ("PCIe" in name):
            return PEAK_FLOPS[key].get(matmul_dtype)
    return None
