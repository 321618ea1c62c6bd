"""The tensorwise amax pass (max |x| over a bf16 tensor, fp8 tensorwise current scaling's first read of x, W and dy)
over launch settings, next to the strip kernel it replaces and to PyTorch's single-pass infinity norm.

In the fwd+bwd profile of one fp8 tensorwise linear (H100, 8192 x 4096 x 4096, 2026-12-06) the three amax passes took
0.080 ms for 160 MB read (2.0 TB/s) against the pair kernels' 0.107 ms for 320 MB moved: the strip kernel's 2-D
grid leaves a tail wave and its 64-byte loads per thread keep few bytes in flight. `_tensor_amax_kernel` walks flat
blocks from a fixed grid of a few programs per SM.

    python bench/amax_tensor.py [--out DIR]    # CUDA; every variant checked against torch.amax first

Prints, per shape, each variant's median time and read bandwidth (bytes of x over time) as a share of the device
copy's (read + write bytes over time, same run).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels import quantize_triton  # noqa: E402

SHAPES = [(8192, 4096), (4096, 4096), (8192, 14336)]


def ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=150, return_mode="median")


def lowbit_amax(x, flat=None):
    """quantize_triton's tensor amax with TENSOR_AMAX = flat, or the strip kernel (flat=None: a row-strided call)."""
    out = torch.zeros(1, device=x.device, dtype=torch.float32)
    if flat is None:
        quantize_triton.launch_amax(x, out, out, per_row=False, per_col=False)     # x is a strided view here
    else:
        quantize_triton.TENSOR_AMAX = flat
        quantize_triton.launch_amax(x, out, out, per_row=False, per_col=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    parser.add_argument("--blocks", default="1024,2048,4096,8192")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--per-sm", default="1,2,4,8")
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    default = quantize_triton.TENSOR_AMAX
    flats = [(b, w, p, s) for b, w, p, s in itertools.product(
        *(map(int, getattr(args, a).split(",")) for a in ("blocks", "warps", "per_sm", "stages"))) if b >= 32 * w]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "default": default, "shapes": {}}
    for R, C in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(R, C, device="cuda", dtype=torch.bfloat16)
        x[R // 3, C // 5] = -77.0
        want = x.float().abs().amax().reshape(1)
        wide = torch.zeros(R, C + 64, device="cuda", dtype=torch.bfloat16)
        wide[:, :C] = x
        strided = wide[:, :C]                       # the strip kernel (the former pass for every x)
        y = torch.empty_like(x)
        copy = ms(lambda: y.copy_(x))
        copy_gbs = 2 * x.numel() * 2 / copy / 1e6
        row = {"copy_ms": copy, "copy_GBps": copy_gbs}

        def record(name, fn, check=True):
            if check:
                got = fn()
                torch.cuda.synchronize()
                if not torch.equal(got, want):
                    row[name] = {"error": f"{got.item()} != {want.item()}"}
                    print(f"{R}x{C} {name}: WRONG {got.item()} != {want.item()}", flush=True)
                    return
            t = ms(fn)
            gbs = x.numel() * 2 / t / 1e6
            row[name] = {"ms": t, "GBps": gbs, "of_copy": gbs / copy_gbs}
        record("strip (row-strided x)", lambda: lowbit_amax(strided))
        record("torch vector_norm inf", lambda: torch.linalg.vector_norm(x, float("inf")).float().reshape(1))
        for flat in flats:
            record(f"flat {flat}", lambda flat=flat: lowbit_amax(x, flat))
        quantize_triton.TENSOR_AMAX = default
        results["shapes"][f"{R}x{C}"] = row
        ranked = sorted(((v["ms"], k) for k, v in row.items() if isinstance(v, dict) and "ms" in v))
        print(f"\n{R}x{C} bf16 ({x.numel() * 2 / 1e6:.0f} MB): copy {copy * 1e3:.1f} us = {copy_gbs:.0f} GB/s; "
              f"default {default}: {row[f'flat {default}']['ms'] * 1e3:.1f} us "
              f"({row[f'flat {default}']['of_copy']:.2f} of copy)" if f"flat {default}" in row else "", flush=True)
        for t, name in ranked[:12] + [r for r in ranked if not r[1].startswith("flat")]:
            print(f"  {t * 1e3:7.1f} us  {row[name]['of_copy']:.2f} of copy  {name}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "amax_tensor.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
