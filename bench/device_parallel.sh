#!/usr/bin/env bash
# Issue 7 on 2 GPUs (device tool, kind nvidia-h200-x2), from the repo root, `.whl` and `.carry` carried
# (bench/device_env.sh; .carry/tokenizer and a text file at $TEXT). Writes under $OUT.
#   bench/device_parallel.sh single|bench     tokens/s per GPU and the longest sequence of llama_1b: one GPU, TP=2
#                                       bf16 and fp8 rowwise, Ulysses=2 (bench/parallel.py)
#   bench/device_parallel.sh trainer    the real trainer: TP=2 bf16 and fp8, Ulysses=2 at a long sequence,
#                                       ZeRO-3 with the fp8 linears (trained, saved, resumed), the DeepSpeed launcher
set -u
source bench/device_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; TEXT=${TEXT:-/root/valid.jsonl.gz}; mkdir -p "$OUT"
bench() {   # $1 = nproc, rest = bench/parallel.py arguments
  local n=$1; shift
  timeout 300 torchrun --standalone --nproc_per_node="$n" bench/parallel.py --batch 4 --seq-len 4096 \
    --find-max-seq --search-batch 1 --search-from 16384 "$@" 2>&1 | grep -v "^W1\|^\*\*\*\|OMP_NUM" || echo "FAILED: $*"
}
train() {   # $1 = launcher prefix (quoted), rest = train.py overrides
  local launcher=$1; shift
  timeout 400 $launcher train.py model.tokenizer=.carry/tokenizer data=gutenberg "data.sources=[$TEXT]" \
    data.val_sources=[] logger=console model.compile=false trainer.eval_batches=2 "$@" 2>&1 \
    | grep -E "step [0-9]+:|run |error|Error|resum|saved|FAILED|Traceback" | grep -v Warning || echo "FAILED: $*"
}
case "${1:-bench}" in
  single)
    bench 1 --layout single ;;
  bench)
    [ -n "${SINGLE_DONE:-}" ] || bench 1 --layout single
    bench 2 --layout tp2
    bench 2 --layout tp2 --precision fp8_rowwise
    bench 2 --layout ulysses2 ;;
  trainer|trainer_tp|trainer_zero)
    T2="torchrun --standalone --nproc_per_node=2"
    small="trainer.global_batch_size=8 trainer.micro_batch_size=2 trainer.eval_every=10 trainer.save_every=-1"
    if [ "$1" != trainer_zero ]; then
    train "$T2" +exp=bf16_llama parallel=tp2 $small trainer.max_steps=10 run_name=tp2_bf16
    train "$T2" +exp=fp8_llama parallel=tp2 $small trainer.max_steps=10 run_name=tp2_fp8
    train "$T2" +exp=bf16_llama parallel=ulysses2 data.seq_len=${ULYSSES_SEQ:-65536} model.config.max_position_embeddings=131072 trainer.global_batch_size=1 \
      trainer.micro_batch_size=1 trainer.max_steps=4 trainer.eval_every=4 trainer.eval_batches=1 trainer.save_every=-1 run_name=ulysses2_long
    fi
    [ "$1" = trainer_tp ] && exit 0
    z3="trainer.global_batch_size=8 trainer.micro_batch_size=2 trainer.eval_every=5 trainer.save_every=5 run_name=zero3_fp8"
    train "$T2" +exp=fp8_llama parallel=zero3 $z3 trainer.max_steps=5
    train "$T2" +exp=fp8_llama parallel=zero3 $z3 trainer.max_steps=10 trainer.resume=auto
    train "deepspeed --num_gpus=2 --no_local_rank" +exp=fp8_llama parallel=zero2 $small trainer.max_steps=6 run_name=ds_zero2 ;;
  zero3)     # ZeRO-3 with the fp8 linears: 5 steps and a checkpoint, then resumed to 8 and exported
    T2="torchrun --standalone --nproc_per_node=2"
    z3="trainer.global_batch_size=8 trainer.micro_batch_size=2 trainer.eval_every=5 trainer.save_every=5 run_name=zero3_fp8"
    train "$T2" +exp=fp8_llama parallel=zero3 $z3 trainer.max_steps=5
    train "$T2" +exp=fp8_llama parallel=zero3 $z3 trainer.max_steps=8 trainer.resume=auto trainer.export=true
    ls -la runs/zero3_fp8/export | head ;;
esac
