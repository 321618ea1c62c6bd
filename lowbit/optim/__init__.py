"""Optimizers and learning-rate schedules (DESIGN.md stage 7)."""
from lowbit.optim.build import build, lr_at

__all__ = ["build", "lr_at"]
