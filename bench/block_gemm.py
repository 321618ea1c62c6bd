"""fp8_blockwise's GEMM (DeepSeek-V3: 1x128 activation tiles, 128x128 weight blocks) on a GPU: lowbit's Triton
block-scaled GEMM over accumulation schemes, operand loads and tiles, next to bf16 cuBLAS and `torch._scaled_mm`
rowwise (the FP8 rate without block scales) in the same run.

    python bench/block_gemm.py [--shapes 8192x4096x4096 ...] [--json FILE] [--cublas]

--cublas: cuBLASLt's block-scaled FP8 GEMM (torch._scaled_mm with 1x128 / 128x128 float32 scales, CUDA >= 12.9)
against the Triton kernel's default and bf16 cuBLAS, for the forward / dgrad layout (1x128 x 128x128) and the weight
gradient's (1x128 x 1x128), each checked against the float64 product first.

Scheme (lowbit/kernels/gemm_triton.py): partial = a fresh FP32 tile per K block promoted with the scales on CUDA
cores; tma = operand tiles by tensor descriptors instead of pointer loads. Every variant is first compared with the
default kernel (bit for bit: the sums are the same) and with the float64 product of the dequantized operands.
(A third scheme, the promotion of K block k-1 placed after block k's MMA is issued, ran at 47-375 TFLOP/s on an
H200 on 2026-12-01 against 541-662 for the partial tile: Triton then waits on both MMAs; it was removed.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels.gemm import block_scaled_mm_cublas, block_scaled_mm_reference, scaled_mm  # noqa: E402
from lowbit.kernels.gemm_triton import _pick_config, block_scaled_mm_triton  # noqa: E402

TILES = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 256, 8, 3), (128, 64, 4, 4)]
SCHEMES = {"partial": {"TMA": False}, "partial_tma": {"TMA": True}}


def ms_of(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=30, rep=150, return_mode="median")


def bf16_operands(M: int, K: int, N: int):
    """Seeded bf16 operands a [M, K], b [N, K], ms -> TFLOP/s at this shape, and the result row with bf16 cuBLAS."""
    torch.manual_seed(0)
    flops = 2 * M * N * K
    tflops = lambda ms: round(flops / ms / 1e9, 1)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    return a, b, tflops, {"shape": f"{M}x{K}x{N}", "bf16_mm": tflops(ms_of(lambda: a @ b.t()))}


def run_shape(M: int, K: int, N: int) -> dict:
    a, b, tflops, row = bf16_operands(M, K, N)
    a_q, b_q = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    a_s = torch.rand(M, K // 128, device="cuda") + 0.5
    b_s = torch.rand(-(-N // 128), K // 128, device="cuda") + 0.5
    sa, sb = torch.rand(M, 1, device="cuda") + 0.5, torch.rand(N, 1, device="cuda") + 0.5
    row["scaled_mm_rowwise"] = tflops(ms_of(lambda: scaled_mm(a_q, b_q, sa, sb)))
    kw = dict(block_k=128, b_rows=128, out_dtype=torch.float32)
    rows_checked = 256
    ref = block_scaled_mm_reference(a_q[:rows_checked].cpu(), a_s[:rows_checked].cpu(), b_q.cpu(), b_s.cpu(),
                                    **kw).double()
    default = block_scaled_mm_triton(a_q, a_s, b_q, b_s, **kw)
    row["default_config"] = {k: v for k, v in _pick_config(M, N, 128).items()}
    variants = {}
    for bm, bn, warps, stages in TILES:
        for scheme, extra in SCHEMES.items():
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=warps, num_stages=stages, **extra)
            key = f"bm{bm} bn{bn} w{warps} s{stages} {scheme}"
            try:
                out = block_scaled_mm_triton(a_q, a_s, b_q, b_s, config=cfg, **kw)
                same = torch.equal(out, default)
                err = ((out[:rows_checked].double().cpu() - ref).norm() / ref.norm()).item()
                value = tflops(ms_of(lambda: block_scaled_mm_triton(a_q, a_s, b_q, b_s, config=cfg, **kw)))
                variants[key] = dict(TFLOPs=value, equals_default=same, rel_err=float(f"{err:.2e}"))
            except Exception as error:     # a tile that does not compile (shared memory, registers): report it
                variants[key] = f"{type(error).__name__}: {str(error)[:160]}"
            print(f"{row['shape']} {key:<36} {variants[key]}", flush=True)
    row["variants"] = variants
    print(f"{row['shape']}: bf16 cuBLAS {row['bf16_mm']} TFLOP/s, _scaled_mm rowwise {row['scaled_mm_rowwise']}",
          flush=True)
    return row


def run_cublas(M: int, K: int, N: int) -> dict:
    """cuBLASLt's block-scaled GEMM against lowbit's Triton kernel, both layouts of fp8_blockwise's GEMMs."""
    a, b, tflops, row = bf16_operands(M, K, N)
    a_q, b_q = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    a_s = torch.rand(M, K // 128, device="cuda") + 0.5
    layouts = {"1x128 x 128x128 (fwd, dgrad)": (128, torch.rand(-(-N // 128), K // 128, device="cuda") + 0.5),
               "1x128 x 1x128 (wgrad)": (1, torch.rand(N, K // 128, device="cuda") + 0.5)}
    rows_checked = 256
    for name, (b_rows, b_s) in layouts.items():
        kw = dict(block_k=128, b_rows=b_rows)
        ref = block_scaled_mm_reference(a_q[:rows_checked].cpu(), a_s[:rows_checked].cpu(), b_q.cpu(), b_s.cpu(), **kw,
                                        out_dtype=torch.float32).double()
        err = lambda out: float(f"{((out[:rows_checked].double().cpu() - ref).norm() / ref.norm()).item():.2e}")
        entry = {}
        triton = block_scaled_mm_triton(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, **kw)
        entry["triton"] = dict(TFLOPs=tflops(ms_of(lambda: block_scaled_mm_triton(
            a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, **kw))), rel_err=err(triton))
        for out_dtype in (torch.bfloat16, torch.float32):
            key = f"cublas {str(out_dtype).split('.')[-1]}"
            try:
                fn = lambda: block_scaled_mm_cublas(a_q, a_s, b_q, b_s, a_rows=1, b_rows=b_rows, out_dtype=out_dtype)
                out = fn()
                entry[key] = dict(TFLOPs=tflops(ms_of(fn)), rel_err=err(out),
                                  vs_triton=float(f"{((out.float() - triton.float()).norm() / triton.float().norm()).item():.2e}"))
            except Exception as error:      # an older cuBLAS or torch: report it
                entry[key] = f"{type(error).__name__}: {str(error)[:300]}"
        row[name] = entry
        print(f"{row['shape']} {name}: bf16 cuBLAS {row['bf16_mm']} TFLOP/s; {entry}", flush=True)
    return row


def main(run=None, doc: str = __doc__) -> None:
    """Time `run(M, K, N) -> dict` (default: run_shape) at each --shapes entry; also bench/fp4_gemm.py's driver."""
    run = run or run_shape
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8192x4096x4096", "8192x4096x14336", "8192x14336x4096"])
    parser.add_argument("--json", default="")
    parser.add_argument("--cublas", action="store_true", help="cuBLASLt's block-scaled GEMM against the Triton kernel")
    args = parser.parse_args()
    if args.cublas:
        run = run_cublas
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for shape in args.shapes:
        M, K, N = map(int, shape.split("x"))
        results["shapes"].append(run(M, K, N))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
