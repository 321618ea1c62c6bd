"""AdamA in the real pipeline: `optim=adama` trains, resumes bit-exactly, and runs under real DDP (2 gloo procs)."""
import json
import math

import pytest

from lowbit.train.run import run
from lowbit.train.trainer import NonFiniteLossError
from tests.conftest import ROOT, TINY, compose, run_gloo_workers, torchrun


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["optim.second_moment=summed", "optim.grad_clip_mode=global"]])
def test_optim_adama_trains_and_resumes_bit_for_bit(tmp_path, options):
    """The paper's AdamA, and second_moment=summed with AdamW's global clipping (its grad_norm the summed gradient's)."""
    common = TINY + ["optim=adama", "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.export=false",
                     "trainer.eval_every=-1", "trainer.eval_at_start=false"] + options
    run(compose(common + [f"run_dir={tmp_path / 'whole'}", "trainer.max_steps=6", "trainer.save_every=3"]))
    run(compose(common + [f"run_dir={tmp_path / 'split'}", "trainer.max_steps=3", "trainer.save_every=3"]))
    run(compose(common + [f"run_dir={tmp_path / 'split'}", "trainer.max_steps=6", "trainer.save_every=3",
                          "trainer.resume=auto"]))
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(whole) == sorted(split) == list(range(1, 7))
    assert all(whole[s] == split[s] for s in whole), (whole, split)
    assert whole[6] < whole[1]
    assert all(r["grad_norm"] > 0 for r in rows(tmp_path / "whole") if "grad_norm" in r)


@pytest.mark.slow
def test_adama_refuses_global_clipping_and_skipping_a_folded_nan(tmp_path):
    base = TINY + [f"run_dir={tmp_path / 'run'}", "optim=adama", "trainer.export=false", "trainer.max_steps=2",
                   "trainer.eval_at_start=false", "trainer.eval_every=-1"]
    with pytest.raises(ValueError, match="grad_clip_mode=per_tensor"):
        run(compose(base + ["optim.grad_clip_mode=global"]))
    with pytest.raises(NonFiniteLossError, match="cannot skip"):
        run(compose(base + ["optim.lr=1e30", "optim.warmup_steps=0", "trainer.on_nan=skip"]))
    # second_moment=summed can drop a step: the huge step 1 makes step 2's gradients non-finite, a step it skips
    summed = TINY + [f"run_dir={tmp_path / 'summed'}", "optim=adama", "optim.second_moment=summed",
                     "trainer.export=false", "trainer.max_steps=2", "trainer.eval_at_start=false",
                     "trainer.eval_every=-1", "optim.lr=1e30", "optim.warmup_steps=0", "trainer.on_nan=skip"]
    run(compose(summed))
    norms = {r["step"]: r["grad_norm"] for r in rows(tmp_path / "summed") if "grad_norm" in r}
    assert sorted(norms) == [1, 2] and math.isfinite(norms[1]) and not math.isfinite(norms[2]), norms


@pytest.mark.slow
@pytest.mark.parametrize("second_moment", ["paper", "summed"])
def test_adama_under_two_process_ddp_equals_a_float64_reference(tmp_path, second_moment):
    """Each rank folds gradients averaged over both ranks per micro-batch; rank 0 checks a float64 replay (summed:
    with its two bfloat16 roundings; 7e-8 apart when written)."""
    worker = ROOT / "tests" / "optim" / "adama_ddp_worker.py"
    result = run_gloo_workers(worker, [str(tmp_path / "result.json"), second_moment])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["max_abs_error"] < 1e-6, report
    assert report["ranks_agree"], report


@pytest.mark.slow
def test_train_py_with_adama_under_torchrun(tmp_path):
    torchrun(TINY + ["optim=adama", "trainer.max_steps=3", "trainer.export=false", "trainer.save_every=0",
                     f"run_dir={tmp_path / 'ddp'}"], nproc=2)
    assert len(losses(tmp_path / "ddp")) == 3


def test_adama_refuses_the_layouts_that_own_the_gradients():
    """FSDP2 and DeepSpeed reduce (and DeepSpeed steps) after backward, where AdamA has folded and freed each gradient
    during it. Each refusal names the setting and the way out."""
    from lowbit.config import OptimConfig, ParallelConfig
    from lowbit.optim import check_parallel
    from lowbit.parallel.mesh import Layout
    adama = OptimConfig(name="adama")
    with pytest.raises(ValueError, match="deepspeed.*use optim=adamw"):
        check_parallel(adama, ParallelConfig(data_parallel="deepspeed"), None)
    with pytest.raises(ValueError, match="FSDP2 .*dp_shard=2.*use optim=adamw"):
        check_parallel(adama, ParallelConfig(dp_shard=2), Layout(dp=2, ulysses=1, tp=1, fsdp=True))
    check_parallel(adama, ParallelConfig(tp=2), Layout(dp=1, ulysses=1, tp=2))          # TP alone: allowed
    check_parallel(adama, ParallelConfig(), Layout(dp=2, ulysses=1, tp=1))              # DDP: allowed
    check_parallel(OptimConfig(name="adamw"), ParallelConfig(dp_shard=2), Layout(dp=2, ulysses=1, tp=1, fsdp=True))
