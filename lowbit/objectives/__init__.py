"""Training objectives (DESIGN.md stage 3): a registry of named objectives."""
from lowbit.objectives.base import Objective, build, register
from lowbit.objectives import kd as _kd  # noqa: F401,E402  registers "bitdistill" (issue 5)
from lowbit.objectives import seer_gate as _seer_gate  # noqa: F401,E402  registers "seer_gate" (issue 4)

__all__ = ["Objective", "build", "register"]
