"""Every GEMM of one llama_1b decoder layer at M tokens, FP8 tensorwise (lowbit's `scaled_mm`, as `+exp=fp8_llama`
runs them: bf16 output forward and dgrad, float32 output wgrad) next to bf16 `torch.matmul`, with TFLOP/s and the share
of the device's dense peak for each: which shapes keep the FP8 GEMMs of a training step at 68% of peak (H200,
2026-12-03) while bf16's reach 82%.

    python bench/gemm_shapes.py --tokens 8192
    CUBLASLT_WORKSPACE_SIZE=65536 python bench/gemm_shapes.py     # cuBLASLt's workspace in KiB (more split-K choices)

On a CPU it runs the same GEMMs through the float32 reference at --tokens 64 (a check of the script, not a timing).
"""
from __future__ import annotations

import argparse
import time

import torch

# (name, K, N) of the layer's linears: y[M, N] = x[M, K] W[N, K]^T; llama_1b: hidden 2048, 8 KV heads of 64, 8192 MLP
LINEARS = (("q", 2048, 2048), ("k", 2048, 512), ("v", 2048, 512), ("o", 2048, 2048), ("gate", 2048, 8192),
           ("up", 2048, 8192), ("down", 8192, 2048))


def bench(fn, device: str) -> float:
    """Median ms of fn."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="M (8192 on CUDA, 64 on CPU)")
    args = parser.parse_args()
    from lowbit.kernels.gemm import scaled_mm
    from lowbit.models.flops import peak_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or (8192 if device == "cuda" else 64)
    peaks = {kind: peak_flops(torch.device(device), kind) for kind in ("bf16", "fp8")}
    e4m3 = torch.float8_e4m3fn
    one = torch.ones((), device=device)
    rows, totals = [], {"bf16": 0.0, "fp8": 0.0}
    flops_total = 0.0
    for name, k, n in LINEARS:
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        xq, wq, dyq = x.to(e4m3), w.to(e4m3), dy.to(e4m3)
        wtq, dytq, xtq = w.t().contiguous().to(e4m3), dy.t().contiguous().to(e4m3), x.t().contiguous().to(e4m3)
        gemms = {   # (bf16 GEMM, FP8 GEMM) of the same product
            "fwd": (lambda: x @ w.t(), lambda: scaled_mm(xq, wq, one, one, torch.bfloat16)),
            "dgrad": (lambda: dy @ w, lambda: scaled_mm(dyq, wtq, one, one, torch.bfloat16)),
            "wgrad": (lambda: dy.t() @ x, lambda: scaled_mm(dytq, xtq, one, one, torch.float32)),
        }
        flops = 2.0 * tokens * k * n
        for gemm, (plain, fp8) in gemms.items():
            ms = {"bf16": bench(plain, device), "fp8": bench(fp8, device)}
            for kind in ms:
                totals[kind] += ms[kind]
            flops_total += flops
            rows.append((f"{name} {gemm}", ms, flops))
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, M = {tokens}\n")
    print("| GEMM | bf16 ms | TFLOP/s | of peak | fp8 ms | TFLOP/s | of peak | fp8 speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    share = lambda tflops, kind: f"{tflops * 1e12 / peaks[kind]:.0%}" if peaks[kind] else "-"
    for label, ms, flops in rows + [("all 21", totals, flops_total)]:
        t = {kind: flops / (ms[kind] * 1e-3) / 1e12 for kind in ms}
        print(f"| {label} | {ms['bf16']:.3f} | {t['bf16']:.0f} | {share(t['bf16'], 'bf16')} | {ms['fp8']:.3f} | "
              f"{t['fp8']:.0f} | {share(t['fp8'], 'fp8')} | {ms['bf16'] / ms['fp8']:.2f}x |")


if __name__ == "__main__":
    main()
