"""The launch/ scripts, run as written on CPU (gloo), give the single-process losses.

Each script starts two "nodes" of one process on this host: torchrun's c10d rendezvous
(`torchrun_multi_node.sh`), the DeepSpeed launcher reading a hostfile without ssh, every node started with its
own NODE_RANK (`deepspeed.sh`), and `slurm.sbatch` under stand-ins for SLURM's `scontrol` and `srun` (srun
starts the script's command once per node, as on a cluster). Not covered here: DeepSpeed's ssh/pdsh fan-out
and a real SLURM allocation, which need several hosts.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, torchrun
from tests.parallel.test_trainer_layouts import COMMON, assert_same_losses, records

STEPS = 3
ARGS = COMMON + [f"trainer.max_steps={STEPS}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(command: list[str], envs: list[dict], timeout: int = 300) -> None:
    """Start `command` once per node environment, all at once; every node must succeed."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"   # torchrun, deepspeed of this Python
    nodes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **env}) for env in envs]
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, f"{command} failed:\n{output[-6000:]}"
    assert any("on 2 x cpu" in output for output in outputs), outputs[0][-3000:]   # one world of 2 ranks


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single")
    torchrun(ARGS + [f"run_dir={run_dir}"], nproc=1)
    return records(run_dir)


@pytest.mark.slow
def test_torchrun_multi_node_rendezvous(single_process, tmp_path):
    env = dict(NNODES="2", NPROC="1", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), RDZV_ID=tmp_path.name)
    run_nodes(["bash", "launch/torchrun_multi_node.sh", *ARGS, f"run_dir={tmp_path}"], [env, env])
    assert_same_losses(records(tmp_path), single_process, STEPS, "torchrun_multi_node.sh")


@pytest.mark.slow
def test_deepspeed_launcher_with_a_hostfile(single_process, tmp_path):
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = dict(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run_dir = tmp_path / "run"
    run_nodes(["bash", "launch/deepspeed.sh", "parallel=zero2", *ARGS, f"run_dir={run_dir}"],
              [{**env, "NODE_RANK": "0"}, {**env, "NODE_RANK": "1"}])
    assert_same_losses(records(run_dir), single_process, STEPS, "deepspeed.sh + hostfile")


@pytest.mark.slow
def test_slurm_batch_script(single_process, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho localhost\n')           # show hostnames
    (bin_dir / "srun").write_text(                          # one task per node, all at once, like srun
        '#!/usr/bin/env bash\nfor ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & done\n'
        'status=0; for job in $(jobs -p); do wait "$job" || status=1; done; exit $status\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="2", SLURM_JOB_ID=tmp_path.name[-8:],
               GPUS_PER_NODE="1", RDZV_PORT=str(free_port()))
    run_nodes(["bash", "launch/slurm.sbatch", *ARGS, f"run_dir={run_dir}"], [env])
    assert_same_losses(records(run_dir), single_process, STEPS, "slurm.sbatch")
