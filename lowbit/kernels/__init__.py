"""Triton kernels, one concern per file, each with a pure-PyTorch reference path of the same numerics."""
from __future__ import annotations

import torch


def use_triton_for(t: torch.Tensor, mode: str = "auto") -> bool:
    """Triton on CUDA, or on CPU under TRITON_INTERPRET=1 when mode='always'; torch otherwise."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    if mode != "auto":
        raise ValueError(f"use_triton={mode!r} is not one of auto | always | never")
    return t.is_cuda
