"""Shared fixtures: composing lowbit configs in-process and running the real pipeline on tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str]):
    """The config `python train.py OVERRIDES` would run with (no cpu_overrides applied)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from lowbit.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


TINY = ["model=llama_tiny", "data.seq_len=64", "data.max_documents=6", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.eval_batches=2", "trainer.eval_every=0", "optim.warmup_steps=2",
        "optim.lr=3e-3", "logger.backends=[jsonl]"]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"run_dir={tmp_path / 'run'}"]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=N train.py ARGS` for real (gloo on CPU); fail with its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result
