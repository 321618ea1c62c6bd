#!/usr/bin/env bash
# Which part of fp4 + DGE + OCC lowers the validation loss below bf16 (docs/RESULTS.md, issue 3 convergence)? A small
# CPU stand-in of the GPU comparison: llama_tiny widened to hidden 128 / 4 layers (7.1M parameters), Shakespeare,
# 200 steps of 8 x 64 tokens, AdamW lr 2e-3 (30 warmup steps), validation every 25 steps on 8 batches.
# Variants: bf16 | bf16 at 0.7x lr (DGE's mean factor over its RMS, the step size Adam takes under it) |
#           fp4 + DGE | fp4 + OCC | fp4 + DGE + OCC; and, by NAMES, fp4 + DGE + OCC with each token clamped at its
#           own quantile (dge_occ_token: causal; the paper's tensor-wide quantile lets a batch's tokens see each other);
#           fp8 rowwise and tensorwise, and tensorwise with only its forward (fp8_tensorwise_fwd) or only its backward
#           GEMMs (fp8_tensorwise_bwd) quantized (precision.high_precision): tensorwise ended 2.4% below bf16 on the GPU.
#   ~15 min on 2 cores:
#   [SEED=N] [NAMES="bf16 dge_occ dge_occ_token"] PYTHON=.venv/bin/python bash bench/cpu_dge_ablation.sh [DIR]
#   (docs/dge_ablation_cpu/: seeds 1234, 7)
# precision=bf16 runs in float32 on a CPU (trainer.mixed_precision=auto): the high-precision reference.
set -u
SEED=${SEED:-1234}; PYTHON=${PYTHON:-python3}     # PYTHON=.venv/bin/python after `make install`
root=${1:-runs/dge_ablation_seed$SEED}; mkdir -p "$root"
common="trainer.seed=$SEED model=llama_tiny model.config.hidden_size=128 model.config.intermediate_size=384 model.config.num_hidden_layers=4
  data.seq_len=64 trainer.global_batch_size=8 trainer.micro_batch_size=8 trainer.max_steps=200 trainer.eval_every=25
  trainer.eval_batches=8 trainer.save_every=-1 trainer.export=false optim.warmup_steps=30 logger.backends=[jsonl]"
declare -A VARIANTS=([bf16]="precision=bf16 optim.lr=2e-3" [bf16_lr14]="precision=bf16 optim.lr=1.4e-3"
  [dge]="precision=fp4_vectorwise precision.occ=false optim.lr=2e-3"
  [occ]="precision=fp4_vectorwise precision.dge=false optim.lr=2e-3" [dge_occ]="precision=fp4_vectorwise optim.lr=2e-3"
  [dge_occ_token]="precision=fp4_vectorwise precision.occ_scope=token optim.lr=2e-3"
  [fp8_rowwise]="precision=fp8_rowwise optim.lr=2e-3" [fp8_tensorwise]="precision=fp8_tensorwise optim.lr=2e-3"
  [fp8_tensorwise_fwd]="precision=fp8_tensorwise precision.high_precision=[dgrad,wgrad] optim.lr=2e-3"
  [fp8_tensorwise_bwd]="precision=fp8_tensorwise precision.high_precision=[forward] optim.lr=2e-3")
names=${NAMES:-bf16 bf16_lr14 dge occ dge_occ}      # bf16 first: the table's reference
running=0
for name in $names; do     # two at a time (2 cores)
  OMP_NUM_THREADS=1 $PYTHON train.py $common ${VARIANTS[$name]} run_dir=$root/$name > $root/$name.log 2>&1 &
  running=$((running + 1))
  if [ $running -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait
$PYTHON - "$root" $names <<'PY'
import json, sys
root, names = sys.argv[1], sys.argv[2:]
curves = {n: {r["step"]: r["val/loss"] for r in map(json.loads, open(f"{root}/{n}/metrics.jsonl")) if "val/loss" in r}
          for n in names}
steps = sorted(s for s in curves["bf16"] if s > 0)
print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
print("|---|" + "---|" * len(steps))
for n in names:
    print(f"| {n} | " + " | ".join(f"{curves[n][s]:.3f} ({curves[n][s] / curves['bf16'][s] - 1:+.1%})" for s in steps) + " |")
PY
