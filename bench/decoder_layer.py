"""One Llama decoder layer (llama_1b shape), fwd+bwd under bf16 autocast with fp32 master weights,
torch.compile'd as the trainer does, for bf16 and each precision recipe: the layer-level speed-up,
a graph-break count and the top GPU kernels, to separate layer cost from trainer overhead. `torchao_tensorwise` and
`torchao_rowwise` run torchao's float8 training (`convert_to_float8_training`) on the same layer for comparison.

    python bench/decoder_layer.py --recipes bf16 fp8_rowwise fp4_vectorwise --tokens 8192
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn


def build(recipe: str, hidden: int, inter: int, heads: int, kv_heads: int, dge: bool, occ: bool, compile_: bool,
          mode: str | None = None, device: str = "cuda", backend="inductor"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from lowbit.config import PrecisionConfig
    from lowbit.precision import apply

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=8192, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    holder = nn.Module()
    holder.layers = nn.ModuleList([LlamaDecoderLayer(config, 0)])
    if recipe.startswith("torchao_"):     # torchao's float8 training on the same layer: torchao_tensorwise / _rowwise
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(holder, config=Float8LinearConfig.from_recipe_name(recipe.removeprefix("torchao_")))
    else:
        recipe, _, kernels = recipe.partition(":")      # RECIPE:triton / RECIPE:torch: precision.quantize_kernels
        precision = PrecisionConfig(recipe=recipe, include=["*"], exclude=[], dge=dge and recipe.startswith("fp4"),
                                    occ=occ and recipe.startswith("fp4"), quantize_kernels=kernels or "auto")
        apply(holder, precision, compiled=compile_)   # as the trainer: Inductor fuses the quantization when compiled
    holder.to(device)
    layer = holder.layers[0]
    if compile_:
        layer.compile(mode=mode, backend=backend)
    return layer, LlamaRotaryEmbedding(config).to(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8_tensorwise", "fp8_rowwise", "fp4_vectorwise"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dge", action="store_true")
    parser.add_argument("--occ", action="store_true")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--mode", default=None, help="torch.compile mode; reduce-overhead (CUDA graphs) fails in this repeated "
                        "backward without torch.compiler.cudagraph_mark_step_begin (H100, 2026-11-23)")
    parser.add_argument("--profile", default="", help="recipe to profile (top kernels)")
    args = parser.parse_args()
    import torch._dynamo
    from triton.testing import do_bench

    hidden, inter, heads, kv = 2048, 8192, 32, 8
    results = {}
    for recipe in args.recipes:
        torch._dynamo.reset()
        try:
            layer, rope = build(recipe, hidden, inter, heads, kv, args.dge, args.occ, not args.eager, args.mode)
        except ImportError as error:        # e.g. torchao not installed
            print(f"{recipe}: skipped, {error}", flush=True)
            continue
        batch = args.tokens // args.seq
        x = torch.randn(batch, args.seq, hidden, device="cuda", requires_grad=True)
        pos = torch.arange(args.seq, device="cuda")[None].expand(batch, -1)
        cos_sin = rope(x, pos)
        grad = torch.randn(batch, args.seq, hidden, device="cuda", dtype=torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x, position_embeddings=cos_sin, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad)

        for _ in range(3):
            step()
        counters = dict(torch._dynamo.utils.counters["graph_break"])
        ms = do_bench(step, warmup=50, rep=300, return_mode="median")
        results[recipe] = ms
        print(f"{recipe}: {ms:.2f} ms fwd+bwd, graph breaks {sum(counters.values())}: "
              f"{list(counters)[:4]}", flush=True)
        if recipe == args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
        del layer, x
        torch.cuda.empty_cache()
    base = results.get("bf16")
    print("\n| recipe | ms fwd+bwd | speed-up vs bf16 |\n|---|---|---|")
    for recipe, ms in results.items():
        print(f"| {recipe} | {ms:.2f} | {base / ms if base else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
