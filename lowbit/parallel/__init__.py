"""Process groups and the data-parallel wrapper (DESIGN.md stages 1 and 5)."""
from lowbit.parallel.world import World, all_reduce_mean, all_reduce_sum, apply, barrier, init, unwrap

__all__ = ["World", "init", "apply", "all_reduce_mean", "all_reduce_sum", "barrier", "unwrap"]
