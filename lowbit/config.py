"""Typed schemas for every config group.

Hydra composes `conf/` onto these dataclasses (registered in `register_configs`), so an unknown key
or a value of the wrong type fails at start-up with the key's path, before any training or
checkpoint write. Each group mirrors one stage of the pipeline in DESIGN.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which causal LM to train. `source` picks how it is built (see lowbit/models/load.py)."""

    name: str = MISSING              # short name used in logs and the run directory
    source: str = "config"           # config (random init) | pretrained (hub name or local path) | gguf
    name_or_path: str = ""           # hub name or local directory for source=pretrained / gguf ("embedded:smollm2" = the shipped GGUF)
    gguf_file: str = ""              # file name inside name_or_path for source=gguf
    tokenizer: str = "embedded:smollm2"   # hub name, local path, or embedded:smollm2 (the GGUF's tokenizer)
    architecture: str = "llama"      # HF model_type for source=config
    config: dict[str, Any] = field(default_factory=dict)   # HF config values for source=config (LlamaConfig fields)
    dtype: str = "float32"           # master-weight dtype: float32 | bfloat16
    attn_implementation: str = "sdpa"
    compile: bool = False            # torch.compile each decoder layer (GPU)


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])  # "shakespeare" (embedded corpus), local files/globs (.txt, .jsonl, .jsonl.gz, .parquet), or a HF hub dataset name
    val_sources: list[str] = field(default_factory=list)  # explicit validation files; empty = hold out the tail of each document
    text_field: str = "text"
    hub_split: str = "train"
    seq_len: int = 256
    val_fraction: float = 0.05     # share of each document's tokens (its tail) held out for validation when val_sources is empty
    max_documents: int = 0         # 0 = all
    cache_dir: str = "~/.cache/lowbit/data"
    num_proc: int = 1
    seed: int = 0


@dataclass
class PrecisionConfig:
    recipe: str = "bf16"            # bf16 | fp8_tensorwise | fp8_rowwise | fp8_blockwise | fp4_vectorwise | nvfp4 | mxfp4
    include: list[str] = field(default_factory=lambda: ["*.layers.*"])   # fnmatch patterns on module names
    exclude: list[str] = field(default_factory=lambda: ["*lm_head*", "*embed*"])
    grad_format: str = "e4m3"       # e4m3 | e5m2 for gradient operands
    dge: bool = False               # FP4 Differentiable Gradient Estimator (arXiv 2501.17116)
    dge_k: float = 5.0
    dge_clip: float = 3.0
    occ: bool = False               # Outlier Clamping and Compensation (arXiv 2501.17116)
    occ_quantile: float = 0.99
    stochastic_rounding: bool = False   # for gradient operands
    hadamard: bool = False          # random Hadamard transform on wgrad inputs (Quartet / NVIDIA NVFP4 recipe)
    asymmetric: bool = False        # AFPQ (arXiv 2311.01792): separate positive/negative scales for FP4
    stats_every: int = 0            # log per-layer quantization statistics every N steps (0 = off)


@dataclass
class ObjectiveConfig:
    name: str = "lm"                # lm (next-token cross-entropy)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global gradient norm; 0 = off
    fused: bool = True              # fused AdamW kernel on CUDA


@dataclass
class MemoryConfig:
    checkpointing: str = "none"     # none | full (recompute each decoder layer in backward)


@dataclass
class ParallelConfig:
    backend: str = "auto"           # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    data_parallel: str = "ddp"      # ddp
    find_unused_parameters: bool = False


@dataclass
class WandbConfig:
    project: str = "lowbit"
    entity: Optional[str] = None
    mode: str = "offline"           # offline | online | disabled
    tags: list[str] = field(default_factory=list)
    dir: str = ""                   # default: the run directory


@dataclass
class LoggerConfig:
    backends: list[str] = field(default_factory=lambda: ["console", "jsonl"])   # console | jsonl | wandb
    log_every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 16     # sequences per optimizer step, over all ranks
    micro_batch_size: int = 4       # sequences per forward/backward on one rank
    eval_every: int = 20            # steps; 0 = only at the end; -1 = never
    eval_batches: int = 8           # micro-batches per rank per evaluation; 0 = the whole validation split
    eval_at_start: bool = True
    save_every: int = 50            # steps; 0 = only at the end; -1 = never
    keep_checkpoints: int = 2
    resume: str = "none"            # none | auto (latest checkpoint in the run directory) | a checkpoint path
    export: bool = True             # write an HF save_pretrained export at the end
    stop_after_steps: int = 0       # end this process after N steps (checkpoint saved; resume=auto continues); 0 = run to max_steps
    on_nan: str = "stop"            # stop | skip (skip the optimizer step, report it)
    max_nan_skips: int = 10
    seed: int = 1234
    deterministic: bool = False     # torch.use_deterministic_algorithms
    mixed_precision: str = "auto"   # auto (bf16 autocast on CUDA, none on CPU) | bf16 | none


@dataclass
class LowbitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp: str = "default"            # the preset's name (set by conf/exp/*.yaml)
    note: str = ""                  # a line printed at start (e.g. what a preset really runs)
    cpu_overrides: list[str] = field(default_factory=list)   # applied when no CUDA device is present (see conf/config.yaml)
    run_name: str = "${exp}"
    run_dir: str = "runs/${run_name}"


def register_configs() -> None:
    """Register the schema so that conf/config.yaml composes onto it (typed, struct mode)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="lowbit_schema", node=LowbitConfig)
