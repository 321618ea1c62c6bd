"""What Inductor generates for one compiled QuantLinear, fwd+bwd (runs on CPU): the number of fused kernels and of
max operations (amax reductions) in the generated code, a device-free view of how many passes the quantization takes.

    python bench/inductor_kernels.py --recipes fp8_tensorwise fp8_rowwise --tokens 64 --k 256 --n 128
"""
from __future__ import annotations

import argparse
import re

import torch


def generated_code(recipe: str, tokens: int, k: int, n: int) -> str:
    from torch._inductor.utils import run_and_get_code

    from lowbit.config import PrecisionConfig
    from lowbit.kernels.quantize import set_kernels
    from lowbit.precision.linear import QuantLinear
    from lowbit.precision.recipes import build_recipe

    set_kernels("auto", compiled=True)        # as the trainer with model.compile=true
    torch.manual_seed(0)
    layer = torch.compile(QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False),
                                                  build_recipe(PrecisionConfig(recipe=recipe))))
    x = torch.randn(tokens, k, requires_grad=True)
    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: layer(x).sum().backward())
    return "\n".join(codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["fp8_tensorwise", "fp8_rowwise", "fp4_vectorwise"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    print("| recipe | fused kernels (fwd + bwd) | max operations |\n|---|---|---|")
    for recipe in args.recipes:
        src = generated_code(recipe, args.tokens, args.k, args.n)
        kernels = len(re.findall(r"\b(?:cpp|triton)_\w+ = ", src))
        maxima = len(re.findall(r"max_propagate_nan|maximum\(", src))
        print(f"| {recipe} | {kernels} | {maxima} |", flush=True)


if __name__ == "__main__":
    main()
