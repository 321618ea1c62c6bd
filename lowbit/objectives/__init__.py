"""Training objectives (DESIGN.md stage 3): a registry of named objectives."""
from lowbit.objectives.base import Objective, build, register

__all__ = ["Objective", "build", "register"]
