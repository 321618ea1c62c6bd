"""DeepSpeed ZeRO (Rajbhandari et al., arXiv 1910.02054) as the data-parallel engine, configured from Hydra.

ZeRO stage 1 partitions the optimizer states over the data-parallel ranks, stage 2 also the
gradients, stage 3 also the parameters (sec. 5 of 1910.02054); `offload_optimizer` keeps the
optimizer states and step on the CPU (ZeRO-Offload). The DeepSpeed config is generated from
parallel.* and trainer.* (or read from parallel.deepspeed_config, with its batch keys set to the
trainer's so both count the same micro-batches).

The trainer's interface stays as it is: `EngineModel` is the model (its `backward` is the engine's,
which reduces gradients into their partitions), `EngineOptimizer` the optimizer (the engine steps,
clips and zeroes after the last micro-batch; its gradient norm is reported). Checkpoints: the
engine writes its partitioned states next to lowbit's checkpoint (`save_engine` / `load_engine`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.config import OptimConfig, ParallelConfig, TrainerConfig

log = logging.getLogger("lowbit")


def engine_config(cfg: ParallelConfig, trainer: TrainerConfig, optim: OptimConfig, grad_accum: int,
                  world_size: int, bf16: bool, autocast: torch.dtype | None = None) -> dict:
    """The DeepSpeed JSON config for this run (a user file from parallel.deepspeed_config, or generated).

    autocast: the dtype of the trainer's torch.autocast, if any. DeepSpeed's forward *disables* an autocast
    entered outside it unless its own `torch_autocast` section is on (deepspeed/runtime/torch_autocast.py),
    which made every DeepSpeed run compute in float32 (on 2 H200s: llama_1b at 106-114 GiB per GPU, SDPA's
    math kernel instead of flash). So the section is set to the same dtype, with no module's gradients
    communicated in low precision (lower_precision_safe_modules empty: float32 reduction, as under DDP)."""
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config={cfg.deepspeed_config!r} is not a file; pass the "
                                    f"path of a DeepSpeed JSON, or leave it empty to generate one from parallel.*")
        config = json.loads(path.read_text())
    else:
        if cfg.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage={cfg.zero_stage} is not a ZeRO stage; use 1, 2 or 3")
        zero = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {"zero_optimization": zero, "gradient_clipping": optim.grad_clip,
                  "steps_per_print": 10**9, "wall_clock_breakdown": False,
                  # the optimizer is lowbit's (optim.build); DeepSpeed would swap in its CPU Adam otherwise
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        if bf16:
            config["bf16"] = {"enabled": True}
    if autocast is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": str(autocast).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    config.update({"train_micro_batch_size_per_gpu": trainer.micro_batch_size,
                   "gradient_accumulation_steps": grad_accum,
                   "train_batch_size": trainer.micro_batch_size * grad_accum * world_size})
    return config


class EngineModel(nn.Module):
    """The DeepSpeed engine seen as the trainer's model: forward, and an engine-driven `backward`."""

    def __init__(self, engine):
        super().__init__()
        self.module = engine

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already divided by the accumulation steps (the trainer does it)."""
        self.module.backward(loss, scale_wrt_gas=False)


class EngineOptimizer:
    """The trainer's optimizer interface over the engine: the engine steps after every micro-batch's
    backward (an optimizer step only at the accumulation boundary), so `step`/`zero_grad` are no-ops."""

    reduces_gradients = True     # the trainer calls finish_micro_batch() after each backward and never no_sync
    frees_gradients = True       # the engine clips in its step; the trainer reads the norm it measured

    def __init__(self, engine):
        self.engine = engine

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    def finish_micro_batch(self) -> None:
        self.engine.step()

    def micro_batch_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        """Only the group layout (the checkpointer checks it); the states are in the engine checkpoint."""
        return {"state": {}, "param_groups": [{k: v for k, v in g.items() if k != "params"} |
                                              {"params": list(range(len(g["params"])))} for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> tuple[EngineModel, EngineOptimizer]:
    """Wrap `model` and `optimizer` in a DeepSpeed engine (the process group already exists)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    log.info("DeepSpeed engine: ZeRO stage %s, %d micro-batches of %d per rank per step",
             config.get("zero_optimization", {}).get("stage"), config["gradient_accumulation_steps"],
             config["train_micro_batch_size_per_gpu"])
    return EngineModel(engine), EngineOptimizer(engine)


def engine_of(model: nn.Module):
    return model.module if isinstance(model, EngineModel) else None


def save_engine(model: nn.Module, checkpoint: Path) -> None:
    """Every rank: the engine's partitioned model/optimizer states into `checkpoint`/deepspeed."""
    engine = engine_of(model)
    if engine is not None:
        engine.save_checkpoint(str(Path(checkpoint) / "deepspeed"), tag="engine", save_latest=False)


def load_engine(model: nn.Module, checkpoint: Path) -> None:
    engine = engine_of(model)
    if engine is None:
        return
    directory = Path(checkpoint) / "deepspeed"
    if not (directory / "engine").is_dir():
        raise FileNotFoundError(f"{checkpoint} has no DeepSpeed engine states ({directory}/engine); it was not "
                                f"written with parallel.data_parallel=deepspeed. Resume with the layout it was "
                                f"trained with, or start a new run_name")
    engine.load_checkpoint(str(directory), tag="engine", load_module_strict=True)


def checkpoint_views(model: nn.Module, plain: nn.Module, optimizer):
    """(model, optimizer) to hand lowbit's checkpointer; call on every rank (it may gather).

    `plain` is the unwrapped model. Sharded (DTensor) or DeepSpeed flat-buffer parameters get views
    holding full tensors (lowbit.parallel.full_state); a plain model passes through.
    """
    from lowbit.parallel.full_state import FullOptimizerView, FullStateView, GatheredStateView, has_dtensor_parameters
    if isinstance(model, EngineModel):               # the engine saves its own optimizer partitions
        if any(hasattr(p, "ds_id") for p in plain.parameters()):     # ZeRO-3: partitioned parameters
            # Settle the parameter prefetcher first: on a GPU the last forward (evaluation) leaves the next
            # layers' all-gathers in flight, and re-partitioning a parameter in flight fails (seen on H200s).
            model.module.empty_partition_cache()
            return GatheredStateView(plain), optimizer
        return FullStateView(plain), optimizer
    if has_dtensor_parameters(plain):
        return FullStateView(plain), FullOptimizerView(optimizer)
    return plain, optimizer
