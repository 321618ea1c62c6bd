#!/usr/bin/env bash
# Issue 5 on the GPU (device tool), from the repo root, `.whl` and `.carry` carried (bench/device_env.sh).
# The GGUF model in $MODEL_DIR, Gutenberg in $DATA_DIR ({train,valid}.jsonl.gz). Writes under $OUT.
#   bench/device_qat.sh throughput GPU          QAT step (teacher forward included) vs plain bf16 fine-tuning
#                                               of the same architecture (random init: same shapes and cost)
#   bench/device_qat.sh train GPU NAME FORMAT LOSSES...   one QAT run on the SmolLM2 GGUF, e.g. ... 0 bd_int3 int3 cakld=1
#   bench/device_qat.sh table GPU FORMAT RUN...           the perplexity table on the validation file
set -u
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; MODEL_DIR=${MODEL_DIR:-/root/model}; DATA_DIR=${DATA_DIR:-/root/data}; mkdir -p "$OUT"
RUNS=${RUNS:-/root/runs}
gguf="model.name_or_path=$MODEL_DIR model.tokenizer=$MODEL_DIR"
what=$1; gpu=$2; shift 2
export CUDA_VISIBLE_DEVICES=$gpu
case "$what" in
  throughput)
    q="model=smollm2_135m_scratch model.tokenizer=.carry/tokenizer data.sources=[$DATA_DIR/valid.jsonl.gz]
       data.val_sources=[] logger=console trainer.max_steps=40 trainer.eval_every=1000 trainer.save_every=-1
       trainer.resume=none"
    for compile in false true; do
      python3 train.py +exp=bitdistill $q model.compile=$compile run_name=qat_$compile run_dir=$RUNS/tp_qat_$compile 2>&1 \
        | grep -E "step (1|10|20|30|40):|run |Error|Traceback" | sed "s/^/qat compile=$compile /"
      python3 train.py +exp=bitdistill objective=lm $q model.compile=$compile run_name=bf16_$compile run_dir=$RUNS/tp_bf16_$compile 2>&1 \
        | grep -E "step (1|10|20|30|40):|run |Error|Traceback" | sed "s/^/bf16 compile=$compile /"
    done ;;
  train)
    name=$1; format=$2; shift 2
    losses="objective.kd.losses.cakld=0"
    for l in "$@"; do losses="$losses objective.kd.losses.$l"; done
    python3 train.py +exp=bitdistill $gguf "data.sources=[$DATA_DIR/train.jsonl.gz]" "data.val_sources=[$DATA_DIR/valid.jsonl.gz]" \
      logger=console objective.qat.format=$format $losses run_name=$name run_dir=$RUNS/$name ${QAT_EXTRA:-} > "$OUT/$name.log" 2>&1
    grep -E "step [0-9]*0:|val|Error|Traceback|packed" "$OUT/$name.log" | tail -20 ;;
  table)
    format=$1; shift
    runs=(); for r in "$@"; do runs+=(--run "$r=$RUNS/$r/quantized/model.safetensors"); done
    python3 -m lowbit.eval.quant_table --model smollm2_135m --model-path "$MODEL_DIR" --format "$format" --group-size 128 \
      --heldout "$DATA_DIR/valid.jsonl.gz" --calib "$DATA_DIR/train.jsonl.gz" --max-tokens 0 --batch-size 16 "${runs[@]}" \
      --out "$OUT/quant_table_$format.md" 2>&1 | grep -v "Loading weights" ;;
esac
