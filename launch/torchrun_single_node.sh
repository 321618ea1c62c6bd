#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU processes):  launch/torchrun_single_node.sh +exp=fp8_llama [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# lowbit's environment: the active one, else the repository's .venv (make install)
[ -x .venv/bin/python ] && ! command -v torchrun >/dev/null && export PATH="$PWD/.venv/bin:$PATH"
command -v torchrun >/dev/null || { echo "torchrun not found: run make install, or activate the environment that has lowbit" >&2; exit 1; }
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)}
exec torchrun --standalone --nproc_per_node="$NPROC" train.py "$@"
