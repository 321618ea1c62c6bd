#!/usr/bin/env bash
# The DeepSpeed launcher (pair it with parallel=zero1|zero2|zero3, or any layout):
#   one node:     NPROC=8 launch/deepspeed.sh parallel=zero2 +exp=fp8_llama
#   a hostfile:   HOSTFILE=launch/hostfile.example launch/deepspeed.sh parallel=zero3 +exp=fp8_llama
#                 (lines "<host> slots=<GPUs>"; passwordless ssh and pdsh between hosts, same path everywhere)
#   no ssh:       the same command on every node, each with its own NODE_RANK (0 = the hostfile's first line):
#                 HOSTFILE=launch/hostfile.example NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed.sh parallel=zero3 ...
# --no_local_rank: the launcher sets RANK/LOCAL_RANK/WORLD_SIZE in the environment, which lowbit reads,
# instead of passing --local_rank, which Hydra would reject.
set -euo pipefail
cd "$(dirname "$0")/.."
# lowbit's environment: the active one, else the repository's .venv (make install)
[ -x .venv/bin/python ] && ! command -v deepspeed >/dev/null && export PATH="$PWD/.venv/bin:$PATH"
command -v deepspeed >/dev/null || { echo "deepspeed not found: run make install, or activate the environment that has lowbit" >&2; exit 1; }
if [ -n "${HOSTFILE:-}" ] && [ -n "${NODE_RANK:-}" ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR, the address of the first node in the hostfile, reachable from every node}"
  exec deepspeed --hostfile="$HOSTFILE" --no_ssh --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="${MASTER_PORT:-29500}" --no_local_rank train.py "$@"
fi
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" --no_local_rank train.py "$@"
fi
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)}
exec deepspeed --num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}" --no_local_rank train.py "$@"
