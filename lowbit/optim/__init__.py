"""Optimizers and learning-rate schedules (DESIGN.md stage 7)."""
from lowbit.optim.build import build, check_parallel, lr_at

__all__ = ["build", "check_parallel", "lr_at"]
