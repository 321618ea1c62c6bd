#!/usr/bin/env bash
# The DeepSpeed launcher (pair it with parallel=zero1|zero2|zero3, or any layout):
#   one node:     NPROC=8 launch/deepspeed.sh parallel=zero2 +exp=fp8_llama
#   a hostfile:   HOSTFILE=launch/hostfile.example launch/deepspeed.sh parallel=zero3 +exp=fp8_llama
#                 (lines "<host> slots=<GPUs>"; passwordless ssh between hosts, same path everywhere)
# --no_local_rank: the launcher sets RANK/LOCAL_RANK/WORLD_SIZE in the environment, which lowbit reads,
# instead of passing --local_rank, which Hydra would reject.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" --no_local_rank train.py "$@"
fi
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)}
exec deepspeed --num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}" --no_local_rank train.py "$@"
