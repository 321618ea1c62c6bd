"""Real DDP: 2 gloo processes under torchrun give the same losses as one process with the same global batch."""
import json

import pytest

from tests.conftest import TINY, ROOT, torchrun


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val/loss"] for r in rows if "val/loss" in r]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_gradient_accumulation(tmp_path):
    common = TINY + ["trainer.max_steps=4", "trainer.export=false", "trainer.save_every=0", "trainer.eval_batches=0"]
    torchrun(common + [f"run_dir={tmp_path / 'ddp'}"], nproc=2)
    torchrun(common + [f"run_dir={tmp_path / 'single'}"], nproc=1)
    (ddp, ddp_val), (single, single_val) = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == len(single) == 4
    for a, b in zip(ddp + ddp_val, single + single_val):
        assert abs(a - b) <= 1e-5 * abs(b), (ddp, single)
    # Only rank 0 logs: one metrics line per step, not two.
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000004" / "rng_rank1.pt").exists()


def test_a_failed_torchrun_shows_each_ranks_own_error(tmp_path):
    """The tests' torchrun helper reports the end of every rank's stderr, so the error of the rank that failed first
    is never lost behind torchrun's summary of the ranks it then stopped."""
    with pytest.raises(pytest.fail.Exception) as failed:
        torchrun(TINY + ["model.compile_mode=reduce-overhead", f"run_dir={tmp_path / 'run'}"], nproc=2, timeout=120)
    message = str(failed.value)
    for rank in (0, 1):
        assert f"{rank}/stderr.log ---" in message
    assert message.count("model.compile_mode='reduce-overhead' runs each decoder layer as CUDA graphs") >= 2
