"""Process groups, the device mesh and the model wrappers of DESIGN.md stages 1 and 5."""
from lowbit.parallel.deepspeed import checkpoint_views, load_engine, save_engine
from lowbit.parallel.mesh import Layout, check_model, layout_for
from lowbit.parallel.world import (World, all_reduce_mean, all_reduce_min, all_reduce_sum, apply, barrier,
                                   deepspeed_engine, gradient_group, init, loss_context, to_local, unwrap,
                                   unwrap_data_parallel)

__all__ = ["World", "Layout", "init", "apply", "check_model", "layout_for", "loss_context", "to_local",
           "all_reduce_mean", "all_reduce_min", "all_reduce_sum", "barrier", "unwrap", "unwrap_data_parallel",
           "deepspeed_engine", "gradient_group", "save_engine", "load_engine", "checkpoint_views"]
