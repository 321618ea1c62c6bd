"""The FP4 block pairs (x and x^T, one Triton launch) with each program first asking L2 for the tile of the program
`ahead` launches later (quantize_blocks_triton.PAIR_L2_AHEAD; 0: none), one run: every variant bit for bit against
the PyTorch reference first, then timed by CUDA graph replays; ratio as bench/quantize_fp4.py (4 bytes per element
over the device copy's bytes per second in the same run). Nsight Compute put the MXFP4 pair on global-load latency
at 25% occupancy (docs/RESULTS.md, thirty-eighth session): a prefetch into L2 holds no registers.

    python bench/fp4_pair_l2.py [--shapes 8192x4096 8192x14336] [--ahead 0 264 1056 ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_fp4 import graph_ms, same, triton_pair  # noqa: E402

from lowbit.precision.formats import E2M1  # noqa: E402
from lowbit.precision.scaling import Quantizer, quantize_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["8192x4096", "8192x14336"])
    parser.add_argument("--ahead", type=int, nargs="+", default=[0, 132, 528, 1056, 2112, 4224, 0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    mx, nv = Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E2M1, 1, 16, "nvfp4")
    rows = []
    torch.manual_seed(0)
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x[3, 5:9] *= 80.0
        out = torch.empty_like(x)
        copy_gbs = 4 * x.numel() / graph_ms(lambda: out.copy_(x)) / 1e6
        amax = x.abs().amax().float().reshape(1)
        variants = {"MXFP4 float32": (mx, False, None), "MXFP4 f16x2": (mx, True, None),
                    "NVFP4": (nv, False, None), "NVFP4 max|x| given": (nv, False, amax)}
        for name, (q, packed, given) in variants.items():
            want = quantize_reference(x, q), quantize_reference(x.t(), q)
            for ahead in args.ahead:
                fn = (lambda a: lambda: triton_pair(x, q, packed=packed, amax=given, l2_ahead=a))(ahead)
                exact = same(fn(), want)
                ms = graph_ms(fn)
                ratio = 4 * x.numel() / ms / 1e6 / copy_gbs
                rows.append(dict(shape=shape, variant=name, ahead=ahead, ms=ms, ratio=ratio, exact=exact,
                                 copy_gbs=copy_gbs))
                print(f"{str(shape):>14} {name:<20} ahead {ahead:>5}  {ms:7.4f} ms  ratio {ratio:4.2f}  exact {exact}",
                      flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp4_pair_l2.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
