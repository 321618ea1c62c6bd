"""Build the optimizer over the parameters the objective leaves trainable; warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.config import OptimConfig


def parameter_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm gains, biases) do not (the usual AdamW convention)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the objective left no trainable parameters; check objective settings")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas={list(cfg.betas)} must hold two values, e.g. [0.9, 0.95]")
    groups = parameter_groups(params, cfg.weight_decay)
    if cfg.name == "adamw":
        fused = cfg.fused and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    raise ValueError(f"optim.name={cfg.name!r} is not known; use adamw")


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio at `max_steps`.

    A pure function of the step, so resuming needs no scheduler state beyond the step itself.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
