"""Atomic checkpoints: round trip, refusal of corrupt or foreign ones without touching state, SIGKILL mid-save."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowbit.parallel import World
from lowbit.train.checkpoint import Checkpointer, CheckpointError

WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make(seed=0, width=8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, width), nn.Linear(width, 10, bias=False))
    model[1].weight = model[0].weight                # tied, like HF lm_head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_state_and_rng(tmp_path):
    model, optimizer = make(0)
    ckpt = Checkpointer(tmp_path, WORLD, keep=2)
    torch.manual_seed(7)
    path = ckpt.save(5, model, optimizer, {"tokens_seen": 40, "nan_skips": 0}, "a: 1\n")
    expected_draw = torch.rand(3)
    other, other_optimizer = make(1)
    state = ckpt.load(path, other, other_optimizer)
    assert state["step"] == 5 and state["tokens_seen"] == 40
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(other_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)     # RNG restored to the save point


def test_keeps_the_newest_and_ignores_temporary_dirs(tmp_path):
    model, optimizer = make()
    ckpt = Checkpointer(tmp_path, WORLD, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer, {"tokens_seen": 0, "nan_skips": 0}, "")
    (ckpt.root / ".tmp_step_00000004").mkdir()
    assert [p.name for p in ckpt.all()] == ["step_00000002", "step_00000003"]


def test_foreign_or_corrupt_checkpoints_are_refused_before_anything_is_loaded(tmp_path):
    model, optimizer = make(0)
    ckpt = Checkpointer(tmp_path, WORLD)
    path = ckpt.save(1, model, optimizer, {"tokens_seen": 0, "nan_skips": 0}, "")
    wide, wide_optimizer = make(1, width=16)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another model: shape mismatches \(1\): \['0.weight: checkpoint \(10, 8\) vs model \(10, 16\)'\]; resume"):
        ckpt.load(path, wide, wide_optimizer)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
    (path / "optimizer.pt").write_bytes(b"truncated")
    same, same_optimizer = make(2)
    before = {k: v.clone() for k, v in same.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load(path, same, same_optimizer)
    assert all(torch.equal(before[k], v) for k, v in same.state_dict().items())   # never half-loaded


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tests.train.test_checkpoint import make, WORLD
        from lowbit.train.checkpoint import Checkpointer
        model, optimizer = make(0)
        ckpt = Checkpointer({str(tmp_path)!r}, WORLD)
        ckpt.save(1, model, optimizer, {{"tokens_seen": 1, "nan_skips": 0}}, "")
        real_save = torch.save
        def dying_save(obj, f, *a, **k):          # die half-way through the second checkpoint
            real_save(obj, f, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ckpt.save(2, model, optimizer, {{"tokens_seen": 2, "nan_skips": 0}}, "")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    ckpt = Checkpointer(tmp_path, WORLD)
    assert (ckpt.root / ".tmp_step_00000002").exists()      # the interrupted save
    assert ckpt.latest().name == "step_00000001"
    model, optimizer = make(3)
    assert ckpt.load(ckpt.latest(), model, optimizer)["tokens_seen"] == 1
