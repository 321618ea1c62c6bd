"""Compiled vs eager fake quantization, bit for bit, on this device (issue 5: the packed export must equal what
training computed). For SmolLM2-135M's four weight shapes and each format: how many of the compiled graph's
weights, scales and codes differ from eager PyTorch's. (With the quantization computed in float32, 47-65% of the
integer formats' scales differed by 1 ulp on an H200: docs/bench_h200_2026-12-01/fq_check_*.log.)

    python bench/fq_check.py [--device cuda] [--formats int3 int2 fp4_afpq]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from lowbit.quant.fake_quant import make_format, quantize, to_groups
from lowbit.quant.linear import FakeQuantLinear, clip_bounds, fake_quant_weight

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def stages(weight, fmt, clip_ratio, divisor):
    """(scale, codes, fake-quantized weight) of one layer, as one function of tensors (compiled or not)."""
    grouped = to_groups(weight, fmt)
    codes, params = quantize(grouped, *clip_bounds(grouped, fmt, clip_ratio, None, None), fmt, divisor)
    return params["scale"], codes, fake_quant_weight(weight, fmt, clip_ratio, None, None, divisor)


def check(device: str, formats: list[str]) -> int:
    mismatches = 0
    for name in formats:
        torch._dynamo.reset()          # one format per compilation (the format is a guarded constant)
        compiled = torch.compile(stages, dynamic=False)
        fmt = make_format(name, 128, partial_groups=True)
        for out_f, in_f in SHAPES:
            torch.manual_seed(out_f + in_f)
            layer = FakeQuantLinear(nn.Linear(in_f, out_f, bias=False), fmt).to(device)
            layer.clip_ratio.uniform_(0.5, 1.0)
            args = (layer.weight, fmt, layer.clip_ratio, layer.scale_divisor)
            eager, fused = stages(*args), compiled(*args)
            diff = [(e != f).sum().item() for e, f in zip(eager, fused)]
            rel = ((eager[2] - fused[2]).abs() / eager[2].abs().clamp_min(1e-30)).max().item()
            mismatches += diff[2]
            print(f"{name:8s} {out_f:4d}x{in_f:<4d}: compiled != eager: scales {diff[0]}/{eager[0].numel()}, "
                  f"codes {diff[1]}/{eager[1].numel()}, weights {diff[2]}/{eager[2].numel()} (max rel {rel:.2e})",
                  flush=True)
    return mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", nargs="+", default=["int3", "int2", "int4", "fp4_e2m1", "fp4_afpq"])
    args = parser.parse_args()
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    mismatches = check(args.device, args.formats)
    print(f"compiled == eager bit for bit: {mismatches == 0}")


if __name__ == "__main__":
    main()
