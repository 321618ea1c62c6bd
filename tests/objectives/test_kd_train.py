"""A short real QAT+KD run through the whole pipeline on llama_tiny lowers the loss and exports packed weights.

The teacher is llama_tiny first trained briefly with the lm objective (a random-init teacher would be
near uniform and teach nothing); the bitdistill run then quantizes that trained model to INT2.
"""
import json

import pytest
import torch

from lowbit.quant.pack import load_packed
from lowbit.train.run import run
from tests.conftest import TINY, compose


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run(compose(TINY + [f"run_dir={run_dir}", "trainer.max_steps=20", "trainer.save_every=-1"]))
    return run_dir / "export"


@pytest.mark.slow
def test_bitdistill_run_lowers_the_loss_and_exports_packed_weights(trained_tiny, tmp_path):
    run_dir = tmp_path / "run"
    run(compose(TINY + [f"run_dir={run_dir}", "model.source=pretrained", f"model.name_or_path={trained_tiny}",
                        "objective=bitdistill", "objective.qat.format=int2", "objective.qat.group_size=64",
                        "objective.qat.learnable_clip=true", "optim.lr=1e-3", "trainer.max_steps=12",
                        "trainer.save_every=-1", "objective.kd.losses.topk_kl=0.5"]))
    rows = records(run_dir)
    losses_seen = [r["loss"] for r in rows if "loss" in r]
    assert len(losses_seen) == 12
    assert sum(losses_seen[-3:]) / 3 < 0.8 * sum(losses_seen[:3]) / 3, losses_seen
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert val[-1] < val[0], val                         # step 0 is the RTN student; the end is after QAT
    model = load_packed(run_dir / "quantized" / "model.safetensors")
    logits = model(input_ids=torch.randint(0, 1000, (1, 16))).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_bitdistill_under_ddp_two_gloo_processes(tmp_path):
    """The clipping search and CAKLD's confidence reduce over ranks (all_reduce) without deadlock or mismatch."""
    from tests.conftest import torchrun

    torchrun(["objective=bitdistill", "objective.qat.group_size=64", "objective.qat.learnable_clip=true",
              "model=llama_tiny", "data.seq_len=64", "data.max_documents=6", "trainer.global_batch_size=4",
              "trainer.micro_batch_size=1", "trainer.max_steps=3", "trainer.eval_batches=1", "trainer.eval_every=0",
              "trainer.save_every=-1", "logger.backends=[jsonl]", f"run_dir={tmp_path / 'run'}"])
    model = load_packed(tmp_path / "run" / "quantized" / "model.safetensors")
    assert torch.isfinite(model(input_ids=torch.randint(0, 1000, (1, 8))).logits).all()
