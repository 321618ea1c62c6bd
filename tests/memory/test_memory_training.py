"""The real trainer on llama_tiny: offload and checkpointing give the losses of a run without them."""
import json

import pytest

from lowbit.train.run import run
from tests.conftest import TINY, compose


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val/loss"] for r in rows if "val/loss" in r]


@pytest.mark.slow
def test_offload_and_checkpointing_train_to_the_same_losses(tmp_path):
    common = TINY + ["trainer.max_steps=4", "trainer.export=false", "trainer.save_every=-1", "trainer.eval_at_start=false"]
    variants = {"none": [], "offload": ["memory=offload", "memory.offload_min_bytes=0"],
                "full": ["memory=checkpointing"], "selective": ["memory=selective"],
                "adama+selective+offload": ["optim=adama", "memory=selective", "memory.checkpoint_layers=[model.layers.0]",
                                            "memory.offload=true", "memory.offload_layers=[model.layers.1]",
                                            "memory.offload_min_bytes=0"],
                "adama": ["optim=adama"]}
    results = {name: losses(tmp_path / name) for name, extra in variants.items()
               if run(compose(common + extra + [f"run_dir={tmp_path / name}"])) is not None}
    reference, reference_val = results["none"]
    assert len(reference) == 4
    for name in ("offload", "full", "selective"):
        train, val = results[name]
        for a, b in zip(train + val, reference + reference_val):
            assert abs(a - b) <= 1e-5 * abs(b), (name, train, reference)
    adama, adama_val = results["adama"]
    combined, combined_val = results["adama+selective+offload"]
    for a, b in zip(combined + combined_val, adama + adama_val):
        assert abs(a - b) <= 1e-5 * abs(b), (combined, adama)
