"""`run(cfg)`: the fixed pipeline of DESIGN.md, from a composed config to a trained, exported model.

Every check that can fail on bad input runs before the first training step and before any
checkpoint is written.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lowbit import data as data_module
from lowbit import memory, objectives, optim, parallel, precision
from lowbit.config import LowbitConfig
from lowbit.models.attention import use_causal_sdpa
from lowbit.models.flops import flops_per_token, peak_flops
from lowbit.models.load import load as load_model
from lowbit.precision.delayed import check_parallel as check_delayed_scaling
from lowbit.precision.delayed import find as find_delayed_scaling
from lowbit.precision.weight_cache import check_parallel as check_weight_cache
from lowbit.train.checkpoint import Checkpointer, CheckpointError
from lowbit.train.loggers import Loggers
from lowbit.train.trainer import Trainer, TrainState

log = logging.getLogger("lowbit")


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="[lowbit %(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "datasets", "transformers", "filelock", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_deterministic() -> None:
    """`trainer.deterministic=true`: deterministic algorithms everywhere, so that the same seed on the same hardware
    repeats a run bit for bit (without it, two GPU runs of one setting drift apart from their second step:
    docs/RESULTS.md, eighth session; with it, two compiled fp8 runs of 32 steps on an H200 gave bit-identical losses,
    ninth session, `bench/device_pending.sh determinism`). It costs 23-32% of tokens/s in that run (tenth session).

    cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA's "Results reproducibility"); PyTorch sizes it at
    the first GEMM, so it is set here, before any; a value the user set is kept. An op without a deterministic
    implementation then raises and names itself (PyTorch's error). lowbit's own Triton kernels are deterministic:
    their only atomics are maxima and integer counts.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def check_trainer(t) -> None:
    """trainer.* values in range, each error naming the key and what it takes (checked before the model loads)."""
    if t.on_nan not in ("stop", "skip"):
        raise ValueError(f"trainer.on_nan={t.on_nan!r} is not known; use stop or skip")
    for key, value, least, meaning in (
            ("max_steps", t.max_steps, 0, "0 evaluates and exports only"),
            ("eval_every", t.eval_every, -1, "0 = only at the end, -1 = never"),
            ("save_every", t.save_every, -1, "0 = only at the end, -1 = never"),
            ("eval_batches", t.eval_batches, 0, "0 = the whole validation split"),
            ("keep_checkpoints", t.keep_checkpoints, 0, "0 keeps every checkpoint"),
            ("stop_after_steps", t.stop_after_steps, 0, "0 runs to trainer.max_steps"),
            ("max_nan_skips", t.max_nan_skips, 0, "the steps trainer.on_nan=skip may skip")):
        if value < least:
            raise ValueError(f"trainer.{key}={value} is out of range; use a value >= {least} ({meaning})")


def check_batch_sizes(cfg: LowbitConfig, world_size: int) -> int:
    """Gradient-accumulation steps per optimizer step; errors name the sizes and the fix."""
    t = cfg.trainer
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ValueError(f"trainer.micro_batch_size={t.micro_batch_size} and trainer.global_batch_size="
                         f"{t.global_batch_size} must be positive")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ValueError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by world size "
                         f"{world_size} x trainer.micro_batch_size={t.micro_batch_size} = {per_step}; "
                         f"use a multiple of {per_step}")
    return t.global_batch_size // per_step


def resolve_resume(cfg: LowbitConfig, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite an earlier run."""
    mode = cfg.trainer.resume
    if mode == "none":
        if checkpointer.latest() is not None:
            raise ValueError(f"{cfg.run_dir} already holds checkpoints ({checkpointer.latest().name}); pass "
                             f"trainer.resume=auto to continue that run, or run_name=NEW for a fresh one")
        return None
    if mode == "auto":
        return checkpointer.latest()
    path = Path(mode)
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={mode!r} is not a checkpoint directory; use none, auto, or "
                                f"the path of a runs/<name>/checkpoints/step_XXXXXXXX directory")
    return path


def compile_backend(precision_cfg, device: torch.device) -> str:
    """Inductor, except for block-scaled recipes (fp8_blockwise, nvfp4, mxfp4) on a CPU: Inductor's C++ code generator
    (torch 2.13) fails an assertion in its loop split on their fused quantization (x's blocks along rows next to x^T's
    down columns); those layers are traced without code generation (aot_eager: the same graph and numerics, eager
    kernels), logged once."""
    from lowbit.precision.recipes import build_recipe
    recipe = precision_cfg.recipe
    if device.type == "cpu" and recipe != "bf16" and build_recipe(precision_cfg).x.blocked:
        log.warning("model.compile=true with precision=%s on a CPU: compiling with backend=aot_eager (Inductor's CPU "
                    "code generator fails on the block recipes' fused quantization in torch %s); on a GPU Inductor "
                    "compiles them", recipe, torch.__version__)
        return "aot_eager"
    return "inductor"


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # refused: see compile_layers


def check_compile_mode(mode: str) -> None:
    """model.compile_mode is one lowbit can train with (checked before the model loads)."""
    if mode in CUDA_GRAPH_MODES:
        raise ValueError(f"model.compile_mode={mode!r} runs each decoder layer as CUDA graphs, which fails in training "
                         f"with per-layer graphs (torch's CUDA graph trees overwrite outputs backward still needs: "
                         f"pytorch/pytorch#170604); use one of {list(COMPILE_MODES)}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode={mode!r} is not known; use one of {list(COMPILE_MODES)}")


def compile_layers(model: torch.nn.Module, backend: str = "inductor", mode: str = "default") -> None:
    """torch.compile each decoder layer (torchtitan's choice: one graph per repeated block compiles once).
    dynamic=False: a new batch shape (the last, shorter validation batch) compiles its own graph rather than making
    sizes symbolic; an OCC layer failed to compile right after such a batch on the H200 (torch 2.11, 2026-12-01),
    most likely on the quantizers' shape arithmetic (OCC's sample stride, token padding).
    mode: torch.compile's mode for Inductor; another backend takes none. The CUDA-graph modes (reduce-overhead,
    max-autotune) are refused: with one compiled graph per decoder layer, replayed once per layer and micro-batch,
    CUDA graph trees overwrite outputs that backward still reads (H200, torch 2.11, 2026-12-02: every llama_1b run
    failed in its first backward; pytorch/pytorch#170604, #169545)."""
    check_compile_mode(mode)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("model.compile=true needs an HF decoder with model.model.layers; set model.compile=false")
    for layer in layers:
        layer.compile(dynamic=False, backend=backend, **({"mode": mode} if backend == "inductor" else {}))


def run(cfg: DictConfig) -> TrainState:
    world = parallel.init(cfg.parallel)
    setup_logging(world.is_main)
    if cfg.note:
        log.info("%s", cfg.note)
    check_trainer(cfg.trainer)
    optim.check_parallel(cfg.optim, cfg.parallel, world.layout)
    grad_accum = check_batch_sizes(cfg, world.dp_size)       # TP and Ulysses ranks share their batches
    run_dir = Path(cfg.run_dir)
    checkpointer = Checkpointer(run_dir, world, keep=cfg.trainer.keep_checkpoints)
    resume_from = resolve_resume(cfg, checkpointer)
    torch.manual_seed(cfg.trainer.seed + world.rank)
    random.seed(cfg.trainer.seed + world.rank)
    if cfg.trainer.deterministic:
        make_deterministic()
    check_compile_mode(cfg.model.compile_mode)
    check_weight_cache(cfg.precision, cfg.parallel)
    check_delayed_scaling(cfg.precision, cfg.parallel)

    model, tokenizer = load_model(cfg.model, seed=cfg.trainer.seed)              # 2
    parallel.check_model(model.config, cfg.parallel, cfg.data.seq_len)   # degrees vs heads/hidden/seq_len, before stage 5's collectives
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.data.seq_len > max_positions:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context of {max_positions} "
                         f"tokens (max_position_embeddings); lower data.seq_len")
    objective = objectives.build(cfg.objective, model)                             # 3
    objective.check_parallel(cfg.parallel)
    objective.check_data(cfg.data)
    for trained_or_frozen in (model, *objective.frozen_models()):    # no mask building, no host sync per forward
        use_causal_sdpa(trained_or_frozen)
    model = precision.apply(model, cfg.precision, compiled=cfg.model.compile)      # 4
    if cfg.precision.recipe != "bf16":      # compiled layers cannot log it: the tokens each linear sees per micro-batch
        precision.note_padding(cfg.trainer.micro_batch_size * cfg.data.seq_len // cfg.parallel.ulysses, cfg.precision)
    model.to(world.device)
    if cfg.model.compile:
        backend = compile_backend(cfg.precision, world.device)
        for compiled in (model, *objective.frozen_models()):
            compile_layers(compiled, backend, cfg.model.compile_mode)
        objective.compiled_loss = True          # the next-token loss too: no float32 copy of the logits
    model = parallel.apply(model, world, cfg.parallel)                             # 5
    if cfg.memory.checkpointing != "none" and not objective.supports_activation_checkpointing:
        raise ValueError(f"objective.name={cfg.objective.name} does not support memory.checkpointing="
                         f"{cfg.memory.checkpointing}: its frozen model saves no activations to recompute; "
                         f"use memory.checkpointing=none")
    memory.apply(model, cfg.memory)                                                # 6
    optimizer = optim.build(cfg.optim, objective.trainable(parallel.unwrap(model)),   # 7
                            process_group=parallel.gradient_group(world))
    if cfg.parallel.data_parallel == "deepspeed":       # the engine wraps model and optimizer together
        model, optimizer = parallel.deepspeed_engine(model, optimizer, cfg, world, grad_accum)
    data = data_module.build(cfg.data, tokenizer, rank=world.dp_rank, world_size=world.dp_size)  # 8

    state = TrainState()
    if resume_from is not None:
        stored = checkpointer.load(resume_from, *parallel.checkpoint_views(model, parallel.unwrap(model), optimizer))
        parallel.load_engine(model, resume_from)       # DeepSpeed's partitioned states (no-op otherwise)
        state = TrainState(step=int(stored["step"]), tokens_seen=int(stored["tokens_seen"]),
                           nan_skips=int(stored["nan_skips"]))
        delayed = find_delayed_scaling(parallel.unwrap(model))
        if delayed is not None and "amax_history" in stored:
            delayed.load_state_dict(stored["amax_history"])
        elif delayed is not None:
            log.info("precision.scaling=delayed: %s has no amax history (saved with current scaling); recording anew",
                     resume_from)
        log.info("resumed from %s at step %d", resume_from, state.step)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    plain = parallel.unwrap(model)
    matmul_dtype = "fp8" if cfg.precision.recipe != "bf16" else "bf16"
    loggers = Loggers(cfg.logger, enabled=world.is_main, run_dir=run_dir, run_name=cfg.run_name,
                      config=OmegaConf.to_container(cfg, resolve=True), max_steps=cfg.trainer.max_steps,
                      start_step=state.step)
    log.info("run %s: %s on %d x %s, %d micro-batches of %d x %d tokens per rank per step, precision %s",
             cfg.run_name, cfg.model.name, world.world_size, world.device.type, grad_accum,
             cfg.trainer.micro_batch_size, cfg.data.seq_len, cfg.precision.recipe)
    trainer = Trainer(model=model, objective=objective, optimizer=optimizer, data=data, world=world,
                      cfg=cfg.trainer, optim_cfg=cfg.optim, loggers=loggers, checkpointer=checkpointer,
                      config_yaml=config_yaml, flops_per_token=flops_per_token(plain, cfg.data.seq_len),
                      peak_flops=peak_flops(world.device, matmul_dtype), state=state,
                      log_every=cfg.logger.log_every, extra_metrics=precision.stats_hook(plain, cfg.precision),
                      profile_dir=str(Path(cfg.run_dir) / "profile"))
    try:
        state = trainer.fit()
    finally:
        loggers.close()
    exporting = cfg.trainer.export and state.step >= cfg.trainer.max_steps
    full_state = parallel.checkpoint_views(model, plain, optimizer)[0].state_dict() if exporting else None  # every rank: may gather shards
    if exporting and world.is_main:
        full_state = objective.export(plain, run_dir, full_state)
        export_dir = run_dir / "export"
        plain.save_pretrained(export_dir, safe_serialization=True, state_dict=full_state)
        tokenizer.save_pretrained(export_dir)
        log.info("exported the trained model to %s (transformers: AutoModelForCausalLM.from_pretrained)", export_dir)
    parallel.barrier()
    return state


__all__ = ["run", "CheckpointError"]
