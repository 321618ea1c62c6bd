"""Shared fixtures: composing lowbit configs in-process and running the real pipeline on tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter, which must be switched on before Triton is first
# imported (importing lowbit imports it): set here, before any test module, so the outcome of a kernel test does
# not depend on which modules pytest imported first. Dispatch is unchanged: use_triton='auto' picks Triton on CUDA
# tensors only, so only the kernel tests (use_triton='always') run the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    """Run `torchrun --nproc_per_node=N train.py ARGS` for real (gloo on CPU); fail with its output and the end
    of each rank's own stderr (kept in a log directory: a rank that aborts, whose faulthandler stack would drown
    in torchrun's summary of the others' SIGTERMs, still shows what killed it)."""
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "--log-dir", logs, "--tee", "3", str(ROOT / "train.py"), *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
        if result.returncode != 0:
            ranks = "".join(f"\n--- {path.relative_to(logs)} ---\n{path.read_text(errors='replace')[-2500:]}"
                            for path in sorted(Path(logs).rglob("stderr.log")))
            pytest.fail(f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\nper rank:{ranks}")
    return result


CRASH_SIGNALS = ("Signal 11 (SIGSEGV)", "Signal 7 (SIGBUS)")


def run_gloo_workers(script: Path, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stateless check script under `torchrun --nproc_per_node=N` (gloo, one thread per process) and
    return its result; the caller asserts on what the script printed or wrote.

    Every worker runs with faulthandler on, so a crash prints the Python stack of each thread. A worker
    killed by SIGSEGV/SIGBUS is re-run once and the crash report kept as a warning (seen once, in CI on
    2026-11-30: rank 0 of equivalence_worker.py died in a gloo all-gather of the CPU torch build; not
    reproduced in 20 local runs, 12 of them three at a time); a second crash, a non-zero exit or any numerical mismatch fails as usual. Only
    scripts without side effects use this: a re-run of train.py would meet its own checkpoints."""
    import warnings

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(signal in output for signal in CRASH_SIGNALS):
        warnings.warn(f"{script.name}: a worker crashed (re-running once):\n{output[-6000:]}")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return result
