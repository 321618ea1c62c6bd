"""What fusing a decoder layer's projections would buy: q/k/v as one GEMM (N = 3072 for llama_1b) and gate/up as one
(N = 16384), against the separate GEMMs, in bf16 and in lowbit's fp8 tensorwise (one scale per fused weight), one
llama_1b layer compiled, fwd+bwd at 8192 tokens. Both variants run the same hand-written forward (SDPA causal, the
HF rotary embedding), so the fusion is the only difference. Measured on an H200 (2026-12-03): 0.987x in bf16 and
0.957x in fp8, the splits' copies outweighing the larger GEMMs, so lowbit offers no such option (docs/RESULTS.md).

    python bench/fused_projections.py --tokens 8192
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class Layer(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int, fused: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.inter, self.fused = inter, fused
        qkv = [hidden, kv_heads * self.head_dim, kv_heads * self.head_dim]
        self.qkv_sizes = qkv
        if fused:
            self.qkv = nn.Linear(hidden, sum(qkv), bias=False)
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(hidden, n, bias=False) for n in qkv)
            self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(hidden, eps=1e-5), nn.RMSNorm(hidden, eps=1e-5)

    def forward(self, x, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, s, _ = x.shape
        h = self.norm1(x)
        if self.fused:
            q, k, v = self.qkv(h).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self.norm2(x)
        if self.fused:
            gate, up = self.gate_up(h).split(self.inter, dim=-1)
        else:
            gate, up = self.gate(h), self.up(h)
        return x + self.down(F.silu(gate) * up)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8_tensorwise"])
    args = parser.parse_args()
    import torch._dynamo
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from triton.testing import do_bench

    from lowbit.config import PrecisionConfig
    from lowbit.precision import apply

    hidden, inter, heads, kv = 2048, 8192, 32, 8
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=8192, rope_theta=500000.0)
    batch = args.tokens // args.seq
    rope = LlamaRotaryEmbedding(config).to("cuda")
    results = {}
    for recipe in args.recipes:
        for fused in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            holder = nn.Module()
            holder.layers = nn.ModuleList([Layer(hidden, inter, heads, kv, fused)])
            if recipe != "bf16":
                apply(holder, PrecisionConfig(recipe=recipe, include=["*"], exclude=[]), compiled=True)
            layer = holder.layers[0].to("cuda")
            layer.compile()
            x = torch.randn(batch, args.seq, hidden, device="cuda", requires_grad=True)
            pos = torch.arange(args.seq, device="cuda")[None].expand(batch, -1)
            cos, sin = rope(x, pos)
            grad = torch.randn(batch, args.seq, hidden, device="cuda", dtype=torch.bfloat16)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = layer(x, cos, sin)
                out.backward(grad)

            for _ in range(3):
                step()
            ms = do_bench(step, warmup=50, rep=300, return_mode="median")
            name = f"{recipe} {'fused' if fused else 'separate'}"
            results[name] = ms
            print(f"{name}: {ms:.3f} ms fwd+bwd", flush=True)
            del layer, holder, x
            torch.cuda.empty_cache()
    print("\n| recipe | separate ms | fused ms | fused gain | vs bf16 separate |\n|---|---|---|---|---|")
    base = results.get("bf16 separate")
    for recipe in args.recipes:
        sep, fus = results[f"{recipe} separate"], results[f"{recipe} fused"]
        print(f"| {recipe} | {sep:.3f} | {fus:.3f} | {sep / fus:.3f}x | {base / sep:.2f}x -> {base / fus:.2f}x |")


if __name__ == "__main__":
    main()
