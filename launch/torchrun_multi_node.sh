#!/usr/bin/env bash
# Several nodes with c10d rendezvous. Run the same command on every node:
#   NNODES=2 RDZV_HOST=node0.example NPROC=8 launch/torchrun_multi_node.sh +exp=fp8_llama
set -euo pipefail
cd "$(dirname "$0")/.."
# lowbit's environment: the active one, else the repository's .venv (make install)
[ -x .venv/bin/python ] && ! command -v torchrun >/dev/null && export PATH="$PWD/.venv/bin:$PATH"
command -v torchrun >/dev/null || { echo "torchrun not found: run make install, or activate the environment that has lowbit" >&2; exit 1; }
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST, a host every node reaches (e.g. the first node)}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv_id="${RDZV_ID:-lowbit}" \
  train.py "$@"
