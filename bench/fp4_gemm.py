"""The NVFP4 / MXFP4 GEMM on a GPU: the three schemes for 16- and 32-element blocks, next to bf16 cuBLAS in the same
run, on operands quantized as the nvfp4 / mxfp4 recipes quantize them.

    python bench/fp4_gemm.py [--shapes 8192x4096x4096 ...] [--json FILE]

Schemes (precision.block_gemm; lowbit/kernels/gemm_triton.py, lowbit/kernels/gemm.py):
  rescale   one K tile per scale block (16 or 32 deep) and the accumulator rescaled between blocks
  prescale  the nvfp4 / mxfp4 default: each operand tile multiplied by its block scales in bf16 (exact with NVFP4's
            tensor scale G as gain), then a bf16 MMA over 64-128-deep K tiles holding several blocks, no rescale;
            the default tile, then a sweep
  dequant   each operand dequantized exactly to bf16 in one pass (Triton), then cuBLAS's bf16 GEMM (fp32 output and
            1 / (G_a G_b) for NVFP4, bf16 output for MXFP4); timed whole and as its dequantize pass alone
Every variant is first checked against the float64 product of the dequantized operands (256 rows), then timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_gemm  # noqa: E402  (bench/: its driver and timer)
from block_gemm import ms_of  # noqa: E402
from lowbit.kernels.gemm import block_scaled_mm_dequant  # noqa: E402
from lowbit.kernels.gemm_triton import _pick_config, block_scaled_mm_triton, dequantize_exact_triton  # noqa: E402
from lowbit.precision.formats import E2M1  # noqa: E402
from lowbit.precision.scaling import Quantizer, nvfp4_global_inverse  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the prescaled scheme
# (the tenth session's sweep: 128 x 128 x 64, 8 warps, 3 stages, by descriptors, was the fastest of twelve at all
# three shapes; docs/RESULTS.md)
PRESCALE_TILES = [(128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3)]


def quantized(x: torch.Tensor, rule: str):
    """(values as E4M3, fp32 block scales, the prescaled scheme's gain) of x, as the recipe quantizes it."""
    from lowbit.kernels.quantize import quantize
    quantizer = Quantizer(E2M1, 1, 16 if rule == "nvfp4" else 32, rule)
    q = quantize(x, quantizer)
    gain = (nvfp4_global_inverse(x.abs().amax().float(), E2M1) if rule == "nvfp4"
            else torch.ones((), device=x.device))
    return q.data, q.scale, gain


def run_shape(M: int, K: int, N: int) -> dict:
    a, b, tflops, row = block_gemm.bf16_operands(M, K, N)
    flops = 2 * M * N * K
    print(f"{row['shape']}: bf16 cuBLAS {row['bf16_mm']} TFLOP/s", flush=True)
    for rule, block_k in (("nvfp4", 16), ("pow2", 32)):
        name = "nvfp4" if rule == "nvfp4" else "mxfp4"
        a_q, a_s, a_g = quantized(a, rule)
        b_q, b_s, b_g = quantized(b, rule)
        rows = 256
        ref = ((a_q[:rows].double() * a_s[:rows].double().repeat_interleave(block_k, 1))
               @ (b_q.double() * b_s.double().repeat_interleave(block_k, 1)).t()).cpu()
        kw = dict(block_k=block_k, out_dtype=torch.bfloat16)
        unit = (None, None) if rule == "pow2" else (a_g, b_g)      # as lowbit.precision.gemm passes MXFP4's gains

        def triton_scheme(cfg):
            return lambda a_q, a_s, b_q, b_s, out_dtype: block_scaled_mm_triton(
                a_q, a_s, b_q, b_s, block_k=block_k, out_dtype=out_dtype, config=cfg, gains=(a_g, b_g))
        variants = {"rescale": triton_scheme(dict(_pick_config(M, N, block_k))),
                    "prescale (default tile)": triton_scheme(dict(_pick_config(M, N, block_k, prescale=True)))}
        for bm, bn, bk, warps, stages in PRESCALE_TILES:
            variants[f"prescale bm{bm} bn{bn} bk{bk} w{warps} s{stages} tma"] = triton_scheme(dict(
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                PRESCALE=True, DOT_BF16=True, TMA=True))
        variants["dequant + cuBLAS bf16"] = lambda a_q, a_s, b_q, b_s, out_dtype: block_scaled_mm_dequant(
            a_q, a_s, b_q, b_s, block_k=block_k, gains=unit, out_dtype=out_dtype)
        results = {}
        for key, gemm in variants.items():
            try:
                out = gemm(a_q[:rows], a_s[:rows], b_q, b_s, torch.float32)
                err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
                ms = ms_of(lambda: gemm(a_q, a_s, b_q, b_s, torch.bfloat16))
                results[key] = dict(TFLOPs=tflops(ms), vs_bf16=round(flops / ms / 1e9 / row["bf16_mm"], 3),
                                    rel_err=float(f"{err:.2e}"))
            except Exception as error:     # a tile that does not compile (shared memory, registers): report it
                results[key] = f"{type(error).__name__}: {str(error)[:160]}"
            print(f"{row['shape']} {name} {key:<44} {results[key]}", flush=True)
        # the dequant scheme's own pass: both operands, 1 byte read (+ scales) and 2 written per element
        ms = ms_of(lambda: (dequantize_exact_triton(a_q, a_s, block_k, a_g),
                            dequantize_exact_triton(b_q, b_s, block_k, b_g)))
        moved = 3 * (M + N) * K + 4 * (M + N) * K // block_k
        results["dequantize pass (both operands)"] = dict(ms=round(ms, 4), GB_s=round(moved / ms / 1e6))
        print(f"{row['shape']} {name} {'dequantize pass (both operands)':<44} "
              f"{results['dequantize pass (both operands)']}", flush=True)
        row[name] = results
    return row


if __name__ == "__main__":
    block_gemm.main(run_shape, __doc__)
