#!/usr/bin/env bash
# Issue 5 on the GPU (device tool), from the repo root, `.whl` and `.carry` carried (bench/device_env.sh).
# The GGUF model in $MODEL_DIR, Gutenberg in $DATA_DIR ({train,valid}.jsonl.gz). Writes under $OUT.
#   bench/device_qat.sh throughput GPU LABEL OVERRIDES...   QAT step (teacher forward included) or plain bf16
#                                               fine-tuning of the same architecture (random init: same shapes and cost)
#   bench/device_qat.sh check GPU              compiled vs eager fake quantization, bit for bit
#   bench/device_qat.sh launch GPU SPEC / wait GPU SPEC [SECONDS]   background QAT runs (lines "GPU NAME FORMAT LOSS=W ...")
#   bench/device_qat.sh train GPU NAME FORMAT LOSSES...   one QAT run on the SmolLM2 GGUF, e.g. ... 0 bd_int3 int3 cakld=1
#   bench/device_qat.sh table GPU FORMAT RUN...           the perplexity table on the validation file
#   bench/device_qat.sh finetune GPU NAME STEPS           plain bf16 fine-tuning of SmolLM2 on the corpus (HF export)
#   bench/device_qat.sh indomain GPU STEPS SPEC           in the background: `finetune GPU ft_teacher STEPS`, then the
#                                               SPEC runs with that in-domain model as teacher and student init
# TEACHER=DIR (an HF export) replaces the GGUF model as teacher and student init in `train` and `table`.
set -u
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; MODEL_DIR=${MODEL_DIR:-/root/model}; DATA_DIR=${DATA_DIR:-/root/data}; mkdir -p "$OUT"
RUNS=${RUNS:-/root/runs}; mkdir -p "$RUNS"
gguf="model.name_or_path=$MODEL_DIR model.tokenizer=$MODEL_DIR"
teacher_model=(--model smollm2_135m --model-path "$MODEL_DIR")
if [ -n "${TEACHER:-}" ]; then
  gguf="model.source=pretrained model.name_or_path=$TEACHER model.tokenizer=$TEACHER model.gguf_file=''"
  teacher_model=(--model hf --model-path "$TEACHER")
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   # four runs share one GPU: no reserved-but-free slack
what=$1; gpu=$2; shift 2
export CUDA_VISIBLE_DEVICES=$gpu
case "$what" in
  check)    # compiled vs eager fake quantization on this GPU, SmolLM2's four weight shapes, bit for bit
    python3 bench/fq_check.py ;;
  throughput)   # LABEL OVERRIDES...: 40 steps of the SmolLM2-135M architecture (random init) on the corpus' valid file;
                # e.g. "qat +exp=bitdistill" or "bf16 +exp=bitdistill objective=lm" (plain fine-tuning, same model)
    label=$1; shift
    mkdir -p "$RUNS"
    python3 train.py model=smollm2_135m_scratch model.tokenizer=.carry/tokenizer "data.sources=[$DATA_DIR/valid.jsonl.gz]" \
      data.val_sources=[] logger=console trainer.max_steps=40 trainer.eval_every=1000 trainer.save_every=-1 \
      trainer.resume=none "$@" run_name=tp_$label run_dir=$RUNS/tp_$label 2>&1 \
      | grep -E "step (1|10|20|30|40):|run |Error|Traceback" | sed "s/^/$label /" ;;
  launch)   # SPEC lines "GPU NAME FORMAT LOSS=W ..." from $1: each run in its own session (outlives this call)
    while read -r g name format losses; do
      [ -z "$g" ] && continue
      setsid nohup bash bench/device_qat.sh train "$g" "$name" "$format" $losses > /dev/null 2>&1 < /dev/null &
      sleep 2
    done < "$1" ;;
  wait)     # until every run named in $1 has its packed export (or $2 seconds pass); then their last lines
    deadline=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $deadline ]; do
      left=0
      while read -r g name rest; do [ -z "$g" ] || [ -f "$RUNS/$name/quantized/model.safetensors" ] || left=$((left + 1)); done < "$1"
      [ $left -eq 0 ] && break
      sleep 10
    done
    while read -r g name rest; do [ -z "$g" ] && continue
      echo "== $name"; grep -E "step [0-9]*(00|50):|val loss|Error|Traceback|packed" "$RUNS/$name.log" | tail -8
    done < "$1" ;;
  train)
    name=$1; format=$2; shift 2
    losses=""; case " $* " in *" cakld="*) ;; *) losses="objective.kd.losses.cakld=0" ;; esac
    for l in "$@"; do losses="$losses objective.kd.losses.$l"; done
    python3 train.py +exp=bitdistill $gguf "data.sources=[$DATA_DIR/train.jsonl.gz]" "data.val_sources=[$DATA_DIR/valid.jsonl.gz]" \
      logger=console objective.qat.format=$format $losses run_name=$name run_dir=$RUNS/$name \
      ${QAT_EXTRA:-} > "$RUNS/$name.log" 2>&1
    ;;
  finetune)
    name=$1; steps=$2
    python3 train.py +exp=bitdistill objective=lm $gguf "data.sources=[$DATA_DIR/train.jsonl.gz]" \
      "data.val_sources=[$DATA_DIR/valid.jsonl.gz]" logger=console trainer.max_steps=$steps trainer.save_every=-1 \
      trainer.eval_every=$steps run_name=$name run_dir=$RUNS/$name > "$RUNS/$name.log" 2>&1 ;;
  indomain)
    steps=$1; spec=$2
    setsid nohup bash -c "bash bench/device_qat.sh finetune $gpu ft_teacher $steps && \
      TEACHER=$RUNS/ft_teacher/export bash bench/device_qat.sh launch $gpu $spec" > "$RUNS/indomain.log" 2>&1 < /dev/null & ;;
  table)
    format=$1; shift
    runs=(); for r in "$@"; do runs+=(--run "$r=$RUNS/$r/quantized/model.safetensors"); done
    python3 -m lowbit.eval.quant_table "${teacher_model[@]}" --format "$format" --group-size 128 \
      --heldout "$DATA_DIR/valid.jsonl.gz" --calib "$DATA_DIR/train.jsonl.gz" --max-tokens 0 --batch-size 16 "${runs[@]}" \
      --out "$OUT/quant_table_${TABLE:-$format}.md" 2>&1 | grep -v "Loading weights" ;;
esac
