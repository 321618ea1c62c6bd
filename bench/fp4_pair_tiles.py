"""The MXFP4 pair (1 x 32, x and x^T) of the Triton block kernel at several tiles, register caps and both E2M1
roundings (float32 steps, f16x2: quantize_blocks_triton.TRITON_PACKED), one run: each variant bit for bit against
the PyTorch reference first, then timed by CUDA graph replays; ratio as bench/quantize_fp4.py (4 bytes per element
over the device copy's bytes per second in the same run).

    python bench/fp4_pair_tiles.py [--shapes 8192x4096 8192x14336] [--out DIR]   # writes fp4_pair_tiles.json
    python bench/fp4_pair_tiles.py --narrow ...     # x_q stored 16 / 8 bytes per thread (NARROW_PAIR_STORE), MXFP4
                                                    # and NVFP4 at the default tile; writes fp4_pair_narrow.json
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
    parser.add_argument("--narrow", action="store_true",
                        help="instead: MXFP4 (both roundings) and NVFP4 (with and without its amax pass) at the "
                             "default tile, x_q stored 16 then 8 bytes per thread (NARROW_PAIR_STORE), twice")
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
        if args.narrow:
            rows += narrow_store(x, copy_gbs)
            continue
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
    (Path(args.out) / ("fp4_pair_narrow.json" if args.narrow else "fp4_pair_tiles.json")).write_text(
        json.dumps(rows, indent=1))


def narrow_store(x: torch.Tensor, copy_gbs: float) -> list[dict]:
    """The default tile with x_q stored 16 and 8 bytes per thread, alternating, twice each."""
    mx, nv = Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E2M1, 1, 16, "nvfp4")
    amax = x.abs().amax().float().reshape(1)
    rows = []
    for name, q, packed, given in (("MXFP4 float32", mx, False, None), ("MXFP4 f16x2", mx, True, None),
                                   ("NVFP4", nv, False, None), ("NVFP4 max|x| given", nv, False, amax)):
        want = quantize_reference(x, q), quantize_reference(x.t(), q)
        for narrow in (False, True, False, True):
            fn = (lambda n: lambda: triton_pair(x, q, packed=packed, amax=given, narrow=n))(narrow)
            exact = same(fn(), want)
            ms = graph_ms(fn)
            ratio = 4 * x.numel() / ms / 1e6 / copy_gbs
            rows.append(dict(shape=tuple(x.shape), variant=name, narrow=narrow, ms=ms, ratio=ratio, exact=exact))
            print(f"{str(tuple(x.shape)):>14} {name:<20} {'8-byte' if narrow else '16-byte'} x_q stores "
                  f"{ms:7.4f} ms  ratio {ratio:4.2f}  exact {exact}", flush=True)
    return rows


if __name__ == "__main__":
    main()
