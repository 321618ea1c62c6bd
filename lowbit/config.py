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
    compile_mode: str = "default"    # torch.compile mode: default | max-autotune-no-cudagraphs (the CUDA-graph
                                     # modes are refused: they fail with per-layer graphs in training)


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
    occ_scope: str = "tensor"       # the clamp threshold: tensor (the paper's: one quantile over the activation tensor,
                                    # so a token's output depends slightly on the rest of the batch) | token (each
                                    # token's own quantile over its K values: a causal LM stays causal)
    occ_product: str = "dense"      # OCC's compensation: dense (the residual x - clamp(x) as a full matrix, products
                                    # by bf16 GEMMs; compiles) | fp8 (the same matrix rounded to E4M3 per row, FP8
                                    # GEMMs; compiles) | sparse (compressed rows, a gather kernel; runs eagerly)
    stochastic_rounding: bool = False   # for gradient operands
    hadamard: bool = False          # random Hadamard transform on wgrad inputs (Quartet / NVIDIA NVFP4 recipe)
    hadamard_size: int = 16         # block size of that transform along the token axis (power of two)
    block_size: int = 128           # fp8_blockwise tile: 1 x block_size activations, block_size^2 weight blocks
    asymmetric: bool = False        # AFPQ (arXiv 2311.01792): separate positive/negative scales for FP4
    block_gemm: str = "auto"        # block-scaled GEMM scheme: dequant (nvfp4 / mxfp4 operands dequantized exactly
                                    # to bf16, then a cuBLAS bf16 GEMM) | prescale (block scales applied to the
                                    # operand tiles in bf16 inside lowbit's Triton GEMM) | rescale (lowbit's Triton
                                    # GEMM: one FP8 MMA per K block, promoted to FP32 with its scales) | cublas
                                    # (fp8_blockwise: cuBLASLt's 1x128 / 128x128 block-scaled FP8 GEMM on Hopper
                                    # with CUDA >= 12.9, rescale elsewhere) | auto: dequant for nvfp4 / mxfp4 (2.6x
                                    # faster than prescale on an H200, docs/RESULTS.md), cublas for other recipes
    high_precision: list[str] = field(default_factory=list)   # GEMMs left in the compute dtype, as nn.Linear runs
                                    # them: any of forward | dgrad | wgrad (e.g. [wgrad]: torchao's rowwise_with_gw_hp)
    stats_every: int = 0            # log per-layer quantization statistics every N steps (0 = off); with
                                    # delayed scaling also the amax overshoot (lowbit/precision/delayed.py)
    cache_weights: bool = False     # quantize each weight once per optimizer step, not once per micro-batch (keeps
                                    # W_q and W^T_q: 2 bytes per parameter for fp8; lowbit/precision/weight_cache.py)
    scaling: str = "current"        # fp8_tensorwise's activation and gradient scales: current (each tensor's own amax,
                                    # an amax pass before its cast) | delayed (the largest of an amax history recorded
                                    # on the first micro-batch of each step; lowbit/precision/delayed.py)
    amax_history: int = 16          # records kept by precision.scaling=delayed
    amax_margin: int = 0            # delayed scaling scales by the history's amax x 2^margin (TransformerEngine's margin)
    delayed_operands: list[str] = field(default_factory=lambda: ["x", "dy"])   # what delayed scaling scales by the
                                    # history: x (activations), dy (output gradients); the others: current scaling
    quantize_kernels: str = "auto"  # on CUDA: triton (lowbit's fused kernels) | torch (the PyTorch reference, which
                                    # torch.compile fuses with neighbouring ops) | auto (torch when model.compile,
                                    # except for nvfp4 / mxfp4, else triton); CPU always uses torch


@dataclass
class SeerGateConfig:
    """SeerAttention gates (arXiv 2410.13276; decode: arXiv 2506.08889) trained on a frozen model."""

    block_size: int = 64            # tokens per block: 16 | 32 | 64 | 128
    gate: str = "prefill"           # prefill (pooled queries) | decode (SeerAttention-R: every query token scores key blocks)
    heads: str = "kv_group"         # kv_group (one gate per GQA group, SeerAttention-R) | query (one per query head)
    q_pool: list[str] = field(default_factory=lambda: ["avg"])                # of avg | max | min, concatenated
    k_pool: list[str] = field(default_factory=lambda: ["max", "min", "avg"])  # of avg | max | min, concatenated
    threshold: float = 0.005        # gate probability a key block needs to be kept (logged sparsity; eval)
    use_triton: str = "auto"        # auto (Triton on CUDA) | always | never (PyTorch path)
    init_from: str = ""             # a gate checkpoint directory to start from ("" = fresh gates)
    layer_stats: bool = True        # log per-layer KL and sparsity


@dataclass
class QATConfig:
    """Weight fake quantization with a straight-through estimator (BitDistiller, arXiv 2402.10631); see lowbit/quant/."""

    format: str = "int3"            # int2 | int3 | int4 (asymmetric, per-group scale+zero) | fp4_e2m1 | fp4_afpq (AFPQ, arXiv 2311.01792)
    group_size: int = 128           # 32 | 64 | 128 | 256 weights per group along the input dimension
    partial_groups: bool = False    # true: a group size that does not divide a layer's input dim leaves a smaller last group (else an error)
    include: list[str] = field(default_factory=lambda: ["*.layers.*"])   # fnmatch patterns on nn.Linear names
    exclude: list[str] = field(default_factory=lambda: ["*lm_head*", "*embed*"])
    clip_search: bool = True        # AWQ-style per-group clipping-ratio search on the first training micro-batch
    clip_grid: int = 20             # ratios tried: 1 - k/clip_grid for k = 0 .. clip_max_shrink * clip_grid
    clip_max_shrink: float = 0.5
    learnable_clip: bool = False    # clip values become trainable parameters, initialised by the search
    compile: str = "auto"           # torch.compile the fake quantization and KD losses: auto (on CUDA) | true | false


@dataclass
class KDLossWeights:
    """Weight of each loss in the bitdistill objective (0 = off); e.g. objective.kd.losses.ce=0.5."""

    ce: float = 0.0                 # next-token cross-entropy on the data
    forward_kl: float = 0.0         # KL(p_teacher || p_student)
    reverse_kl: float = 0.0         # KL(p_student || p_teacher)
    cakld: float = 1.0              # BitDistiller's confidence-aware KL
    topk_kl: float = 0.0            # KL over the teacher's top-k tokens + a pooled tail bin


@dataclass
class KDConfig:
    """Knowledge distillation from a frozen teacher (BitDistiller CAKLD, arXiv 2402.10631); lowbit/objectives/kd.py."""

    losses: KDLossWeights = field(default_factory=KDLossWeights)   # weight per loss (QAT without KD: cakld=0, ce=1)
    confidence: float = -1.0        # CAKLD gamma in [0, 1]; < 0: measured (teacher's mean probability of the data's next token)
    confidence_batches: int = 8     # micro-batches the measured gamma averages over (then frozen)
    topk: int = 32                  # topk_kl: teacher's top-k tokens kept, the rest pooled into one tail bin
    temperature: float = 1.0        # softmax temperature for the KL terms (losses scaled by T^2)
    teacher: str = ""               # "" = frozen copy of the student before fake quantization; else an HF hub name or local path
    teacher_dtype: str = "bfloat16" # bfloat16 | float32
    teacher_device: str = "auto"    # auto (the student's device) | cpu (saves GPU memory; slow)


@dataclass
class ObjectiveConfig:
    name: str = "lm"                # lm (next-token cross-entropy) | seer_gate
    seer: SeerGateConfig = field(default_factory=SeerGateConfig)   # objective.name=seer_gate
    qat: QATConfig = field(default_factory=QATConfig)                # objective.name=bitdistill
    kd: KDConfig = field(default_factory=KDConfig)                   # objective.name=bitdistill


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0          # max gradient norm; 0 = off (what the norm is over: grad_clip_mode)
    grad_clip_mode: str = "global"  # global (norm of the accumulated gradient; adamw) | per_tensor (each parameter's micro-batch gradient, clipped in its hook; adama)
    fused: bool = True              # torch's fused AdamW kernel (CUDA; CPU for unsharded parameters: a non-finite step is skipped on the device, no host sync); AdamA's one-kernel fold (lowbit/kernels/adama_fold_triton.py)
    second_moment: str = "paper"    # adama: paper (v folds sum_i g_i^2, arXiv 2305.19982) | cross_corrected (adds the estimated cross terms, (1 - 1/N) m_hat^2 per step, so v tracks AdamW's (sum_i g_i)^2) | summed (the step's summed gradient kept in bfloat16 inside v's words: AdamW's moments and global clipping at AdamA's memory)


@dataclass
class MemoryConfig:
    checkpointing: str = "none"     # none | full (recompute each decoder layer) | selective (keep matmul/attention outputs, recompute element-wise work)
    checkpoint_layers: list[str] = field(default_factory=lambda: ["*"])   # fnmatch patterns on decoder-layer names (model.layers.N)
    offload: bool = False           # saved activations -> pinned CPU memory on a side CUDA stream, prefetched one layer ahead in backward
    offload_layers: list[str] = field(default_factory=lambda: ["*"])      # fnmatch patterns on decoder-layer names (model.layers.N)
    offload_min_bytes: int = 1048576   # saved tensors smaller than this stay on the GPU


@dataclass
class ParallelConfig:
    backend: str = "auto"           # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    data_parallel: str = "ddp"      # ddp | deepspeed (parallel.dp_shard>1 selects FSDP2 instead of DDP)
    find_unused_parameters: bool = False
    tp: int = 1                     # tensor-parallel degree (DTensor: colwise q/k/v/gate/up, rowwise o/down, vocab-parallel embedding + lm_head)
    sp: bool = False                # Megatron sequence parallelism for norms/residuals between TP regions (needs tp>1)
    ulysses: int = 1                # DeepSpeed-Ulysses degree: sequence shards, all-to-all to head shards around attention
    dp_shard: int = 1               # >1: FSDP2 (fully_shard) over this many data-parallel ranks (= world / (tp x ulysses)), and their Ulysses ranks; with tp>1 FSDP2 is used whenever there are other ranks
    fsdp_param_dtype: str = "float32"   # FSDP2: dtype parameters are all-gathered in and layers compute with (float32 | bfloat16: half the all-gather bytes and unsharded memory; master weights, optimizer state and checkpoints stay float32)
    fsdp_reduce_dtype: str = "float32"  # FSDP2: dtype gradients are reduce-scattered in (float32 | bfloat16)
    fsdp_fp8_all_gather: bool = False   # FSDP2 with precision=fp8_tensorwise: all-gather those linears' weights in E4M3 (1 byte per parameter, cast on the shards at the whole weight's scale: the same bits as quantizing after the gather)
    fsdp_reduce_every_micro_batch: bool = True   # FSDP2 under gradient accumulation: reduce-scatter each micro-batch's gradients (false: accumulate them unsharded and reduce-scatter once per step, as DDP's no_sync does; fewer collectives, float32 gradients of the whole model held until the step's last backward)
    fsdp_reshard_after_forward: bool = True   # FSDP2: free each layer's gathered parameters after its forward and gather them again for its backward (false: keep them, one all-gather less per layer and micro-batch, more memory)
    zero_stage: int = 2             # DeepSpeed ZeRO stage 1 | 2 | 3 (data_parallel=deepspeed)
    offload_optimizer: bool = False # DeepSpeed: optimizer states and step on the CPU
    deepspeed_config: str = ""      # path to a user DeepSpeed JSON; replaces the config generated from these fields


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
    keep_checkpoints: int = 2       # the newest N checkpoints stay; 0 = keep all
    resume: str = "none"            # none | auto (latest checkpoint in the run directory) | a checkpoint path
    export: bool = True             # write an HF save_pretrained export at the end
    stop_after_steps: int = 0       # end this process after N steps (checkpoint saved; resume=auto continues); 0 = run to max_steps
    on_nan: str = "stop"            # stop | skip (skip the optimizer step, report it)
    max_nan_skips: int = 10
    seed: int = 1234
    deterministic: bool = False     # bit-reproducible runs: deterministic algorithms, fixed cuBLAS workspace (run.make_deterministic)
    mixed_precision: str = "auto"   # auto (bf16 autocast on CUDA, none on CPU) | bf16 | none
    profile_step: int = -1          # profile steps profile_step .. +profile_steps-1 (torch.profiler; -1 = off):
    profile_steps: int = 2          # a Chrome trace and a top-kernel table per rank in {run_dir}/profile/


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
