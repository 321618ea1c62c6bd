"""OCC's compensation on the GPU, side by side (issue 3): what the outliers cost next to the GEMM they correct.

For M tokens and each (K, N), on two random activations: `channels` (x ~ N(0,1) with every 64th channel scaled
20x, the outlier channels of a trained LLM) and `gaussian` (x ~ N(0,1): outliers scattered, as at initialisation):
the bf16 GEMM x W^T, the clamp (threshold, then the residual: dense outlier columns + compressed rows; by lowbit's
two Triton passes, lowbit/kernels/occ_clamp.py, and by the PyTorch path), and the
two compensation products, forward R W_hat^T and weight-gradient R^T dy, by lowbit's path (GEMMs for the dense
columns, the Triton segment kernel for the rest) and by cuSPARSE on a COO residual (`torch.sparse.mm`), plus the
segment kernel's PyTorch path (index_add) for the forward. Then one linear layer fwd+bwd: bf16, fp4 vectorwise+DGE,
and with OCC by each product (sparse: the above; dense: the residual as a full matrix, GEMMs; fp8: that matrix rounded
to E4M3 per row, FP8 GEMMs), eager, and with
--compile also compiled as the trainer compiles (a sparse-OCC layer runs eagerly there). CUDA-event medians.

    python bench/occ.py --tokens 8192 --shapes 4096,4096 4096,14336 14336,4096 --patterns channels gaussian --compile
    python bench/occ.py --shapes 4096,4096 --patterns gaussian --compile --profile 12   (and the top 12 CUDA kernels of
        each layer's fwd+bwd by device time, to see where fp4+DGE and OCC spend it)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timed  # noqa: E402  (bench/attention.py: CUDA-event median)
from lowbit.kernels.segment_matmul import segment_matmul_add_  # noqa: E402
from lowbit.precision.methods import (DENSE_COLUMN_SHARE, clamp_outliers, occ_clamp_torch,  # noqa: E402
                                     outlier_threshold)


def bench(tokens: int, k: int, n: int, quantile: float, pattern: str, compile_layers: bool, profile: int = 0) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda")
    if pattern == "channels":
        x[:, ::64] *= 20.0
    x = x.to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    clamped, outliers = clamp_outliers(x, quantile)
    w_t = w.float().t().contiguous()
    coo = outliers.to_dense(k).to_sparse()
    y = torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16)
    dense = outliers.dense_cols.numel()
    rows = dict(tokens=tokens, k=k, n=n, sparse=outliers.vals.numel(), dense=dense)
    rows["gemm_bf16_ms"] = timed(lambda: x @ w.t())
    rows["threshold_ms"] = timed(lambda: outlier_threshold(x, quantile))
    rows["clamp_ms"] = timed(lambda: clamp_outliers(x, quantile))
    threshold = outlier_threshold(x, quantile).to(x.dtype)
    rows["clamp_torch_ms"] = timed(lambda: occ_clamp_torch(x, threshold, DENSE_COLUMN_SHARE))
    rows["clamp_dense_ms"] = timed(lambda: clamp_outliers(x, quantile, product="dense"))
    rows["fwd_triton_ms"] = timed(lambda: outliers.matmul_add(y, w_t))
    rows["fwd_torch_ms"] = timed(lambda: segment_matmul_add_(y, outliers.row_ptr, outliers.cols, outliers.vals, w_t,
                                                             use_triton="never"))
    rows["fwd_coo_ms"] = timed(lambda: torch.sparse.mm(coo, w_t))
    rows["wgrad_triton_ms"] = timed(lambda: outliers.t_matmul(dy, k))
    rows["wgrad_coo_ms"] = timed(lambda: torch.sparse.mm(coo.t(), dy.float()))
    x.requires_grad_(True)
    for name, layer in layers(k, n, quantile).items():
        rows[f"layer_{name}_ms"] = timed(lambda: torch.autograd.grad(layer(x), (x, layer.weight), dy))
        if compile_layers and name != "fp4_occ_sparse":
            torch._dynamo.reset()
            compiled = torch.compile(layer)
            rows[f"layer_{name}_compiled_ms"] = timed(lambda: torch.autograd.grad(compiled(x), (x, layer.weight), dy))
            if profile:
                profile_kernels(f"{pattern} {k}x{n} {name} compiled",
                                lambda: torch.autograd.grad(compiled(x), (x, layer.weight), dy), profile)
        elif profile:
            profile_kernels(f"{pattern} {k}x{n} {name} eager",
                            lambda: torch.autograd.grad(layer(x), (x, layer.weight), dy), profile)
    return rows


def profile_kernels(title: str, step, top: int, iters: int = 5) -> dict:
    """The `top` CUDA kernels of `step` by total device time over `iters` calls (after a warm-up call), printed as
    a table with the launch count and the ms per step; returned as {"total_ms", "top": [(ms, count, name)]}."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"),
                     key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) / iters / 1e3
    print(f"\n{title}: {total:.3f} ms of kernels per step", flush=True)
    rows = [(e.device_time_total / iters / 1e3, e.count // iters, e.key[:110]) for e in kernels[:top]]
    for ms, count, name in rows:
        print(f"  {ms:8.3f} ms  {count:3d}x  {name}", flush=True)
    return {"total_ms": total, "top": rows}


def layers(k: int, n: int, quantile: float) -> dict:
    """One linear layer five ways, fwd+bwd timed on the same x: bf16, fp4 vectorwise+DGE, and with OCC (sparse, dense
    and FP8 products)."""
    from lowbit.config import PrecisionConfig
    from lowbit.precision.linear import QuantLinear
    from lowbit.precision.recipes import build_recipe
    torch.manual_seed(1)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp4 = {name: QuantLinear.from_linear(linear, build_recipe(PrecisionConfig(
        recipe="fp4_vectorwise", dge=True, occ=occ, occ_quantile=quantile, occ_product=product)))
        for name, occ, product in (("fp4", False, "dense"), ("fp4_occ_sparse", True, "sparse"),
                                   ("fp4_occ_dense", True, "dense"), ("fp4_occ_fp8", True, "fp8"))}
    return {"bf16": linear, **fp4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shapes", nargs="+", default=["4096,4096", "4096,14336", "14336,4096"])
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--patterns", nargs="+", default=["channels", "gaussian"], choices=["channels", "gaussian"])
    parser.add_argument("--compile", action="store_true", help="also time the layers under torch.compile")
    parser.add_argument("--profile", type=int, default=0, help="print each layer's top N CUDA kernels (0: off)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, quantile {args.quantile}", flush=True)
    print("| x | M | K | N | sparse outliers | dense columns | bf16 GEMM ms | threshold / clamp (Triton) / clamp (PyTorch) "
          "/ clamp (dense) ms | fwd lowbit / torch sparse / COO ms | wgrad lowbit / COO ms | layer fwd+bwd eager: bf16 / "
          "fp4+DGE / +OCC sparse / +OCC dense / +OCC fp8 ms | compiled: bf16 / fp4+DGE / +OCC dense / +OCC fp8 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pattern, shape in itertools.product(args.patterns, args.shapes):
        k, n = (int(v) for v in shape.split(","))
        r = bench(args.tokens, k, n, args.quantile, pattern, args.compile, args.profile)
        compiled = " / ".join(f"{r.get(f'layer_{name}_compiled_ms', float('nan')):.3f}"
                              for name in ("bf16", "fp4", "fp4_occ_dense", "fp4_occ_fp8"))
        print(f"| {pattern} | {r['tokens']} | {k} | {n} | {r['sparse']} | {r['dense']} | {r['gemm_bf16_ms']:.3f} | "
              f"{r['threshold_ms']:.3f} / {r['clamp_ms']:.3f} / {r['clamp_torch_ms']:.3f} / {r['clamp_dense_ms']:.3f} | "
              f"{r['fwd_triton_ms']:.3f} / {r['fwd_torch_ms']:.3f} / {r['fwd_coo_ms']:.3f} | "
              f"{r['wgrad_triton_ms']:.3f} / {r['wgrad_coo_ms']:.3f} | {r['layer_bf16_ms']:.3f} / "
              f"{r['layer_fp4_ms']:.3f} / {r['layer_fp4_occ_sparse_ms']:.3f} / {r['layer_fp4_occ_dense_ms']:.3f} / "
              f"{r['layer_fp4_occ_fp8_ms']:.3f} | "
              f"{compiled} |", flush=True)


if __name__ == "__main__":
    main()
