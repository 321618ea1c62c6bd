"""The device mesh dp x ulysses x tp, and the checks that refuse a bad layout before any collective.

Mesh axes, outermost first: `dp` (data parallel: DDP replicas or FSDP2 shards), `ulysses` (sequence
shards around attention, arXiv 2309.14509) and `tp` (tensor parallel, arXiv 1909.08053), so the ranks
of one TP group are adjacent (on one node with NVLink when the job spans nodes).

The ranks outside a TP group (dp x ulysses) hold the same parameters and average their gradients: DDP,
or FSDP2 over the flattened dp x ulysses axes. With TP it is always FSDP2 (DDP does not take DTensor
parameters), the way torchtitan composes FSDP with TP and context parallelism.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from lowbit.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """The degree of each mesh axis; dp * ulysses * tp = world size."""

    dp: int
    ulysses: int
    tp: int
    fsdp: bool = False      # FSDP2 (not DDP) over the dp x ulysses ranks

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, ulysses_rank, tp_rank) of a global rank in the row-major mesh."""
        return rank // (self.ulysses * self.tp), (rank // self.tp) % self.ulysses, rank % self.tp


def layout_for(cfg: ParallelConfig, world_size: int) -> Layout:
    """The mesh degrees for `world_size` processes; raises with the bad value and the fix.

    Runs before the default process group exists, so a bad layout fails on every rank at once
    instead of leaving some ranks waiting in a collective.
    """
    for key in ("tp", "ulysses", "dp_shard"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"parallel.{key}={getattr(cfg, key)} must be >= 1 (1 = off)")
    model_ranks = cfg.tp * cfg.ulysses
    if world_size % model_ranks:
        raise ValueError(f"parallel.tp={cfg.tp} x parallel.ulysses={cfg.ulysses} = {model_ranks} does not divide "
                         f"the world size {world_size}; launch a multiple of {model_ranks} processes "
                         f"(--nproc_per_node) or lower the degrees")
    dp = world_size // model_ranks
    if cfg.dp_shard > 1 and cfg.dp_shard != dp:
        raise ValueError(f"parallel.dp_shard={cfg.dp_shard} but the mesh leaves {dp} data-parallel ranks "
                         f"(world {world_size} / (tp {cfg.tp} x ulysses {cfg.ulysses})); set parallel.dp_shard={dp} "
                         f"(FSDP2 over all data-parallel ranks) or 1 (DDP)")
    if cfg.sp and cfg.tp == 1:
        raise ValueError("parallel.sp=true shards along the sequence between tensor-parallel regions and needs "
                         "parallel.tp>1; set parallel.tp or drop parallel.sp")
    if cfg.data_parallel not in ("ddp", "deepspeed"):
        raise ValueError(f"parallel.data_parallel={cfg.data_parallel!r} is not known; use ddp (parallel.dp_shard>1 "
                         f"selects FSDP2) or deepspeed")
    if cfg.data_parallel == "deepspeed":
        if not deepspeed_installed():
            raise ImportError("parallel.data_parallel=deepspeed but DeepSpeed is not installed; "
                              "run `DS_BUILD_OPS=0 pip install deepspeed` or choose parallel=ddp")
        if model_ranks > 1 or cfg.dp_shard > 1:
            raise ValueError(f"parallel.data_parallel=deepspeed runs ZeRO over all ranks; set parallel.tp=1, "
                             f"parallel.ulysses=1 and parallel.dp_shard=1 (got {cfg.tp}, {cfg.ulysses}, {cfg.dp_shard})")
    fsdp = cfg.dp_shard > 1 or (cfg.tp > 1 and dp * cfg.ulysses > 1)
    check_fsdp_options(cfg, fsdp)
    return Layout(dp=dp, ulysses=cfg.ulysses, tp=cfg.tp, fsdp=fsdp)


FSDP_DTYPES = ("float32", "bfloat16")
FSDP_DEFAULTS = {"fsdp_param_dtype": "float32", "fsdp_reduce_dtype": "float32", "fsdp_reshard_after_forward": True,
                 "fsdp_reduce_every_micro_batch": True, "fsdp_fp8_all_gather": False}


def check_fsdp_options(cfg: ParallelConfig, fsdp: bool) -> None:
    """The FSDP2 options: known dtypes, and set only where FSDP2 runs (elsewhere they would do nothing)."""
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        if getattr(cfg, key) not in FSDP_DTYPES:
            raise ValueError(f"parallel.{key}={getattr(cfg, key)!r} is not supported; use one of {list(FSDP_DTYPES)}")
    changed = [f"parallel.{key}={getattr(cfg, key)}" for key, default in FSDP_DEFAULTS.items()
               if getattr(cfg, key) != default]
    if changed and not fsdp:
        raise ValueError(f"{', '.join(changed)}: options of FSDP2, which this layout does not use (FSDP2 runs with "
                         f"parallel.dp_shard>1, or parallel.tp>1 beside other ranks); set parallel.dp_shard to the "
                         f"data-parallel degree or drop the option")
    if cfg.fsdp_fp8_all_gather and cfg.tp > 1:
        raise ValueError(f"parallel.fsdp_fp8_all_gather=true gathers whole weights over the data-parallel ranks and "
                         f"does not combine with tensor parallelism (parallel.tp={cfg.tp}); set parallel.tp=1 or "
                         f"parallel.fsdp_fp8_all_gather=false")


def check_model(model_config, cfg: ParallelConfig, seq_len: int) -> None:
    """Refuse degrees that do not divide the model's heads, KV heads, hidden size or the sequence length.

    `model_config` is the HF config (num_attention_heads, num_key_value_heads, hidden_size, ...).
    """
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
             "hidden_size": model_config.hidden_size}
    if cfg.tp > 1:
        sizes["intermediate_size"] = model_config.intermediate_size
    for key, degree in (("tp", cfg.tp), ("ulysses", cfg.ulysses)):
        if degree == 1:
            continue
        for name, size in sizes.items():
            if size % degree:
                raise ValueError(f"parallel.{key}={degree} does not divide the model's {name}={size}; choose a "
                                 f"parallel.{key} that divides {name} (e.g. {_largest_divisor(size, degree)})")
    if cfg.tp > 1 and cfg.ulysses > 1:      # Ulysses splits each TP shard's heads again
        for name in ("num_attention_heads", "num_key_value_heads"):
            if sizes[name] % (cfg.tp * cfg.ulysses):
                raise ValueError(f"parallel.tp={cfg.tp} x parallel.ulysses={cfg.ulysses} = {cfg.tp * cfg.ulysses} "
                                 f"does not divide the model's {name}={sizes[name]}: each rank needs whole heads; "
                                 f"lower one of the degrees")
    seq_degree = cfg.ulysses * (cfg.tp if cfg.sp else 1)
    if seq_degree > 1 and seq_len % seq_degree:
        what = {(True, False): "parallel.ulysses", (False, True): "parallel.tp (with parallel.sp=true)",
                (True, True): "parallel.ulysses x parallel.tp (with parallel.sp=true)"}[(cfg.ulysses > 1, cfg.sp)]
        raise ValueError(f"data.seq_len={seq_len} is not divisible by {what}={seq_degree}, which shards each "
                         f"sequence; use a data.seq_len that is a multiple of {seq_degree}")


def _largest_divisor(size: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if size % d == 0)


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None
