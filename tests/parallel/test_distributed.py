"""TP=2, TP=2+SP and Ulysses=2 on 2 gloo processes (float32) against the single-process model:
logits, loss and every gradient to 1e-5 relative (the trainer-level runs are in test_trainer_layouts.py)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RTOL = 1e-5


@pytest.mark.slow
def test_tp_sp_and_ulysses_match_one_process_logits_loss_and_gradients():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests/parallel/equivalence_worker.py"), "tp,tp_sp,ulysses", "12"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = {r["mode"]: r for r in map(json.loads, (l for l in result.stdout.splitlines() if l.startswith("{")))}
    assert set(rows) == {"tp", "tp_sp", "ulysses"}
    for mode, row in rows.items():
        for key in ("logits", "loss", "grad"):
            assert row[key] <= RTOL, (mode, row)
