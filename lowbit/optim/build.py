"""Build the optimizer over the parameters the objective leaves trainable; warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lowbit.config import OptimConfig, ParallelConfig


def parameter_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm gains, biases) do not (the usual AdamW convention)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_numbers(cfg: OptimConfig) -> None:
    """The optimizer's numbers are in range, each error naming the key (torch's own errors name neither)."""
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"optim.betas={list(cfg.betas)} must hold two values in [0, 1), e.g. [0.9, 0.95]")
    for key, value, ok, fix in (
            ("lr", cfg.lr, math.isfinite(cfg.lr) and cfg.lr >= 0, "a learning rate >= 0, e.g. 3e-4"),
            ("min_lr_ratio", cfg.min_lr_ratio, 0 <= cfg.min_lr_ratio <= 1, "a fraction of optim.lr in [0, 1]"),
            ("warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0, "a step count >= 0"),
            ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0, "a decay >= 0 (0 turns it off)"),
            ("eps", cfg.eps, cfg.eps > 0, "a small positive number, e.g. 1e-8"),
            ("grad_clip", cfg.grad_clip, cfg.grad_clip >= 0, "a norm > 0, or 0 to turn clipping off")):
        if not ok:
            raise ValueError(f"optim.{key}={value!r} is out of range; use {fix}")


def build(cfg: OptimConfig, params: list[nn.Parameter], process_group=None) -> torch.optim.Optimizer:
    """`process_group`: where AdamA averages each micro-batch gradient (lowbit.parallel.gradient_group; None = every
    rank)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the objective left no trainable parameters; check objective settings")
    check_numbers(cfg)
    groups = parameter_groups(params, cfg.weight_decay)
    if cfg.name == "adamw":
        # Torch's fused kernel: on CUDA, and on CPU for plain tensors (its CPU kernel does not take DTensor shards).
        # Being fused, it can skip a non-finite step on the device (the trainer's found_inf).
        fused = cfg.fused and all(p.is_cuda or (p.device.type == "cpu" and not isinstance(p, DTensor)) for p in params)
        if cfg.grad_clip_mode != "global":
            raise ValueError(f"optim.grad_clip_mode={cfg.grad_clip_mode!r} is not supported by adamw (it clips the "
                             f"global norm of the accumulated gradient); use optim.grad_clip_mode=global")
        if cfg.second_moment != "paper":
            raise ValueError(f"optim.second_moment={cfg.second_moment!r}: applies to optim=adama only (adamw folds "
                             f"nothing per micro-batch); remove it or use optim=adama")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    if cfg.name == "adama":
        return build_adama(cfg, groups, process_group)
    raise ValueError(f"optim.name={cfg.name!r} is not known; use adamw or adama")


def check_parallel(cfg: OptimConfig, parallel: ParallelConfig, layout) -> None:
    """optim=adama under the parallel layout (lowbit.parallel.Layout; None: plain data parallelism): its hooks fold and
    free each gradient as backward produces it and average it over the data-parallel ranks themselves, which DDP
    (with or without Ulysses) and tensor parallelism alone allow; FSDP2 and DeepSpeed reduce and own the gradients."""
    if cfg.name != "adama":
        return
    fix = "use optim=adamw, or DDP (parallel.data_parallel=ddp, parallel.dp_shard=1), Ulysses, or TP alone"
    if parallel.data_parallel == "deepspeed":
        raise ValueError(f"optim=adama with parallel.data_parallel=deepspeed: the DeepSpeed engine reduces the "
                         f"gradients and runs the optimizer step itself, after AdamA's hooks have freed them; {fix}")
    if layout is not None and layout.fsdp:
        raise ValueError(f"optim=adama with FSDP2 (parallel.dp_shard={parallel.dp_shard}, parallel.tp={parallel.tp} "
                         f"on {layout.dp * layout.ulysses * layout.tp} ranks): FSDP2 reduce-scatters each gradient "
                         f"after backward, where AdamA folds it into its moments during backward; {fix}")


def build_adama(cfg: OptimConfig, groups: list[dict], process_group=None) -> torch.optim.Optimizer:
    """AdamA (arXiv 2305.19982): refuses what it cannot honour -- global-norm clipping of a gradient it frees."""
    from lowbit.optim.adama import SECOND_MOMENTS, AdamA

    if cfg.grad_clip > 0 and cfg.grad_clip_mode not in ("per_tensor", "global"):
        raise ValueError(f"optim.grad_clip_mode={cfg.grad_clip_mode!r} is not known; use global or per_tensor")
    if cfg.grad_clip > 0 and cfg.grad_clip_mode == "global" and cfg.second_moment != "summed":
        raise ValueError(f"optim=adama with optim.second_moment={cfg.second_moment!r} frees each micro-batch gradient "
                         f"once folded, so the global norm of the accumulated gradient (optim.grad_clip_mode=global) "
                         f"never exists; use optim.second_moment=summed (keeps the step's summed gradient in bfloat16 "
                         f"inside v: global clipping as AdamW's), optim.grad_clip_mode=per_tensor (each parameter's "
                         f"micro-batch gradient clipped to optim.grad_clip) or optim.grad_clip=0")
    if cfg.second_moment not in SECOND_MOMENTS:
        raise ValueError(f"optim.second_moment={cfg.second_moment!r} is not known; use one of {list(SECOND_MOMENTS)} "
                         f"(paper: the paper's sum of squares; cross_corrected: plus the expected cross terms; "
                         f"summed: AdamW's moments of the summed gradient, kept in bfloat16 inside v)")
    clip = cfg.grad_clip if cfg.grad_clip > 0 else 0.0
    per_tensor = clip if cfg.grad_clip_mode == "per_tensor" else 0.0
    return AdamA(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, clip_per_tensor=per_tensor, fused=cfg.fused,
                 second_moment=cfg.second_moment, clip_global=clip - per_tensor, process_group=process_group)


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
