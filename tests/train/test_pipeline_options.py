"""DESIGN.md's contract: the real pipeline builds and trains on a tiny model with every option of every
single-process config group, and with methods of different stages combined, so a new method cannot break
another's stage. (Parallel layouts need several processes: tests/parallel/.)"""
import json
import math
import os

import pytest
import torch

from lowbit.train.run import run
from tests.conftest import CONF, compose

# Options whose tiny-model settings differ from the group's defaults (block sizes that fit llama_tiny).
EXTRA = {("precision", "fp8_blockwise"): ["precision.block_size=32"],
         ("objective", "seer_gate"): ["objective.seer.block_size=16"],
         ("objective", "bitdistill"): ["objective.qat.group_size=32", "objective.kd.confidence_batches=1"]}
SINGLE_PROCESS_GROUPS = ["precision", "objective", "optim", "memory"]


def train_two_steps(overrides, run_dir):
    run(compose(overrides + ["trainer.max_steps=2", "trainer.save_every=-1", "trainer.eval_every=-1",
                             "trainer.eval_at_start=false", "trainer.export=false", f"run_dir={run_dir}"]))
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("group,option", [(g, p.stem) for g in SINGLE_PROCESS_GROUPS
                                          for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_option_trains_through_the_real_pipeline(group, option, tiny_overrides, tmp_path):
    train_two_steps(tiny_overrides + [f"{group}={option}"] + EXTRA.get((group, option), []), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("combination", [
    ["precision=fp8_rowwise", "optim=adama", "optim.grad_clip_mode=per_tensor", "memory=selective"],
    ["precision=fp4_vectorwise", "memory=checkpointing", "logger.backends=[jsonl]"],
    ["precision=nvfp4", "precision.block_gemm=dequant", "optim=adama", "optim.grad_clip_mode=per_tensor"],
    ["objective=seer_gate", "objective.seer.block_size=16", "optim=adama", "optim.grad_clip_mode=per_tensor"],
    ["objective=bitdistill", "objective.qat.group_size=32", "objective.kd.confidence_batches=1", "memory=selective"],
])
def test_methods_of_different_stages_compose(combination, tiny_overrides, tmp_path):
    train_two_steps(tiny_overrides + combination, tmp_path / "run")


def test_a_combination_that_cannot_work_is_refused_before_training(tiny_overrides, tmp_path):
    with pytest.raises(ValueError, match="memory.checkpointing=none"):
        train_two_steps(tiny_overrides + ["objective=seer_gate", "objective.seer.block_size=16",
                                          "memory=checkpointing"], tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_compiled_layers_train_on_cpu_and_block_recipes_fall_back_to_aot_eager(tiny_overrides, tmp_path, capsys):
    """model.compile=true on a CPU: Inductor compiles the decoder layers (fp8_rowwise); the block recipes, whose fused
    quantization Inductor's C++ code generator fails on (torch 2.13), are traced with aot_eager and say so once."""
    compiled = train_two_steps(tiny_overrides + ["model.compile=true", "precision=fp8_blockwise",
                                                 "precision.block_size=32"], tmp_path / "blockwise")
    assert capsys.readouterr().err.count("backend=aot_eager") == 1       # the trainer's log goes to stderr
    eager = train_two_steps(tiny_overrides + ["precision=fp8_blockwise", "precision.block_size=32"], tmp_path / "eager")
    assert compiled == pytest.approx(eager, rel=1e-4)       # the same graph, run by eager kernels
    train_two_steps(tiny_overrides + ["model.compile=true", "precision=fp8_rowwise"], tmp_path / "rowwise")


def test_compile_mode_reaches_each_layer_and_a_bad_one_is_refused(monkeypatch):
    """model.compile_mode goes to torch.compile of every decoder layer (Inductor only: aot_eager takes no mode); an
    unknown mode names the choices; the CUDA-graph modes, which failed in training on the H200, are refused with the
    reason."""
    from lowbit.train.run import compile_layers

    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(layers)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    compile_layers(model, "inductor", "max-autotune-no-cudagraphs")
    compile_layers(model, "aot_eager", "max-autotune-no-cudagraphs")
    assert seen == [dict(dynamic=False, backend="inductor", mode="max-autotune-no-cudagraphs")] * 3 + \
        [dict(dynamic=False, backend="aot_eager")] * 3
    with pytest.raises(ValueError, match=r"model.compile_mode='fast' is not known; use one of \['default', "
                                         r"'max-autotune-no-cudagraphs'\]"):
        compile_layers(model, "inductor", "fast")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match=rf"model.compile_mode='{mode}' runs each decoder layer as CUDA graphs"):
            compile_layers(model, "inductor", mode)


def test_cuda_graph_compile_mode_is_refused_before_the_model_loads(tiny_overrides, tmp_path, monkeypatch):
    """Also with model.compile=false: the bad mode stops the run before its model is built or anything is saved."""
    import lowbit.train.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="model.compile_mode='reduce-overhead' runs each decoder layer as CUDA"):
        run(compose(tiny_overrides + ["model.compile_mode=reduce-overhead", f"run_dir={tmp_path / 'run'}"]))
    assert not list((tmp_path / "run").glob("**/*.safetensors"))


def test_deterministic_runs_repeat_bit_for_bit_and_keep_a_users_cublas_workspace(tiny_overrides, tmp_path, monkeypatch):
    """trainer.deterministic=true turns on deterministic algorithms and the fixed cuBLAS workspace CUDA needs for
    them (a value the user set stays), and two runs of the same seed give the same losses, bit for bit."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        first = train_two_steps(tiny_overrides + ["trainer.deterministic=true"], tmp_path / "first")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        second = train_two_steps(tiny_overrides + ["trainer.deterministic=true"], tmp_path / "second")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert first == second
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_profiled_steps_write_a_trace_and_a_top_operator_table(tiny_overrides, tmp_path):
    """trainer.profile_step=1, profile_steps=1: step 1 runs under torch.profiler; the trace holds the step's matmuls
    (a real Chrome trace, read back as JSON), the table lists operators, the losses are those of an unprofiled run,
    and a profile window past max_steps is refused before training."""
    profiled = train_two_steps(tiny_overrides + ["trainer.profile_step=1", "trainer.profile_steps=1"],
                               tmp_path / "profiled")
    trace = json.loads((tmp_path / "profiled" / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name in ("aten::mm", "aten::addmm", "aten::linear") for name in names)
    top = (tmp_path / "profiled" / "profile" / "top_rank0.txt").read_text()
    assert top.startswith("steps 1-1: wall ") and "Self CPU" in top
    assert profiled == train_two_steps(tiny_overrides, tmp_path / "plain")
    with pytest.raises(ValueError, match=r"trainer.profile_step=2 with trainer.profile_steps=1 runs past "
                                         r"trainer.max_steps=2"):
        train_two_steps(tiny_overrides + ["trainer.profile_step=2", "trainer.profile_steps=1"], tmp_path / "late")
    with pytest.raises(ValueError, match=r"trainer.profile_steps=0: profile at least one step"):
        train_two_steps(tiny_overrides + ["trainer.profile_step=0", "trainer.profile_steps=0"], tmp_path / "none")
