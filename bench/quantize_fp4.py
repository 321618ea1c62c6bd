"""FP4 block pairs (NVFP4 1 x 16 with its tensor amax pass, MXFP4 1 x 32) on a GPU: the Triton kernel
(quantize_blocks_triton, its default tile) next to the Gluon kernel (quantize_fp4_gluon) at several tiles, in one
run. Every variant is first compared bit for bit with the PyTorch reference (x_q, x^T_q, both scale tensors and
NVFP4's tensor scale); then timed by CUDA graph replays. Ratio: 4 bytes per element (x read once in bf16, x_q and
x^T_q written once) per second over the device copy's bytes per second (x.clone: read + write) in the same run.
NVFP4 is timed a second way, with max |x| given (as delayed scaling or a producer's fused amax would supply it): the
block pass alone, without the amax pass's extra read of x. The Triton kernel also runs as its persistent variant
(a fixed grid of programs per SM walking the tiles, the next tile loaded early or not, registers capped or not).

    python bench/quantize_fp4.py [--shapes 8192x4096 8192x14336] [--skip-gluon] [--out DIR]   # writes quantize_fp4.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels import quantize_blocks_triton as blocks  # noqa: E402
from lowbit.kernels import quantize_fp4_gluon as gluon_fp4  # noqa: E402
from lowbit.precision.formats import E2M1  # noqa: E402
from lowbit.precision.scaling import Quantizer, quantize_reference  # noqa: E402

QUANTIZERS = {"nvfp4": Quantizer(E2M1, 1, 16, "nvfp4"), "mxfp4": Quantizer(E2M1, 1, 32, "pow2")}
GLUON_TILES = {16: [(16, 128, 1, 4), (16, 128, 2, 2), (16, 256, 2, 4), (16, 64, 1, 2), (16, 256, 4, 2)],
               32: [(32, 128, 2, 2), (32, 128, 4, 1), (32, 256, 4, 2), (32, 64, 1, 2), (32, 128, 1, 4)]}


def graph_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def same(got, want) -> bool:
    """Bit for bit: values, scales and NVFP4's tensor scale of both sides."""
    for a, b in zip(got, want):
        if not torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)):
            return False
        if not torch.equal(a.scale.view(torch.int32), b.scale.view(torch.int32)):
            return False
        if (a.gain is None) != (b.gain is None) or (a.gain is not None and not torch.equal(a.gain, b.gain)):
            return False
    return True


def triton_pair(x, q, packed: bool = False, amax=None, per_sm: int = 0, prefetch: int = 1,
                maxnreg: int | None = None, tile: tuple[int, int, int] | None = None, narrow: bool = True):
    """The Triton kernel's pair (never handed to the Gluon kernel here), E2M1 in f16x2 if `packed`, NVFP4's max |x|
    given as `amax` (no amax pass) if not None; `per_sm` > 0: the persistent kernel with that many programs per SM,
    loading ahead by `prefetch` (quantize_blocks_triton.PAIR_PREFETCH); registers capped at `maxnreg`; `tile` for
    the default tile; `narrow`: x_q stored 8 bytes per thread (quantize_blocks_triton.NARROW_PAIR_STORE)."""
    settings = dict(FP4_PAIR_KERNEL="triton", TRITON_PACKED=packed, PAIR_PROGRAMS_PER_SM=per_sm,
                    PAIR_PREFETCH=prefetch, PAIR_MAXNREG=maxnreg, TILE=tile, NARROW_PAIR_STORE=narrow)
    saved = {name: getattr(blocks, name) for name in settings}
    for name, value in settings.items():
        setattr(blocks, name, value)
    try:
        return blocks.quantize_blocks_triton(x, q, q, tensor_amax=amax)
    finally:
        for name, value in saved.items():
            setattr(blocks, name, value)


# the persistent kernel: (label, programs per SM, prefetch, register cap). MXFP4 at (32, 128, 2) for sm_90 (Triton
# 3.6): 255 registers with the next tile in registers (4 two-warp programs per SM), 160 capped without spills (6),
# 128 with a 40-byte spill (8); 168 loading ahead by cp.async (6) or in place
PERSISTENT = [("persistent 4/SM prefetch", 4, 1, None),
              ("persistent 6/SM prefetch cap 160", 6, 1, 160),
              ("persistent 8/SM prefetch cap 128", 8, 1, 128),
              ("persistent 6/SM async 2 stages", 6, 2, None),
              ("persistent 6/SM async 3 stages", 6, 3, None),
              ("persistent 8/SM async 3 stages cap 128", 8, 3, 128),
              ("persistent 4/SM async 4 stages", 4, 4, None),
              ("persistent 6/SM cap 160", 6, 0, 160)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["8192x4096", "8192x14336"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-gluon", action="store_true", help="only the Triton kernel's variants")
    args = parser.parse_args()
    rows = []
    torch.manual_seed(0)
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x[3, 5:9] *= 80.0                                    # a few outliers: scales differ across blocks
        out = torch.empty_like(x)
        copy_ms = graph_ms(lambda: out.copy_(x))
        copy_gbs = 4 * x.numel() / copy_ms / 1e6
        print(f"{shape}: device copy {copy_ms:.4f} ms, {copy_gbs:.0f} GB/s", flush=True)
        for name, q in QUANTIZERS.items():
            want = (quantize_reference(x, q), quantize_reference(x.t(), q))
            packs = (False, True) if gluon_fp4.packed_rounding(x, q) else (False,)
            variants = [(f"triton{' f16x2' if p else ''}", None, (lambda p: lambda: triton_pair(x, q, packed=p))(p))
                        for p in packs]     # f16x2: the Triton kernel with the Gluon kernel's E2M1 rounding
            variants += [(f"triton {label}{' f16x2' if p else ''}", None,
                          (lambda p, n, f, m: lambda: triton_pair(x, q, packed=p, per_sm=n, prefetch=f,
                                                                  maxnreg=m))(p, n, f, m))
                         for label, n, f, m in PERSISTENT for p in packs]
            variants += [(f"gluon {tile}{' f16x2' if p else ''}{'' if r else ' smem'}", tile,
                          (lambda t, p, r: lambda: gluon_fp4.quantize_fp4_pair_gluon(x, q, tile=t, packed=p,
                                                                                      reload=r))(tile, p, r))
                         for r in (True, False) for p in (() if args.skip_gluon else packs)
                         for tile in GLUON_TILES[q.block_cols]]
            if name == "nvfp4":     # the block pass alone: max |x| given (delayed or fused upstream), no amax pass
                amax = x.abs().amax().float().reshape(1)
                variants += [("triton amax given", None, lambda: triton_pair(x, q, amax=amax)),
                             ("triton persistent 6/SM prefetch cap 160 amax given", None,
                              lambda: triton_pair(x, q, amax=amax, per_sm=6, maxnreg=160)),
                             ("triton persistent 6/SM async 3 stages amax given", None,
                              lambda: triton_pair(x, q, amax=amax, per_sm=6, prefetch=3))]
                if not args.skip_gluon:
                    variants += [("gluon amax given", None, lambda: gluon_fp4.quantize_fp4_pair_gluon(x, q, amax)),
                                 ("gluon amax given smem", None,
                                  lambda: gluon_fp4.quantize_fp4_pair_gluon(x, q, amax, reload=False))]
            for label, tile, fn in variants:
                try:
                    exact = same(fn(), want)
                    ms = graph_ms(fn)
                except Exception as error:      # a tile that does not compile: reported, the others still run
                    print(f"{shape} {name} {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                ratio = 4 * x.numel() / ms / 1e6 / copy_gbs
                rows.append(dict(shape=shape, format=name, kernel=label, ms=ms, ratio=ratio, exact=exact,
                                 copy_ms=copy_ms))
                print(f"{str(shape):>14} {name} {label:<50} {ms:7.4f} ms  ratio {ratio:4.2f}  exact {exact}",
                      flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quantize_fp4.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
