#!/usr/bin/env bash
# GPU measurements, one device-tool call each (kind nvidia-h200, from the repo root with `.whl` and `.carry` carried,
# bench/device_env.sh). Writes under $OUT. Each case's last run, with its figures, is in docs/RESULTS.md.
#   bench/device_pending.sh check     compiled vs eager fake quantization, bit for bit (issue 5)
#   bench/device_pending.sh e2e       llama_1b end to end: bf16, fp8 and fp4 as `+exp` runs them, fp4 without OCC (issue 3)
#   bench/device_pending.sh memory    AdamA's GPU tests, then bench/memory.py: AdamA (one-kernel and PyTorch fold) and
#                                     checkpointing, three rounds through the configs (issue 6)
#   bench/device_pending.sh memory_compiled   the same with each decoder layer compiled (the trainer's default)
#   bench/device_pending.sh occ       OCC's compensation: the clamp and segment kernels' GPU tests, then the clamp and the
#                                     products next to the bf16 GEMM, and one layer eager and compiled (bench/occ.py)
#   bench/device_pending.sh occ_profile  the same layers compiled (Gaussian x), with each one's top CUDA kernels: where do
#                                     fp4+DGE (2.8 ms against bf16's 1.2 at 8192 x 4096 x 4096) and OCC spend their time;
#                                     then one fp4 linear with and without DGE in CUDA graphs (bench/linear.py)
#   bench/device_pending.sh occ_e2e   the main job end to end against bf16: OCC's products in bf16 (the default) and in
#                                     FP8 (precision.occ_product=fp8), and no OCC
#   bench/device_pending.sh attention the fused target kernel over 128- and 256-row tiles and launch settings
#                                     against SDPA at 8k and 32k, and the block-sparse kernel (issue 4; bench/attention.py)
#   bench/device_pending.sh gluon_attention  the Gluon target kernel (the default on sm_90): its tests, then its
#                                     schedulers, head groups, tiles and ping-pong against the Triton kernel and SDPA
#                                     at 8k and 32k, and the gate pipeline on a random head-dim-64 Llama (issue 4)
#   bench/device_pending.sh attention_probe  the Gluon kernel against copies with one stage left out (pooling
#                                     epilogue, output store, row-maximum stores, exponentials) or other pooling
#                                     steps at 8k and 32k (issue 4)
#   bench/device_pending.sh backends  the same with the defaults only, and SDPA timed on each of its backends
#   bench/device_pending.sh layer     one llama_1b decoder layer compiled: bf16, lowbit's fp8/fp4 and torchao's float8
#                                     (carry torchao's wheel in .whl) at 8k and 32k tokens per call (issue 3)
#   bench/device_pending.sh e2e_micro bf16 against `+exp=fp8_llama` (tensorwise) end to end at micro-batches 2, 4, 8
#   bench/device_pending.sh gw_hp     one linear, fp8 rowwise with the weight gradient in bf16 (precision.high_precision)
#                                     against torchao's rowwise_with_gw_hp and both plain rowwise recipes (issue 3)
#   bench/device_pending.sh blockwise_cublas  fp8_blockwise's GEMMs by cuBLASLt's block-scaled FP8 GEMM against
#                                     lowbit's Triton kernel: GPU tests, the GEMMs alone, one linear at the three shapes
#   bench/device_pending.sh e2e_blockwise  llama_1b end to end: bf16 against fp8_blockwise by cuBLASLt and by the
#                                     Triton kernel (GPU tests of the cuBLASLt path first)
#   bench/device_pending.sh blockwise_kernels  fp8_blockwise end to end, its quantizations by Inductor against lowbit's
#                                     Triton kernels
#   bench/device_pending.sh fp4default  nvfp4 / mxfp4 by their default GEMM (dequant) against prescale, and fp4
#                                     vectorwise with DGE, one linear at the three shapes, compiled, after GPU tests
#   bench/device_pending.sh e2e_blocks  GPU tests of the block quantize kernel and the linear layer (each recipe compiled by
#                                     Inductor among them), then llama_1b end
#                                     to end: bf16, nvfp4 and mxfp4 (dequant GEMMs; FP4_DGE=1: and fp4+DGE without
#                                     OCC; STEPS=N: steps per run, 6)
#   bench/device_pending.sh fp4quant  the FP4 block quantize kernel (NVFP4 / MXFP4 pairs) over tiles and warps, split
#                                     and one launch, each bit-exact first (bench/quantize.py block_sweep)
#   bench/device_pending.sh dge       fp4 vectorwise with DGE in eager mode, its weight-gradient factor now one Triton
#                                     kernel (was 0.72-0.77x bf16 eager against 1.35-1.44x compiled), GPU tests first
#   bench/device_pending.sh e2e_profile  llama_1b, bf16 / nvfp4 / mxfp4 / fp8 tensorwise, step 3 profiled by the trainer
#                                     (trainer.profile_step): wall time against the GPU's kernel time, top kernels
#   bench/device_pending.sh nvfp4_global  NVFP4's tensor scale inside the block kernel: GPU tests, the quantize table
#                                     (and each pair against its x side), bf16 / nvfp4 / mxfp4 profiled
#   bench/device_pending.sh cache_weights fp8_llama with weights quantized once per step vs per micro-batch
#   bench/device_pending.sh causal_sdpa   bf16 / fp8_llama / nvfp4 profiled with the maskless SDPA: host syncs,
#                                     tokens/s
#   bench/device_pending.sh microbatch    bf16 / fp8_llama at micro-batch 2 (the presets) and 4 (same global batch):
#                                     what fewer launches per token buy the host-bound fp8 step
#   bench/device_pending.sh amax_ceiling  bf16 / fp8_llama / fp8_llama with every scale known before its cast (a
#                                     ceiling of delayed scaling fused into the producers, bench/amax_ceiling.py)
#   bench/device_pending.sh delayed   bf16 / fp8_llama with current scaling / fp8_llama (delayed scaling) end to end
#   bench/device_pending.sh delayed_fsdp2   the same on 2 GPUs under FSDP2 (kind nvidia-h200-x2)
#   bench/device_pending.sh delayed_dy      and with precision.delayed_operands=[dy] (output gradients only)
#   bench/device_pending.sh overshoot       delayed scaling's overshoot statistic (precision.stats_every) on the GPU
#                                     convergence protocol: SmolLM2-135M architecture, 4 micro-batches of 8 x 2048, 120 steps
#   bench/device_pending.sh fsdp2_precision  FSDP2 with bf16 / FP8 all-gathers, without resharding, one reduce per step (kind nvidia-h200-x2)
#   bench/device_pending.sh breakdown     bf16 / fp8_llama / fp4_llama, one profiled step each: kernel time by kind and
#                                     the GPU's idle gaps (bench/trace_breakdown.py over the Chrome traces)
#   bench/device_pending.sh cache_graph   the weight cache's refresh as one CUDA graph: GPU test (== eager bit for
#                                     bit), bf16 / fp8_llama with and without the graph / fp4_llama cached, profiled
#   bench/device_pending.sh lm_head       GPU tests of the linear (the wgrad GEMM's float32 output), then bf16 / fp8_llama
#                                     / fp8_llama with the output layer (lm_head, tied) quantized too: what the one
#                                     bf16 GEMM left in the fp8 step costs
#   bench/device_pending.sh loss_e2e      bf16 / fp8_llama / fp4_llama end to end with the compiled next-token loss
#                                     (bench/loss.py: 7.2 -> 1.0 ms per micro-batch), profiled, with the breakdown
#   bench/device_pending.sh sync_free     the step without host syncs (non-finite skip on the device, figures read a
#                                     step late, CUDA-event step times): fused AdamW's found_inf on CUDA, then bf16 /
#                                     fp8_llama / fp4_llama unprofiled, 8 steps, both clocks
#   bench/device_pending.sh ab_sync       .carry2/old (the trainer before the sync-free step, with the jsonl's time
#                                     field) against this tree: bf16 / fp8_llama each, both clocks; then fp8_llama's
#                                     steps 3-4 profiled together (a step boundary inside the trace) and broken down
#                                     (PROFILE=0: the A/B only)
#   bench/device_pending.sh fused_proj    one llama_1b layer compiled, q/k/v and gate/up as one GEMM each against
#                                     separate ones, bf16 and fp8 tensorwise (bench/fused_projections.py)
#   bench/device_pending.sh cd_tuning     fp8_llama with and without Inductor's coordinate-descent tuning of its fused
#                                     kernels (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1; the quantizing fusions run at
#                                     ~50% of HBM bandwidth), unprofiled
#   bench/device_pending.sh cd_both       the GEMM table below, then bf16 / fp8_llama with and without coordinate-descent
#                                     tuning in one run
#   bench/device_pending.sh pw_autotune   bf16 / fp8_llama with and without Inductor's pointwise/reduction autotuning
#                                     (run 12-04: +0.3-0.5% each, fp8_llama 1.25x either way; not adopted)
#   bench/device_pending.sh rowwise_kernels  fp8 rowwise / fp4_llama end to end with lowbit's quantize kernels against
#                                     Inductor's fusions (the rowwise pairs' amax pass 2x faster since 12-03)
#   bench/device_pending.sh rowwise_cached   GPU tests, then bf16 / fp8 rowwise with the weight cache / fp4_llama with and
#                                     without OCC end to end (rowwise ran uncached on 12-03: 1.06x)
#   bench/device_pending.sh quantize_passes  the rowwise pair's two passes apart and the amax candidates (+1-2 warps)
#   bench/device_pending.sh fp4_maxnreg   the FP4 block pairs at capped registers per thread (more programs per SM),
#                                     then nvfp4 end to end at MAXNREG (default 128) against the default
#                                     (run 12-04: no cap helps, 128 is 1-2% slower; default stays uncapped)
#   bench/device_pending.sh fp4_narrow    the FP4 block pair kernel at 1-2 warps per program and wide tiles (bit-exact first;
#                                     run 12-03: FP4_PAIR_TILES now (16, 128, 1) / (32, 128, 2))
#   bench/device_pending.sh gemm_shapes   each of a llama_1b layer's 21 GEMMs at 8192 tokens, FP8 tensorwise against bf16,
#                                     TFLOP/s and share of peak (bench/gemm_shapes.py), with cuBLASLt's default
#                                     workspace and with 64 MiB (CUBLASLT_WORKSPACE_SIZE)
#   bench/device_pending.sh host_ops      FP4 block recipes' host overhead: the Hadamard kernel traced by Dynamo
#   bench/device_pending.sh tma_t         x^T_q stored by TMA vs pointers: GPU tests, pairs, ncu, e2e both ways
#   bench/device_pending.sh offload_gpu   the GPU tests of activation offload (model moved to CUDA after apply)
#   bench/device_pending.sh alu           FP4 block kernels with fewer integer-pipe operations: tests, bandwidth, ncu, e2e
#   bench/device_pending.sh ncu_blocks    Nsight Compute on each FP4 block quantize launch (x side, pair)
#   bench/device_pending.sh sass_blocks   the FP4 block quantize kernels' IR, SASS and instruction mix
#   bench/device_pending.sh e2e_autotune  fp8 tensorwise end to end with and without Inductor's autotuning
#                                     (model.compile_mode=max-autotune-no-cudagraphs); call it twice in a row: the
#                                     first call only compiles
#   bench/device_pending.sh determinism  the SmolLM2-135M architecture, fp8 tensorwise, compiled, 32 steps: twice with
#                                     trainer.deterministic=true, twice without; are the losses bit-identical, and at
#                                     what cost in tokens/s (GPU runs drift apart from step 2 without it)
#   bench/device_pending.sh blocks    fp8_blockwise's kernels: GPU tests of the quantize and GEMM kernels, every quantize
#                                     kernel bit for bit against the reference (bench/quantize.py), and the block-scaled
#                                     GEMM over loads and tiles (bench/block_gemm.py)
#   bench/device_pending.sh fp4gemm   the NVFP4 / MXFP4 GEMM: GPU tests of the three schemes, then them against bf16
#                                     cuBLAS (bench/fp4_gemm.py: rescale; prescale, the default, over tiles; dequant =
#                                     exact bf16 operands + cuBLAS), and one linear fwd+bwd by the default (prescale)
#                                     and precision.block_gemm=dequant (bench/linear.py; issue 3)
#   bench/device_pending.sh fp4_tiles     the MXFP4 pair over tiles x a register cap x both E2M1 roundings
#   bench/device_pending.sh fp4_narrow_store  the FP4 pairs with x_q stored 16 / 8 bytes per thread, GPU tests first
#   bench/device_pending.sh linear_all    every recipe's linear fwd+bwd against bf16 and torchao, eager and compiled
#   bench/device_pending.sh linear_delayed  fp8 tensorwise's linear, current against delayed scaling, lowbit's
#                                     quantize kernels and the PyTorch path fused by Inductor
#   bench/device_pending.sh linear_profile  the same at 8192x4096x4096 only, the GEMMs alone first, each variant's top
#                                     CUDA kernels: where fp8 tensorwise's fwd+bwd spends the time the 1.5x bar needs
#   bench/device_pending.sh amax_tensor   the flat tensorwise amax kernel over launch settings against the strip kernel
#                                     (GPU test first), then linear_profile's fp8 tensorwise rows with the default
set -u
source bench/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# the end-to-end cases train on Gutenberg's validation file (carried in .carry) with the SmolLM2 tokenizer
data="model.tokenizer=.carry/tokenizer data=gutenberg data.sources=[/root/valid.jsonl.gz] data.val_sources=[]"
[ -f .carry/valid.jsonl.gz ] && cp .carry/valid.jsonl.gz /root/valid.jsonl.gz

ab_env() {  # ab_env NAME=VALUE TAG LOG: bf16 and fp8_llama end to end, each without and with one environment setting
  python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 140 --variant "bf16=+exp=bf16_llama $data" \
    --variant "fp8=+exp=fp8_llama $data" --variant "bf16_$2=+exp=bf16_llama $data env:$1" \
    --variant "fp8_$2=+exp=fp8_llama $data env:$1" 2>&1 | grep -v Warning | tee "$OUT/$3"
}
case "${1:-}" in
  check)
    python3 bench/fq_check.py 2>&1 | tee "$OUT/fq_check.log" ;;
  e2e)
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 240 \
      --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp4_no_occ=+exp=fp4_llama precision.occ=false $data" \
      --variant "fp4=+exp=fp4_llama $data" \
      2>&1 | tee "$OUT/e2e.log" ;;
  memory)
    python3 -m pytest -q tests/optim/test_adama.py tests/kernels/test_adama_fold.py 2>&1 | tail -3 | tee "$OUT/adama_gpu_tests.log"
    python3 bench/memory.py --configs "adamw+accum (baseline)" adama "adama (PyTorch fold)" "adamw+ckpt full" \
      "adama+ckpt full" --repeat 3 --fit-configs 2>&1 | tee "$OUT/memory.log" ;;
  memory_compiled)
    python3 bench/memory.py --compile --configs "adamw+accum (baseline)" adama "adamw+ckpt full" "adama+ckpt full" \
      --repeat 3 --fit-configs 2>&1 | tee "$OUT/memory_compiled.log" ;;
  occ)
    python3 -m pytest -q tests/kernels/test_segment_matmul.py tests/precision/test_linear.py 2>&1 | tail -3 | tee "$OUT/occ_gpu_tests.log"
    python3 bench/occ.py --shapes 4096,4096 4096,14336 --compile 2>&1 | tee "$OUT/occ.log" ;;
  e2e_micro)
    variants=()
    for mb in 2 4 8; do
      variants+=(--variant "bf16_mb$mb=+exp=bf16_llama trainer.micro_batch_size=$mb $data"
                 --variant "fp8_mb$mb=+exp=fp8_llama trainer.micro_batch_size=$mb $data")
    done
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 110 "${variants[@]}" 2>&1 | tee "$OUT/e2e_micro.log" ;;
  gw_hp)
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear \
      --recipes fp8_rowwise,fp8_rowwise+gw_hp --compile-lowbit fp8_rowwise,fp8_rowwise+gw_hp --out "$OUT" 2>&1 \
      | tail -40 | tee "$OUT/linear_gw_hp.log" ;;
  occ_profile)
    python3 bench/occ.py --shapes 4096,4096 4096,14336 --patterns gaussian --compile --profile 12 2>&1 \
      | tee "$OUT/occ_profile.log"
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336 --parts linear --recipes fp4_vectorwise,fp4_vectorwise+dge \
      --compile-lowbit fp4_vectorwise,fp4_vectorwise+dge --out "$OUT" 2>&1 | tail -20 | tee "$OUT/linear_fp4_dge.log" ;;
  fp4_pair)
    # the Gluon FP4 block pair kernel (thirty-sixth session): its GPU tests, then next to the Triton kernel by tiles
    # (H100, 2026-12-06, 8192 x 4096 only: bit for bit, slower; docs/bench_h100_2026-12-06)
    python3 -m pytest -q -m gpu tests/kernels/test_quantize_gluon.py tests/kernels/test_quantize.py 2>&1 | tail -3 \
      | tee "$OUT/fp4_pair_tests.log"
    python3 bench/quantize_fp4.py --out "$OUT" 2>&1 | tee "$OUT/quantize_fp4.log" ;;
  fp4_tiles)
    # the MXFP4 pair's tiles x register caps x both E2M1 roundings (thirty-eighth session: (32, 128, 4) doubles the
    # resident warps for a fifth more instructions; Nsight Compute put the pair on global-load latency at 25% occupancy)
    python3 bench/fp4_pair_tiles.py --out "$OUT" 2>&1 | tee "$OUT/fp4_pair_tiles.log" ;;
  linear_all)
    # every recipe's linear fwd+bwd against bf16 and torchao's float8 (tensorwise, rowwise) at the three shapes, one
    # run, lowbit eager and compiled (issue 3's speed-up bars; fp4 vectorwise as the preset runs it, with DGE)
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear --budget-s 470 \
      --recipes fp8_tensorwise,fp8_rowwise,fp8_blockwise,fp4_vectorwise+dge,nvfp4,mxfp4 \
      --compile-lowbit fp8_tensorwise,fp8_rowwise,fp8_blockwise,fp4_vectorwise+dge,nvfp4,mxfp4 --out "$OUT" 2>&1 \
      | tail -40 | tee "$OUT/linear_all.log" ;;
  linear_delayed)
    # fp8 tensorwise's linear with current scaling against delayed scaling (as `+exp=fp8_llama` runs its
    # accumulation micro-batches) and torchao's tensorwise, the three shapes, eager and compiled; with lowbit's
    # quantize kernels, then with the PyTorch path fused by Inductor (what compiled layers take by default)
    for kernels in triton torch; do
      mkdir -p "$OUT/$kernels"
      python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear --budget-s 240 \
        --recipes fp8_tensorwise,fp8_tensorwise+delayed --compile-lowbit fp8_tensorwise,fp8_tensorwise+delayed \
        --quantize-kernels $kernels --out "$OUT/$kernels" 2>&1 | tail -10 | tee "$OUT/linear_delayed_$kernels.log"
    done ;;
  amax_tensor)
    python3 -m pytest -q -m gpu tests/kernels/test_quantize.py -k "amax or reference_on_gpu" 2>&1 | tail -3
    python3 bench/amax_tensor.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/amax_tensor.log" ;;
  linear_profile)
    for kernels in triton torch; do
      mkdir -p "$OUT/$kernels"
      python3 bench/linear.py --shapes 8192x4096x4096 --parts gemm,linear --budget-s 200 --profile 14 \
        --recipes fp8_tensorwise,fp8_tensorwise+delayed --compile-lowbit fp8_tensorwise,fp8_tensorwise+delayed \
        --quantize-kernels $kernels --out "$OUT/$kernels" 2>&1 | grep -v Warning | tee "$OUT/linear_profile_$kernels.log"
    done ;;
  fp4_narrow_store)
    # the FP4 pairs with x_q stored 8 bytes per thread (NARROW_PAIR_STORE: whole sectors per load) against 16,
    # GPU tests of the block kernel first
    python3 -m pytest -q -m gpu tests/kernels/test_quantize.py -k "block or persistent" 2>&1 | tail -3
    python3 bench/fp4_pair_tiles.py --narrow --out "$OUT" 2>&1 | tee "$OUT/fp4_pair_narrow.log" ;;
  fp4_pair_e2e)
    # precision=nvfp4 / mxfp4 end to end with either FP4 pair kernel
    python3 bench/train_throughput.py --steps 5 --warmup 2 --timeout 110 --variant "bf16=+exp=bf16_llama $data" \
      --variant "nvfp4_triton=+exp=bf16_llama precision=nvfp4 $data env:LOWBIT_FP4_PAIR_KERNEL=triton" \
      --variant "nvfp4_gluon=+exp=bf16_llama precision=nvfp4 $data env:LOWBIT_FP4_PAIR_KERNEL=gluon" \
      --variant "mxfp4_triton=+exp=bf16_llama precision=mxfp4 $data env:LOWBIT_FP4_PAIR_KERNEL=triton" \
      --variant "mxfp4_gluon=+exp=bf16_llama precision=mxfp4 $data env:LOWBIT_FP4_PAIR_KERNEL=gluon" \
      2>&1 | tee "$OUT/e2e_fp4_pair.log" ;;
  occ_e2e)
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp4=+exp=fp4_llama $data" --variant "fp4_occ_fp8=+exp=fp4_llama precision.occ_product=fp8 $data" \
      --variant "fp4_no_occ=+exp=fp4_llama precision.occ=false $data" 2>&1 | tee "$OUT/e2e_occ.log" ;;
  gluon_attention)
    # the Gluon target kernel, the default on sm_90 (thirty-fifth session, H100: 1.04-1.13x SDPA in device time,
    # 1.06-1.53x from an idle device with the host's launch work): its tests (the
    # sm_90 compile check under the image's Triton 3.6 among them), then the default (dynamic scheduler, L2-sized head
    # groups) against static scheduling, other head groups, ping-pong, the Triton kernel and SDPA (each timed output
    # checked against the Triton kernel's), and the gate pipeline on it
    timeout 200 python3 -m pytest -q tests/kernels/test_attention_kernels.py -k hopper -p no:cacheprovider 2>&1 \
      | tail -5 | tee "$OUT/gluon_pytest.log"
    timeout 400 python3 bench/attention.py --seqs 8192 32768 --kv-heads 32 8 --block-m 128 256 --launch 8,3 --tma on \
      --gluon 2,128 2,128,0,0,0 2,128,0,1000,0 2,128,0,4 2,128,1 2,64 --gate-smoke --json "$OUT/attn.json" 2>&1 \
      | tee "$OUT/attention_gluon.log"
    # each call's device time alone (CUDA graph replays): the sync timer above also counts the host's Python work
    # before the kernel's launch, which SDPA (C++) mostly does not have; twice each, to see the spread; then the
    # host's time per call of each (bench/attention_host.py)
    for timer in graph sync graph sync; do
      timeout 200 python3 bench/attention.py --seqs 8192 32768 --kv-heads 32 8 --block-m 128 --launch 8,3 --tma on \
        --gluon 2,128 --timer $timer 2>&1 | grep -E "^device|^\| [0-9]" | tee -a "$OUT/attention_timers.log"
    done
    python3 bench/attention_host.py 2>&1 | tee "$OUT/attention_host.log" ;;
  attention_probe)
    # where the Gluon kernel's time goes (thirty-fifth session, H100, 8k MHA: the pooling epilogue ~4%, O's TMA
    # store ~1.5%): the kernel against copies without the pooling epilogue, the output store, both, the row-maximum
    # stores or the exponentials (outputs wrong by construction; times only) and with other pooling steps, at 8k
    # and 32k, SDPA in the same process, by CUDA graph replays
    timeout 300 python3 bench/attention_probe.py --seqs 8192 32768 --kv-heads 32 8 --json "$OUT/probe.json" 2>&1 \
      | tee "$OUT/attention_probe.log" ;;
  attention)
    # 256-row query tiles: 1.49x SDPA at 32k against 1.58x for 128 rows in one run (2026-12-01, seventh session)
    python3 bench/attention.py --seqs 8192 32768 --kv-heads 32 8 --block-m 128 256 --tma on --launch 8,3 8,4 16,3 \
      2>&1 | tee "$OUT/attention.log" ;;
  adama_summed)
    # AdamA second_moment=summed on the GPU (twenty-sixth session: CPU only): its fused kernels against the PyTorch
    # path, then memory and throughput next to AdamW and the paper's AdamA (llama_1b, seq 4096, 4 micro-batches,
    # compiled layers); the 1,000-step convergence is `STEPS=1000 SEQ=1024 BATCH=16 MICRO=4 EVERY=100
    # NAMES="adamw_noclip adama_summed_noclip" bash bench/device_convergence.sh` (carry .carry2 too)
    TRITON_INTERPRET=0 python3 -m pytest -q tests/kernels/test_adama_fold.py tests/optim/test_adama.py 2>&1 | tail -3 \
      | tee "$OUT/adama_summed_gpu_tests.log"
    python3 bench/memory.py --compile --configs "adamw+accum (baseline)" adama "adama (summed)" "adamw+ckpt full" \
      "adama+ckpt full" "adama (summed)+ckpt full" --repeat 3 --fit-configs 2>&1 | tee "$OUT/memory_summed.log" ;;
  amax_ceiling)
    # The ceiling of delayed scaling fused into the producers (bench/amax_ceiling.py): fp8_llama with every tensorwise
    # activation / output-gradient scale from the tensor's first row, so Inductor casts in one pass; bf16 and the
    # exact preset in the same call. Only the step time of the ceiling runs means anything (their values saturate).
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_ceiling_all=+exp=fp8_llama $data entry:bench/amax_ceiling.py env:AMAX_CEILING=all" \
      --variant "fp8_ceiling_act=+exp=fp8_llama $data entry:bench/amax_ceiling.py env:AMAX_CEILING=act" 2>&1 \
      | grep -v Warning | tee "$OUT/amax_ceiling.log" ;;
  delayed)
    # precision.scaling=delayed (lowbit/precision/delayed.py): fp8_llama's activation and gradient scales from an amax
    # history recorded on the first micro-batch of each step, so Inductor fuses each cast into its producer (the
    # ceiling of that, amax_ceiling: 1.33x); bf16 and the preset (current scaling) in the same call
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 240 --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp8=+exp=fp8_llama $data precision.scaling=current" --variant "fp8_delayed=+exp=fp8_llama $data" \
      2>&1 | grep -v Warning | tee "$OUT/delayed.log" ;;
  delayed_dy)
    # precision.delayed_operands=[dy]: only the output gradients scale by the history, activations by their own amax
    # (on CPU's small model it trained as current scaling where both operands delayed trailed by 1.7-3.8%): its speed
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 240 --variant "bf16=+exp=bf16_llama $data" \
      --variant "fp8=+exp=fp8_llama $data precision.scaling=current" --variant "fp8_delayed=+exp=fp8_llama $data" \
      --variant "fp8_delayed_dy=+exp=fp8_llama $data precision.delayed_operands=[dy]" \
      2>&1 | grep -v Warning | tee "$OUT/delayed_dy.log" ;;
  overshoot)
    # how often, and by how much, a record exceeds the amax that the delayed micro-batches before it scaled by, with
    # micro-batches of 16,384 tokens (on CPU's 1,024- and 4,096-token ones: activations 6-49% of records, by <= 16%
    # from step 30 on; gradients 0.4-21%, by up to 2-6x); eager, so the statistics' extra forward pass needs no recompile
    timeout 400 python3 train.py model=smollm2_135m_scratch $data data.seq_len=2048 trainer.global_batch_size=32 \
      trainer.micro_batch_size=8 trainer.max_steps=120 trainer.eval_every=-1 trainer.eval_at_start=false \
      precision=fp8_tensorwise precision.scaling=delayed precision.stats_every=10 optim.lr=2e-3 optim.warmup_steps=50 \
      model.compile=false trainer.save_every=-1 trainer.export=false run_dir=$OUT/overshoot > "$OUT/overshoot.log" 2>&1
    python3 -c "
import json
for r in map(json.loads, open('$OUT/overshoot/metrics.jsonl')):
    if 'quant/delayed/x/overshoot_share' in r:
        print(r['step'], {k[14:]: round(v, 3) for k, v in r.items() if 'overshoot' in k})" | tee "$OUT/overshoot.txt" ;;
  delayed_fsdp2)
    # kind nvidia-h200-x2: delayed scaling under FSDP2 (dp_shard=2; kept there since 2026-12-05, the weight cache is
    # not), against bf16 and current scaling under the same layout; global batch 2 x 8 micro-batches of 2 x 4096
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 400 \
      --variant "bf16=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=bf16_llama $data parallel=fsdp2 trainer.global_batch_size=32" \
      --variant "fp8=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32 precision.scaling=current" \
      --variant "fp8_delayed=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32" \
      2>&1 | grep -v Warning | tee "$OUT/delayed_fsdp2.log" ;;
  fsdp2_precision)
    # kind nvidia-h200-x2: FSDP2 with bf16 all-gathers (parallel.fsdp_param_dtype=bfloat16) and FP8 ones
    # (parallel.fsdp_fp8_all_gather), without resharding after forward, one reduce per step (all 2026-12-05, CPU-tested
    # exact) against plain FSDP2; bf16 and fp8_llama. First the CPU tests' exactness checks on the two GPUs (NCCL)
    WORKER_DEVICE=cuda PYTHONPATH=. timeout 300 torchrun --standalone --nproc_per_node=2 tests/parallel/fsdp_precision_worker.py \
      bfloat16/float32,bfloat16/bfloat16/keep,float32/float32/accumulate,fp8,fp8/compiled,fp8/bfloat16 \
      2>&1 | grep -v Warning | tee "$OUT/fsdp2_precision_checks.log"
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 400 \
      --variant "bf16=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=bf16_llama $data parallel=fsdp2 trainer.global_batch_size=32" \
      --variant "bf16_p16=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=bf16_llama $data parallel=fsdp2 trainer.global_batch_size=32 parallel.fsdp_param_dtype=bfloat16" \
      --variant "bf16_p16_keep=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=bf16_llama $data parallel=fsdp2 trainer.global_batch_size=32 parallel.fsdp_param_dtype=bfloat16 parallel.fsdp_reshard_after_forward=false" \
      --variant "fp8=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32" \
      --variant "fp8_p16=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32 parallel.fsdp_param_dtype=bfloat16" \
      --variant "fp8_gather8=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32 parallel.fsdp_fp8_all_gather=true" \
      --variant "fp8_once=nproc:2 env:CUDA_VISIBLE_DEVICES=0,1 +exp=fp8_llama $data parallel=fsdp2 trainer.global_batch_size=32 parallel.fsdp_fp8_all_gather=true parallel.fsdp_reduce_every_micro_batch=false" \
      2>&1 | grep -v Warning | tee "$OUT/fsdp2_precision.log" ;;
  offload_loss)
    # bench/memory.py with the trainer's next-token loss (was a sliced float32 cross-entropy of its own), eager
    # (offload runs Python saved-tensor hooks that compiled layers do not call): baseline, offload (all layers, and
    # large tensors of layers 0-7) and full checkpointing. Run 12-04 17:59 with F.cross_entropy of float32 logits,
    # 18:11 with the chunked loss (lowbit.objectives.base.ChunkedTokenNLL: no float32 copy of the logits); both
    # before the activation peak left out the first micro-batch's gradient buffers (docs/RESULTS.md)
    python3 bench/memory.py --configs "adamw+accum (baseline)" adamw+offload "adamw+offload(large, layers 0-7)" \
      "adamw+ckpt full" --repeat 2 --fit-configs 2>&1 | tee "$OUT/memory_offload_loss.log" ;;
  backends)
    python3 bench/attention.py --seqs 8192 32768 --kv-heads 32 8 --block-m 128 --tma on --launch 8,3 8,4 4,3 \
      --json "$OUT/attention_backends.json" 2>&1 | tee "$OUT/attention_backends.log" ;;
  layer)
    python3 bench/decoder_layer.py --tokens 8192 --recipes bf16 fp8_rowwise torchao_rowwise fp8_tensorwise \
      torchao_tensorwise fp4_vectorwise 2>&1 | tee "$OUT/decoder_layer_8k.log"
    python3 bench/decoder_layer.py --tokens 32768 --recipes bf16 fp8_rowwise torchao_rowwise 2>&1 \
      | tee "$OUT/decoder_layer_32k.log" ;;
  blocks)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/kernels/test_gemm.py 2>&1 \
      | tail -3 | tee "$OUT/blocks_gpu_tests.log"
    python3 bench/quantize.py --skip sweep,block_sweep,sides,bandwidth,linear,llama,timing --out "$OUT" 2>&1 \
      | tee "$OUT/quantize_tiles.log"
    python3 bench/block_gemm.py --shapes 8192x4096x4096 8192x4096x14336 --json "$OUT/block_gemm.json" 2>&1 \
      | tee "$OUT/block_gemm.log" ;;
  fp4gemm)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_gemm.py tests/precision/test_linear.py 2>&1 \
      | tail -3 | tee "$OUT/fp4gemm_gpu_tests.log"
    python3 bench/fp4_gemm.py --json "$OUT/fp4_gemm.json" 2>&1 | tee "$OUT/fp4_gemm.log"
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear \
      --recipes nvfp4,nvfp4+dequant,mxfp4,mxfp4+dequant --compile-lowbit nvfp4,nvfp4+dequant,mxfp4,mxfp4+dequant \
      --out "$OUT" 2>&1 | tail -40 | tee "$OUT/linear_fp4_prescale.log" ;;
  blockwise_cublas)
    # fp8_blockwise's GEMMs on cuBLASLt's block-scaled FP8 GEMM (precision.block_gemm=auto -> cublas) against lowbit's
    # Triton kernel (+rescale): GPU tests, the GEMMs alone, then one linear fwd+bwd at the three shapes
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_gemm.py tests/precision/test_linear.py 2>&1 \
      | tail -4 | tee "$OUT/blockwise_cublas_gpu_tests.log"
    python3 bench/block_gemm.py --cublas --json "$OUT/block_gemm_cublas.json" 2>&1 | tee "$OUT/block_gemm_cublas.log"
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear --budget-s 420 \
      --recipes fp8_blockwise,fp8_blockwise+rescale,fp8_rowwise --compile-lowbit fp8_blockwise,fp8_blockwise+rescale \
      --out "$OUT" 2>&1 | tail -24 | tee "$OUT/linear_blockwise_cublas.log" ;;
  e2e_blockwise)
    # the cuBLASLt block-scaled GEMM's GPU tests again, then llama_1b end to end: bf16 against precision=fp8_blockwise
    # by cuBLASLt (the default) and by lowbit's Triton kernel (block_gemm=rescale), weights cached (the fp8_llama preset)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_gemm.py tests/precision/test_linear.py -k \
      "cublas or blockwise" 2>&1 | tail -3 | tee "$OUT/e2e_blockwise_gpu_tests.log"
    python3 bench/train_throughput.py --steps ${STEPS:-6} --warmup 2 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "blockwise=+exp=fp8_llama precision=fp8_blockwise $data" \
      --variant "blockwise_triton=+exp=fp8_llama precision=fp8_blockwise precision.block_gemm=rescale $data" \
      2>&1 | tee "$OUT/e2e_blockwise.log" ;;
  blockwise_kernels)
    # fp8_blockwise end to end (cuBLASLt GEMMs) with its 1x128 quantizations fused by Inductor (quantize_kernels=auto
    # -> torch in compiled layers) against lowbit's Triton pair kernels (quantize_kernels=triton)
    python3 bench/train_throughput.py --steps ${STEPS:-6} --warmup 2 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "blockwise=+exp=fp8_llama precision=fp8_blockwise $data" \
      --variant "blockwise_triton_quant=+exp=fp8_llama precision=fp8_blockwise precision.quantize_kernels=triton $data" \
      2>&1 | tee "$OUT/e2e_blockwise_kernels.log" ;;
  fp4default)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_gemm.py tests/precision/test_linear.py 2>&1 \
      | tail -3 | tee "$OUT/fp4default_gpu_tests.log"
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear \
      --recipes nvfp4,nvfp4+prescale,mxfp4,fp4_vectorwise+dge \
      --compile-lowbit nvfp4,nvfp4+prescale,mxfp4,fp4_vectorwise+dge --out "$OUT" 2>&1 | tail -24 \
      | tee "$OUT/linear_fp4default.log" ;;
  e2e_blocks)
    # GPU tests first: the Philox stochastic rounding of the block kernel and the fused Hadamard transpose kernel
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/precision/test_linear.py 2>&1 \
      | tail -8 | tee "$OUT/blocks_gpu_tests.log"
    python3 bench/train_throughput.py --steps ${STEPS:-6} --warmup 2 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" \
      ${FP4_DGE:+--variant "fp4_dge=+exp=fp4_llama precision.occ=false $data"} 2>&1 | tee "$OUT/e2e_blocks.log" ;;
  fp4quant)
    # the FP4 block quantize kernel over tiles and warps (NVFP4 0.27 / MXFP4 0.53 of copy bandwidth by its defaults,
    # ~3.3 of 10.4 ms of one compiled nvfp4 llama_1b layer): GPU tests of the kernel first
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py 2>&1 | tail -3 \
      | tee "$OUT/fp4quant_gpu_tests.log"
    python3 bench/quantize.py --skip kernels,sweep,sides,bandwidth,linear,llama,timing --out "$OUT" 2>&1 \
      | grep -v Warning | tee "$OUT/fp4quant_sweep.log" ;;
  fp4_maxnreg)
    # the FP4 pairs' registers per thread capped (quantize_blocks_triton.PAIR_MAXNREG): NVFP4's pair takes 167 (12
    # one-warp programs per SM, `bench/ptx_mix.py --maxnreg 128`), MXFP4's 127; bit-exact first, default tiles
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py 2>&1 | tail -3 \
      | tee "$OUT/fp4_maxnreg_gpu_tests.log"
    (cd bench && python3 -c "import quantize; quantize.block_sweep({}, tiles=[], maxnregs=(None, 160, 144, 128, 112, 96))") \
      2>&1 | grep -v Warning | tee "$OUT/fp4_maxnreg.log"
    # end to end at the cap the sweep liked best for NVFP4 (MAXNREG=N; default 128) against the default
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --variant "bf16=+exp=bf16_llama $data" \
      --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "nvfp4_cap=+exp=bf16_llama precision=nvfp4 $data env:LOWBIT_FP4_PAIR_MAXNREG=${MAXNREG:-128}" \
      2>&1 | grep -v Warning | tee "$OUT/fp4_maxnreg_e2e.log" ;;
  quantize_passes)
    python3 bench/quantize_passes.py 2>&1 | grep -v Warning | tee "$OUT/quantize_passes.log" ;;
  fp4_narrow)
    # the FP4 pairs' x^T side reduces each 16 / 32-row block across rows; with one warp per program and a wide tile
    # (Triton's layout then puts a thread's rows in its own registers) that reduction needs no shuffles or shared
    # memory: the same cost that held the rowwise amax pass back (21st session). The sweep never tried < 4 warps
    python3 -c "
import sys; sys.path.insert(0, 'bench')
import quantize
quantize.block_sweep({}, tiles=[(16, 256, 1), (16, 128, 1), (32, 128, 1), (32, 64, 1), (32, 256, 1), (16, 512, 1),
                                (32, 256, 2), (16, 256, 2), (64, 128, 2), (32, 128, 2)])" 2>&1 | grep -v Warning \
      | tee "$OUT/fp4_narrow.log" ;;
  dge)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/precision/test_linear.py 2>&1 | tail -25 | tee "$OUT/dge_gpu_tests.log"
    python3 bench/linear.py --shapes 8192x4096x4096,8192x4096x14336,8192x14336x4096 --parts linear \
      --recipes fp4_vectorwise,fp4_vectorwise+dge --compile-lowbit fp4_vectorwise+dge --out "$OUT" 2>&1 | tail -12 \
      | tee "$OUT/linear_dge.log" ;;
  e2e_autotune)
    # model.compile_mode=max-autotune-no-cudagraphs: Inductor autotunes its GEMM and fused kernels (reduce-overhead,
    # CUDA graphs per layer, failed in the first backward of bf16, fp8 and nvfp4 runs, 2026-12-02: now refused).
    # Its compile took over 250 s (2026-12-02), so two calls back to back: the first compiles alone (Inductor's cache
    # stays in /tmp while the machine is warm), the second times fp8 with and without it side by side
    autotune="fp8_autotune=+exp=fp8_llama model.compile_mode=max-autotune-no-cudagraphs $data"
    if [ ! -f /tmp/autotune_compiled ]; then
      python3 bench/train_throughput.py --steps 3 --warmup 1 --timeout 540 --variant "$autotune" 2>&1 \
        | tee "$OUT/e2e_autotune_compile.log" && touch /tmp/autotune_compiled
    else
      python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 250 --variant "fp8=+exp=fp8_llama $data" \
        --variant "$autotune" 2>&1 | tee "$OUT/e2e_autotune.log"
    fi ;;
  cache_weights)
    # fp8_llama with its weights quantized once per optimizer step (precision.cache_weights=true: 8 micro-batches
    # share W_q, W^T_q) against every micro-batch, profiled (12-02: 1.17x, host-bound, 909 ms CPU per step)
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_cached=+exp=fp8_llama precision.cache_weights=true $data" 2>&1 | grep -v Warning \
      | tee "$OUT/cache_weights_e2e.log" ;;
  causal_sdpa)
    # the trainer's models run SDPA without transformers' per-forward mask building (lowbit/models/attention.py), whose
    # packed-sequence check synchronised host and GPU once per micro-batch (12-03 profile: 8 aten::is_nonzero per step,
    # fp8_llama 81-83% busy). Profiled: are the syncs gone, and what do bf16 / fp8_llama (cached weights) / nvfp4 gain
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 150 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" 2>&1 | grep -v Warning | tee "$OUT/causal_sdpa_e2e.log"
    grep -H "is_nonzero\|cudaStreamSynchronize" "$OUT"/*_top.txt | tee "$OUT/causal_sdpa_syncs.log" ;;
  lm_head)
    python3 -m pytest -q tests/precision/test_linear.py tests/precision/test_weight_cache.py 2>&1 | tail -3 \
      | tee "$OUT/lm_head_gpu_tests.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 140 \
      --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_head=+exp=fp8_llama $data precision.include=[*.layers.*,lm_head] precision.exclude=[*embed*]" \
      2>&1 | grep -v Warning | tee "$OUT/lm_head_e2e.log" ;;
  loss_e2e)
    # the next-token loss compiled with model.compile (12-03g: 7.24 -> 1.02 ms and 3.75 GiB less per micro-batch);
    # 12-03f without it: bf16 64,737, fp8_llama 79,406 (1.23x), fp4_llama cached 45,715 (0.71x)
    python3 bench/loss.py 2>&1 | grep -v Warning | tee "$OUT/loss.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 140 --profile 3 --trace \
      --profile-dir "$OUT/traces" --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp4=+exp=fp4_llama $data" 2>&1 | grep -v Warning | tee "$OUT/loss_e2e.log"
    python3 bench/trace_breakdown.py "$OUT"/traces/*_trace.json.gz --top 30 > "$OUT/loss_breakdown.md"
    rm -rf "$OUT/traces" ;;
  sync_free)
    # 12-03h (a host sync per step for the loss, one for the grad norm, and the step timer's): bf16 68,774,
    # fp8_llama 85,881 (1.25x) unprofiled
    python3 - <<'PY' 2>&1 | tee "$OUT/found_inf.log"
import torch
p = torch.nn.Parameter(torch.randn(64, 64, device="cuda")); p.grad = torch.randn_like(p)
opt = torch.optim.AdamW([p], lr=0.1, fused=True); before = p.detach().clone()
opt.found_inf = torch.ones((), device="cuda"); opt.step()
print("found_inf=1 leaves the weight:", torch.equal(before, p.detach()), "step", opt.state[p]["step"].item())
opt.found_inf = torch.zeros((), device="cuda"); opt.step()
print("found_inf=0 steps:", not torch.equal(before, p.detach()), "step", opt.state[p]["step"].item())
PY
    python3 bench/train_throughput.py --steps 8 --warmup 3 --timeout 160 \
      --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp4=+exp=fp4_llama $data" 2>&1 | grep -v Warning | tee "$OUT/sync_free_e2e.log" ;;
  ab_sync)
    abs_data="model.tokenizer=$PWD/.carry/tokenizer data=gutenberg data.sources=[/root/valid.jsonl.gz] data.val_sources=[]"
    for tree in old:.carry2/old new:.; do
      python3 "${tree#*:}/bench/train_throughput.py" --steps 8 --warmup 3 --timeout 160 \
        --variant "bf16=+exp=bf16_llama $abs_data" --variant "fp8=+exp=fp8_llama $abs_data" 2>&1 | grep -v Warning \
        | tee "$OUT/ab_sync_${tree%%:*}.log"
    done
    [ "${PROFILE:-1}" = 0 ] && exit 0
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 160 --profile 3 --profile-steps 2 --trace \
      --profile-dir "$OUT/traces" --variant "fp8=+exp=fp8_llama $data" 2>&1 | grep -v Warning | tee "$OUT/ab_sync_profile.log"
    python3 bench/trace_breakdown.py "$OUT"/traces/*_trace.json.gz --top 30 > "$OUT/ab_sync_breakdown.md"
    rm -rf "$OUT/traces" ;;
  fused_proj)
    python3 bench/fused_projections.py --tokens 8192 2>&1 | grep -v Warning | tee "$OUT/fused_projections.log" ;;
  cd_tuning)
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_cd=+exp=fp8_llama $data env:TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1" 2>&1 | grep -v Warning \
      | tee "$OUT/cd_tuning.log" ;;
  cd_both)
    # coordinate-descent tuning of Inductor's kernels in both recipes (12-03i: fp8_llama +1.2%, bf16 not run), after
    # the per-shape GEMM table (bench/gemm_shapes.py, default cuBLASLt workspace)
    python3 bench/gemm_shapes.py --tokens 8192 2>&1 | grep -v Warning | tee "$OUT/gemm_shapes.log"
    ab_env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 cd cd_both.log ;;
  pw_autotune)
    # Inductor's autotuning of its pointwise and reduction kernels only (not the GEMMs, whose autotuning did not
    # finish compiling in 560 s, 14th session): the quantizing fusions' amax reductions run at ~0.62 of a copy
    # (12-03 profile), lowbit's own amax pass at 0.75-0.81 since the 21st session
    ab_env TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE=1 pw pw_autotune.log ;;
  rowwise_kernels)
    # the rowwise pairs' amax pass is ~2x faster since the 21st session (0.63 -> 0.82-0.85 of a copy): do lowbit's
    # kernels now beat Inductor's fusions in compiled layers (fp8 rowwise end to end was 0.93x bf16 with them,
    # 1.03x with Inductor's; `quantize_kernels=auto` takes Inductor's)? fp4_llama's activations use E2M1 rowwise pairs
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 130 --variant "bf16=+exp=bf16_llama $data" \
      --variant "rowwise=+exp=bf16_llama precision=fp8_rowwise $data" \
      --variant "rowwise_triton=+exp=bf16_llama precision=fp8_rowwise precision.quantize_kernels=triton $data" \
      --variant "fp4=+exp=fp4_llama $data" \
      --variant "fp4_triton=+exp=fp4_llama precision.quantize_kernels=triton $data" 2>&1 | grep -v Warning \
      | tee "$OUT/rowwise_kernels.log" ;;
  rowwise_cached)
    # fp8 rowwise end to end was measured without the weight cache that both presets use (12-03: 1.06x against
    # tensorwise's 1.25x with it); fp4_llama's ceiling is rowwise's (per-token / per-channel scales, FP8 GEMMs):
    # rowwise cached, and fp4_llama with and without OCC, next to bf16 after the FP4 and compile GPU tests
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/precision/test_linear.py 2>&1 \
      | tail -3 | tee "$OUT/rowwise_cached_gpu_tests.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 120 --variant "bf16=+exp=bf16_llama $data" \
      --variant "rowwise_cached=+exp=bf16_llama precision=fp8_rowwise precision.cache_weights=true $data" \
      --variant "fp4=+exp=fp4_llama $data" --variant "fp4_no_occ=+exp=fp4_llama precision.occ=false $data" 2>&1 \
      | grep -v Warning | tee "$OUT/rowwise_cached.log" ;;
  gemm_shapes)
    python3 bench/gemm_shapes.py --tokens 8192 2>&1 | grep -v Warning | tee "$OUT/gemm_shapes.log"
    CUBLASLT_WORKSPACE_SIZE=65536 python3 bench/gemm_shapes.py --tokens 8192 2>&1 | grep -v Warning \
      | tee "$OUT/gemm_shapes_ws64m.log" ;;
  cache_graph)
    # 12-03 breakdown: fp8_llama's GPU idles 28.6 ms at each step's start while the host launches the weight cache's
    # refresh (112 layers x amax, quantize, copies: ~4 ms of kernels); now one CUDA graph replay
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/precision/test_weight_cache.py 2>&1 | tail -4 \
      | tee "$OUT/cache_graph_tests.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 140 --profile 3 --trace \
      --profile-dir "$OUT/traces" --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp8_eager_refresh=+exp=fp8_llama env:LOWBIT_WEIGHT_CACHE_GRAPH=0 $data" \
      --variant "fp4_cache=+exp=fp4_llama precision.cache_weights=true $data" 2>&1 | grep -v Warning \
      | tee "$OUT/cache_graph_e2e.log"
    python3 bench/trace_breakdown.py "$OUT"/traces/*_trace.json.gz --top 30 > "$OUT/cache_graph_breakdown.md"
    rm -rf "$OUT/traces" ;;
  breakdown)
    # where the e2e gap to the bars is: kernel time by kind (fp8 GEMMs, quantizing fusions, attention, ...) and where
    # the GPU idles, from one profiled step of each preset (traces in $OUT/traces, the fp8 one brought back)
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 170 --profile 3 --trace \
      --profile-dir "$OUT/traces" --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "fp4=+exp=fp4_llama $data" 2>&1 | grep -v Warning | tee "$OUT/breakdown_e2e.log"
    python3 bench/trace_breakdown.py "$OUT"/traces/*_trace.json.gz --top 45 > "$OUT/breakdown.md"
    cp "$OUT"/traces/*_top.txt "$OUT"/
    [ "$(stat -c %s "$OUT/traces/fp8_trace.json.gz")" -lt 16000000 ] && mv "$OUT/traces/fp8_trace.json.gz" "$OUT"/
    rm -rf "$OUT/traces" ;;
  microbatch)
    # fp8_llama's step is host-bound (12-03 profile: 91% busy, compiled-graph launches ~ the GPU time per layer);
    # micro-batch 4 doubles the GPU work per launch. Global batch 16 x 4096 tokens either way
    python3 bench/train_throughput.py --steps 8 --warmup 2 --timeout 150 \
      --variant "bf16=+exp=bf16_llama $data" --variant "fp8=+exp=fp8_llama $data" \
      --variant "bf16_mb4=+exp=bf16_llama trainer.micro_batch_size=4 $data" \
      --variant "fp8_mb4=+exp=fp8_llama trainer.micro_batch_size=4 $data" 2>&1 | grep -v Warning \
      | tee "$OUT/microbatch_e2e.log" ;;
  host_ops)
    # host overhead of the FP4 block recipes' compiled steps (12-02: 76-77% busy, 1.87 s of CPU per step): the Hadamard
    # kernel traced by Dynamo instead of the lowbit::hadamard_transpose custom op (196 us of CPU per call); 12-03 also
    # timed NVFP4's fp32-output GEMM by aten's mm.dtype in place of lowbit::mm_float32: less CPU profiled, the same
    # tokens/s unprofiled (42,105 vs 42,112), not kept
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/kernels/test_gemm.py \
      -k "hadamard or dequant" 2>&1 | tail -5 | tee "$OUT/host_gpu_tests.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 150 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" 2>&1 | grep -v Warning | tee "$OUT/host_e2e.log" ;;
  tma_t)
    # x^T_q of the block quantize kernels stored by TMA (LOWBIT_TMA_TRANSPOSED=1) against the pointer store: GPU tests
    # (bit for bit, both ways), each pair side by side (bench/quantize.py sides), bank conflicts, and nvfp4 / mxfp4
    # end to end both ways (12-02: 0.64x / 0.73x unprofiled with the pointer store)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/memory 2>&1 | tail -5 \
      | tee "$OUT/tma_gpu_tests.log"
    python3 bench/quantize.py --skip kernels,sweep,block_sweep,bandwidth,linear,llama,timing --out "$OUT" 2>&1 \
      | grep -v Warning | tee "$OUT/tma_quantize.log"
    NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    for v in mxfp4_pair nvfp4_pair; do
      echo "=== $v TMA" >> "$OUT/tma_ncu.log"
      LOWBIT_TMA_TRANSPOSED=1 "$NCU" --clock-control none --kernel-name regex:_quantize_blocks_kernel --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --metrics smsp__sass_inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
        python3 bench/ncu_blocks.py $v 2>&1 | grep -E "Duration|DRAM Throughput|inst_executed|bank_conflicts" >> "$OUT/tma_ncu.log"
    done
    cat "$OUT/tma_ncu.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 150 --variant "bf16=+exp=bf16_llama $data" \
      --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" \
      2>&1 | grep -v Warning | tee "$OUT/tma_e2e_pointer.log"
    LOWBIT_TMA_TRANSPOSED=1 python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 150 \
      --variant "bf16=+exp=bf16_llama $data" --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" 2>&1 | grep -v Warning | tee "$OUT/tma_e2e_tma.log" ;;
  offload_gpu)
    # the offloader follows a model moved to the GPU after memory.apply (it stayed a CPU no-op: the peak memory
    # check of test_cuda_offload_is_bit_exact_and_lowers_peak_memory failed on an H200, 2026-12-02)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/memory 2>&1 | tail -5 | tee "$OUT/offload_gpu_tests.log" ;;
  alu)
    # the FP4 block kernels with fewer integer-pipe operations (E2M1 rounding by a multiply-add, NaN-propagating
    # block amax, four noise values per Philox call): GPU tests (bit for bit), the quantize table and each pair
    # against its x side, Nsight Compute instruction counts, bf16 / nvfp4 / mxfp4 end to end (12-02: 0.60x / 0.66x)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/precision/test_linear.py 2>&1 \
      | tail -8 | tee "$OUT/alu_gpu_tests.log"
    python3 bench/quantize.py --skip kernels,sweep,block_sweep,linear,llama,timing --out "$OUT" 2>&1 \
      | grep -v Warning | tee "$OUT/alu_quantize.log"
    NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    for v in mxfp4_x mxfp4_pair nvfp4_x nvfp4_pair nvfp4_sr; do
      echo "=== $v" >> "$OUT/alu_ncu.log"
      "$NCU" --clock-control none --kernel-name regex:_quantize_blocks_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --metrics smsp__sass_inst_executed.sum,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
        python3 bench/ncu_blocks.py $v 2>&1 | grep -E "Duration|DRAM Throughput|inst_executed|pipe_|bank_conflicts|Registers Per|Achieved Occ" >> "$OUT/alu_ncu.log"
    done
    cat "$OUT/alu_ncu.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" 2>&1 | grep -v Warning | tee "$OUT/alu_e2e.log" ;;
  ncu_blocks)
    # Nsight Compute on one launch of each FP4 block quantize kernel (x side alone and the pair, 8192 x 4096):
    # DRAM throughput, occupancy, registers, warp stall reasons -- why NVFP4's x side costs 1.8 copies, not 0.75
    which ncu || ls /opt/nvidia/nsight-compute/*/ncu
    NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    for v in mxfp4_x mxfp4_pair nvfp4_x nvfp4_pair; do
      echo "=== $v"
      "$NCU" --clock-control none --kernel-name regex:_quantize_blocks_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
        python3 bench/ncu_blocks.py $v 2>&1 | grep -v "^==PROF==" | tee "$OUT/ncu_$v.txt" | grep -E \
        "Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Stall|Block Limit|Issued Ipc|Warp Cycles Per Issued" 
    done ;;
  sass_blocks)
    # the compiled FP4 block quantize kernels (x side, pair) as Triton IR, PTX and SASS, and Nsight Compute's
    # instruction mix of each launch: what the integer pipe (77% busy, 2026-12-02) spends its issue slots on
    export TRITON_CACHE_DIR=/tmp/tcache_blocks; rm -rf $TRITON_CACHE_DIR
    NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    for v in mxfp4_x mxfp4_pair nvfp4_x nvfp4_pair; do
      "$NCU" --clock-control none --kernel-name regex:_quantize_blocks_kernel --launch-skip 2 --launch-count 1 \
        --section InstructionStats --section SpeedOfLight --metrics smsp__sass_inst_executed_op_global_st.sum,smsp__sass_inst_executed_op_global_ld.sum,smsp__sass_inst_executed_op_shared_st.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed.sum,sm__sass_data_bytes_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
        python3 bench/ncu_blocks.py $v > "$OUT/ncu_inst_$v.txt" 2>&1
      grep -E "Duration|inst_executed|bank_conflicts|bytes_mem_shared|Executed Instructions " "$OUT/ncu_inst_$v.txt"
    done
    for d in $TRITON_CACHE_DIR/*/; do
      f=$(ls $d | grep -E "_quantize_blocks_kernel.cubin$" | head -1); [ -n "$f" ] || continue
      n=$(basename $d | cut -c1-8)
      cp $d/_quantize_blocks_kernel.ttgir "$OUT/blocks_$n.ttgir"; cp $d/_quantize_blocks_kernel.json "$OUT/blocks_$n.json"
      cuobjdump -sass $d/$f > "$OUT/blocks_$n.sass"; echo "$n $(grep -c '^ */\*[0-9a-f]*\*/' "$OUT/blocks_$n.sass") sass lines"
    done ;;
  nvfp4_global)
    # NVFP4's tensor scale computed inside the block kernel (was ~10 one-element PyTorch launches per operand, eager
    # inside the custom ops; the nvfp4 step was 73% busy, 2,178 ms wall against 1,599 ms of kernels, 2026-12-02).
    # GPU tests first (gain and scales bit for bit), then the quantize table and llama_1b profiled
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/precision/test_linear.py 2>&1 \
      | tail -8 | tee "$OUT/nvfp4_global_gpu_tests.log"
    python3 bench/quantize.py --skip kernels,sweep,block_sweep,linear,llama,timing --out "$OUT" 2>&1 \
      | grep -v Warning | tee "$OUT/nvfp4_global_quantize.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" 2>&1 | grep -v Warning | tee "$OUT/nvfp4_global_e2e.log" ;;
  e2e_profile)
    # step 3 of each run under torch.profiler (trainer.profile_step): is the trainer's step host-bound? nvfp4 and
    # mxfp4 both ran at ~33k tokens/s end to end although one compiled layer of mxfp4 is 15% faster (2026-12-02).
    # GPU tests first: the float8-cast rounding of the PyTorch path and the Hadamard kernel's fused amax (12-02, untimed)
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/kernels/test_quantize.py tests/precision/test_linear.py 2>&1 \
      | tail -8 | tee "$OUT/profile_gpu_tests.log"
    python3 bench/train_throughput.py --steps 6 --warmup 2 --timeout 200 --profile 3 --profile-dir "$OUT" \
      --variant "bf16=+exp=bf16_llama $data" --variant "nvfp4=+exp=bf16_llama precision=nvfp4 $data" \
      --variant "mxfp4=+exp=bf16_llama precision=mxfp4 $data" --variant "fp8=+exp=fp8_llama $data" 2>&1 \
      | tee "$OUT/e2e_profile.log" ;;
  determinism)
    args="model=smollm2_135m_scratch model.tokenizer=.carry/tokenizer data=gutenberg data.sources=[/root/valid.jsonl.gz]
      data.val_sources=[] data.seq_len=2048 precision=fp8_tensorwise trainer.max_steps=32 trainer.global_batch_size=32
      trainer.micro_batch_size=8 trainer.eval_at_start=false trainer.eval_every=-1 trainer.save_every=-1
      trainer.export=false optim.lr=2e-3 logger.backends=[jsonl]"
    # a throwaway run first fills the compile and autotune caches, then the pairs alternate, so that neither setting
    # gets the warmer machine (the ninth session's runs, in the order det det free free, got faster one by one)
    for run in warm det_a free_a det_b free_b; do
      python3 train.py $args trainer.deterministic=$([[ $run == det* ]] && echo true || echo false) \
        $([[ $run == warm ]] && echo trainer.max_steps=4) \
        run_dir=/root/determinism/$run > "$OUT/determinism_$run.log" 2>&1 || tail -5 "$OUT/determinism_$run.log"
    done
    python3 - /root/determinism <<'PY' 2>&1 | tee "$OUT/determinism.log"
import json, statistics, sys
rows = {r: [json.loads(l) for l in open(f"{sys.argv[1]}/{r}/metrics.jsonl") if '"loss"' in l]
        for r in ("det_a", "det_b", "free_a", "free_b")}
for pair in (("det_a", "det_b"), ("free_a", "free_b")):
    a, b = ([r["loss"] for r in rows[n]] for n in pair)
    first = next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print(f"{pair}: {len(a)} steps, first differing step {first}, final losses {a[-1]:.6f} / {b[-1]:.6f}")
for name, r in rows.items():
    print(name, "median tokens/s (steps 8+):", round(statistics.median(x["perf/tokens_per_s"] for x in r[7:])))
PY
    ;;
  *)
    echo "usage: bench/device_pending.sh check|e2e|e2e_micro|gw_hp|memory|memory_compiled|occ|occ_profile|occ_e2e|attention|backends|layer|blocks|fp4gemm|determinism" >&2
    exit 2 ;;
esac
