"""The MXFP4 pair (1 x 32, x and x^T) of the Triton block kernel at several tiles, register caps and both E2M1
roundings (float32 steps, f16x2: quantize_blocks_triton.TRITON_PACKED), one run: each variant bit for bit against
the PyTorch reference first, then timed by CUDA graph replays; ratio as bench/quantize_fp4.py (4 bytes per element
over the device copy's bytes per second in the same run).

    python bench/fp4_pair_tiles.py [--shapes 8192x4096 8192x14336] [--out DIR]   # writes fp4_pair_tiles.json
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

TILES = [None, (32, 128, 1), (32, 128, 4), (64, 128, 2), (64, 128, 4), (32, 256, 2), (32, 64, 1), (32, 64, 2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["8192x4096", "8192x14336"])
    parser.add_argument("--maxnreg", type=int, nargs="*", default=[96])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    q = Quantizer(E2M1, 1, 32, "pow2")
    rows = []
    torch.manual_seed(0)
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x[3, 5:9] *= 80.0
        out = torch.empty_like(x)
        copy_gbs = 4 * x.numel() / graph_ms(lambda: out.copy_(x)) / 1e6
        want = quantize_reference(x, q), quantize_reference(x.t(), q)
        for tile in TILES:
            for maxnreg in [None, *args.maxnreg]:
                for packed in (False, True):
                    fn = (lambda t, m, p: lambda: triton_pair(x, q, packed=p, maxnreg=m, tile=t))(tile, maxnreg, packed)
                    try:
                        exact = same(fn(), want)
                        ms = graph_ms(fn)
                    except Exception as error:
                        print(f"{shape} {tile} {maxnreg} {packed}: {type(error).__name__}: {str(error)[:200]}")
                        continue
                    ratio = 4 * x.numel() / ms / 1e6 / copy_gbs
                    rows.append(dict(shape=shape, tile=tile, maxnreg=maxnreg, packed=packed, ms=ms, ratio=ratio,
                                     exact=exact))
                    print(f"{str(shape):>14} tile {str(tile or 'default'):<14} maxnreg {str(maxnreg):<5} "
                          f"{'f16x2  ' if packed else 'float32'} {ms:7.4f} ms  ratio {ratio:4.2f}  exact {exact}",
                          flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp4_pair_tiles.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
