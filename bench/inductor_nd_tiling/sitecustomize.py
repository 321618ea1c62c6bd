"""Put this folder first on a training run's PYTHONPATH to compile its layers with Inductor's n-d tiling
(`torch._inductor.config.triton.prefer_nd_tiling`, which has no environment variable): a bench/train_throughput.py
variant takes it as the override `env:PYTHONPATH=$PWD/bench/inductor_nd_tiling:$PYTHONPATH` (docs/RESULTS.md,
twenty-fifth session: no gain for bf16 or fp8_llama on an H200)."""
import torch._inductor.config as inductor_config

inductor_config.triton.prefer_nd_tiling = True
