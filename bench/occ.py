"""OCC's compensation on the GPU, side by side (issue 3): what the outliers cost next to the GEMM they correct.

For M tokens and each (K, N), on a random activation with heavy-tailed channels (x ~ N(0,1) with every 64th
channel scaled 20x): the bf16 GEMM x W^T, the clamp (threshold + residual in compressed rows), and the two
compensation products, forward R W_hat^T and weight-gradient R^T dy, each by lowbit's Triton segment kernel,
by its PyTorch path (index_add) and by cuSPARSE on the old COO residual (`torch.sparse.mm`). CUDA-event medians.

    python bench/occ.py --tokens 8192 --shapes 4096,4096 4096,14336 14336,4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timed  # noqa: E402  (bench/attention.py: CUDA-event median)
from lowbit.kernels.segment_matmul import segment_matmul_add_  # noqa: E402
from lowbit.precision.methods import clamp_outliers  # noqa: E402


def bench(tokens: int, k: int, n: int, quantile: float) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda")
    x[:, ::64] *= 20.0
    x = x.to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    clamped, outliers = clamp_outliers(x, quantile)
    w_t = w.float().t().contiguous()
    coo = outliers.to_dense().to_sparse()
    y = torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16)
    rows = dict(tokens=tokens, k=k, n=n, outliers=outliers.vals.numel())
    rows["gemm_bf16_ms"] = timed(lambda: x @ w.t())
    rows["clamp_ms"] = timed(lambda: clamp_outliers(x, quantile))
    for path in ("always", "never"):
        name = "triton" if path == "always" else "torch"
        rows[f"fwd_{name}_ms"] = timed(lambda: segment_matmul_add_(y, outliers.row_ptr, outliers.cols, outliers.vals,
                                                                  w_t, use_triton=path))
    rows["fwd_coo_ms"] = timed(lambda: torch.sparse.mm(coo, w_t))
    rows["wgrad_triton_ms"] = timed(lambda: outliers.t_matmul(dy))
    rows["wgrad_coo_ms"] = timed(lambda: torch.sparse.mm(coo.t(), dy.float()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shapes", nargs="+", default=["4096,4096", "4096,14336", "14336,4096"])
    parser.add_argument("--quantile", type=float, default=0.99)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print("| M | K | N | outliers | bf16 GEMM ms | clamp ms | fwd Triton / torch / COO ms | wgrad Triton / COO ms |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split(","))
        r = bench(args.tokens, k, n, args.quantile)
        print(f"| {r['tokens']} | {k} | {n} | {r['outliers']} | {r['gemm_bf16_ms']:.3f} | {r['clamp_ms']:.3f} | "
              f"{r['fwd_triton_ms']:.3f} / {r['fwd_torch_ms']:.3f} / {r['fwd_coo_ms']:.3f} | "
              f"{r['wgrad_triton_ms']:.3f} / {r['wgrad_coo_ms']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
