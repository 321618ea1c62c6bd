#!/usr/bin/env bash
# Issue 4's quality experiment on the GPU (device tool, kind nvidia-h200), in two consecutive calls on the same warm
# machine: the SmolLM2 GGUF is split in two halves (../shared/device/model_chunks.sh -> .model/{a,b}).
#   call 1, carry [".model/a", ".carry2"]:        bash bench/device_seer.sh part1
#           (also checks compiled vs eager fake quantization bit for bit: bench/fq_check.py, issue 5)
#   call 2, carry [".model/b", ".whl", ".carry"]: bash bench/device_seer.sh part2
#           joins the GGUF, tokenizes .carry2's Gutenberg train file (kept in /root by call 1), trains fresh gates
#           on at most 20M of its tokens, then `python -m lowbit.eval.sparsity` on 16 x 4096 tokens of the
#           validation file: top-k rows, and the trained gate's thresholds with static and untrained gates at the
#           sparsity each threshold reached (--match-thresholds).
# Writes under $OUT: logs, the JSON of the curve, the plot and the gate checkpoint.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
  part1)
    mkdir -p /root/model && cp .model/a/part.aa /root/model/ && cp .carry2/train.jsonl.xz /root/
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 bench/fq_check.py 2>&1 | tee "$OUT/fq_check.log" ;;
  part2)
    source bench/device_env.sh
    gguf=/root/model/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /root/model/part.aa .model/b/part.ab > $gguf && sha256sum $gguf
    TOKENIZERS_PARALLELISM=true python3 - <<'PY'
import json, lzma, time
import numpy as np
from transformers import AutoTokenizer
start = time.time()
tok = AutoTokenizer.from_pretrained(".carry/tokenizer")
with lzma.open("/root/train.jsonl.xz", "rt") as f:
    texts = [json.loads(line)["text"] for line in f]
ids = []
for i in range(0, len(texts), 32):
    for row in tok(texts[i:i + 32], add_special_tokens=False)["input_ids"]:
        ids.extend(row + [tok.eos_token_id])
np.save("/root/train.npy", np.asarray(ids, dtype=np.uint16))
print(f"train tokens: {len(ids)} from {len(texts)} texts in {time.time() - start:.0f} s", flush=True)
PY
    python3 -m lowbit.eval.sparsity --gguf $gguf --train-tokens /root/train.npy --train-batch 8 --train-steps 100000 \
      --train-seconds 400 --train-max-tokens 20000000 --lr 2e-3 --text .carry/valid.jsonl.gz --seq-len 4096 \
      --num-seqs 16 --thresholds ${THRESHOLDS:-0.004 0.006 0.01 0.02 0.03 0.05 0.08 0.12} --match-thresholds \
      --save-gates "$OUT/gates" --json "$OUT/seer_quality.json" --plot "$OUT/seer_sparsity.png" "${@:2}" 2>&1 \
      | tee "$OUT/seer_quality.log" ;;
  *)
    echo "usage: bench/device_seer.sh part1|part2" >&2; exit 2 ;;
esac
