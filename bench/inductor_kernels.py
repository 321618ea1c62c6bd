"""What Inductor generates for one compiled QuantLinear, fwd+bwd (runs on CPU): the number of fused kernels and of
max operations (amax reductions) in the generated code, a device-free view of how many passes the quantization takes.
--decoder-layer: the amax nodes AOTAutograd hands to the compiler for a whole Llama decoder layer (7 linears; q/k/v
share one input, gate/up another), next to the count if every distinct tensor were quantized once.

    python bench/inductor_kernels.py --recipes fp8_tensorwise fp8_rowwise --tokens 64 --k 256 --n 128
    python bench/inductor_kernels.py --recipes fp8_tensorwise fp8_rowwise --decoder-layer
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


def decoder_layer_amax_nodes(recipe: str) -> dict[str, int]:
    """amax nodes in the forward and backward graphs of one compiled LlamaDecoderLayer (Inductor's partitioner)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from decoder_layer import build       # bench/decoder_layer.py (this script's directory is on sys.path)

    counts = {"fw": 0, "bw": 0}

    def counting(graph: str):
        def compiler(gm, example_inputs):
            counts[graph] += sum(node.op == "call_function" and "amax" in str(node.target) for node in gm.graph.nodes)
            return gm.forward
        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=counting("fw"), bw_compiler=counting("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    layer, rope = build(recipe, 256, 512, 4, 2, dge=False, occ=False, compile_=True, device="cpu", backend=backend)
    x = torch.randn(2, 32, 256, requires_grad=True)
    pos = torch.arange(32)[None].expand(2, -1)
    out = layer(x, position_embeddings=rope(x, pos), position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["fp8_tensorwise", "fp8_rowwise", "fp4_vectorwise"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--decoder-layer", action="store_true")
    args = parser.parse_args()
    if args.decoder_layer:
        # distinct operands: inputs x 4 (q/k/v share one, gate/up one), weights x 7, output gradients x 7; a pair
        # of per-row scales takes two amax reductions, a tensorwise pair one
        print("| recipe | amax nodes fwd + bwd | if each distinct operand were quantized once |\n|---|---|---|")
        for recipe in args.recipes:
            counts = decoder_layer_amax_nodes(recipe)
            per_pair = {"fp8_tensorwise": 1, "fp8_rowwise": 2, "fp4_vectorwise": 2}.get(recipe)   # others: not derived
            print(f"| {recipe} | {counts['fw']} + {counts['bw']} = {counts['fw'] + counts['bw']} | "
                  f"{(4 + 7 + 7) * per_pair if per_pair else '--'} |", flush=True)
        return
    print("| recipe | fused kernels (fwd + bwd) | max operations |\n|---|---|---|")
    for recipe in args.recipes:
        src = generated_code(recipe, args.tokens, args.k, args.n)
        kernels = len(re.findall(r"\b(?:cpp|triton)_\w+ = ", src))
        maxima = len(re.findall(r"max_propagate_nan|maximum\(", src))
        print(f"| {recipe} | {kernels} | {maxima} |", flush=True)


if __name__ == "__main__":
    main()
