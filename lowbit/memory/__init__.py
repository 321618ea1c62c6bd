"""Memory savers applied to the final modules (DESIGN.md stage 6)."""
from __future__ import annotations

from torch import nn

from lowbit.config import MemoryConfig


def apply(model: nn.Module, cfg: MemoryConfig) -> nn.Module:
    """Activation checkpointing: `full` recomputes every decoder layer in backward."""
    if cfg.checkpointing == "none":
        return model
    if cfg.checkpointing == "full":
        from lowbit.parallel import unwrap
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    raise ValueError(f"memory.checkpointing={cfg.checkpointing!r} is not known; use none or full")
