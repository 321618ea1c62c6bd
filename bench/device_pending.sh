#!/usr/bin/env bash
# GPU measurements prepared on the CPU on 2026-11-30 and not yet run. Device tool, kind nvidia-h200, from the repo
# root with `.whl` and `.carry` carried (bench/device_env.sh); each mode fits one call. Writes under $OUT.
#   bench/device_pending.sh check    compiled vs eager fake quantization, bit for bit (the scale divisor fix; issue 5)
#   bench/device_pending.sh e2e      llama_1b end to end: bf16, fp8 with lowbit's quantize kernels, fp8 and fp4 with the
#                                    PyTorch quantize path fused by torch.compile (precision.quantize_kernels=torch; issue 3)
#   bench/device_pending.sh memory   AdamA's GPU tests (fused fold, overlapped fold bit-exact), then AdamA with the one-kernel
#                                    fold, its PyTorch fold and the overlapped fold, with and without checkpointing
#                                    (issue 6; bench/memory.py, no fit search)
#   bench/device_pending.sh attention the fused target kernel swept over key tiles of 1 and 2 gate blocks (block_n 64 / 128)
#                                    against SDPA at 8k and 32k, and the block-sparse kernel (issue 4; bench/attention.py)
set -u
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
case "${1:-}" in
  check)
    bash bench/device_qat.sh check 0 2>&1 | tee "$OUT/fq_check.log" ;;
  e2e)
    cp .carry/valid.jsonl.gz /root/valid.jsonl.gz
    data="model.tokenizer=.carry/tokenizer data=gutenberg data.sources=[/root/valid.jsonl.gz] data.val_sources=[]"
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 500 \
      --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_inductor=+exp=fp8_llama precision.quantize_kernels=torch $data" \
      --variant "fp4_inductor=+exp=fp4_llama precision.occ=false precision.quantize_kernels=torch $data" \
      2>&1 | tee "$OUT/e2e.log" ;;
  memory)
    python3 -m pytest -q -m gpu tests/optim/test_adama.py tests/kernels/test_adama_fold.py 2>&1 | tee "$OUT/adama_gpu_tests.log"
    python3 bench/memory.py --configs "adamw+accum (baseline)" adama "adama (PyTorch fold)" "adama (overlapped fold)" \
      "adamw+ckpt full" "adama+ckpt full" "adama+ckpt full (overlapped fold)" --fit-configs 2>&1 | tee "$OUT/memory.log" ;;
  attention)
    python3 bench/attention.py --seqs 8192 32768 --kv-heads 32 2>&1 | tee "$OUT/attention.log" ;;
  *)
    echo "usage: bench/device_pending.sh check|e2e|memory|attention" >&2; exit 2 ;;
esac
