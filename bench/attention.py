"""SeerAttention kernels against dense SDPA forward, side by side in one run (issue 4 bars).

  fused target   attention output + block-max-pooled normalised map   bar: <= 1.3x SDPA at S = 8k, 32k
  block-sparse   prefill at 90% block sparsity                        bar: >= 5x faster than SDPA at S = 32k

B=64, head dim 128, 32 heads, bf16, causal; kernels are swept over a few (num_warps, num_stages), the
target also over query rows and keys per tile (block_m, block_n); the best is reported with its setting. Correctness is
checked on the GPU first against the PyTorch paths. No hydra imports: runs on the bare device image.

    python bench/attention.py --seqs 8192 32768 --out docs/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.kernels.attention_target import (attention_block_target_gluon,  # noqa: E402
                                             attention_block_target_torch, attention_block_target_triton,
                                             gluon_supported)
from lowbit.kernels.block_sparse_attention import (block_sparse_attention_torch,  # noqa: E402
                                                   block_sparse_attention_triton)
from lowbit.objectives.seer_select import sparsity, topk_mask  # noqa: E402

LAUNCH = [(4, 2), (4, 3), (8, 2), (8, 3)]
SPARSE_LAUNCH = [(4, 3), (8, 3), (8, 4)]     # the block-sparse kernel's sweep, whatever --launch gives the target
TMA = [True, False]          # K/V tiles by tensor descriptors or by pointers
PER_SM = [2]                 # persistent programs per SM
TILES_M: list[int] = []      # query rows per tile (empty: B and 128)
GLUON: list[tuple[int, ...]] = []   # Gluon kernel: ring depth, keys per tile, ping-pong, head group, dynamic
TIMER = ["sync"]             # how timed() times: "sync" or "graph" (its docstring)


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of `fn()` over `reps` runs after two warm-up runs (CUDA events). TIMER "sync": each run
    between two events with the device idle before it, so the host's work in `fn` before its first launch (Python
    argument handling, descriptors, allocations) counts too; "graph": `fn` captured once in a CUDA graph and each
    replay timed, the device's time alone (every launch of `fn` included)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    run = fn
    if TIMER[0] == "graph":
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
            run()
        except RuntimeError as error:          # e.g. a host sync inside fn: timed as "sync" instead, and said so
            print(f"  (not capturable, timed from an idle device: {str(error).splitlines()[0][:100]})", flush=True)
            run = fn
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_correctness(block: int) -> dict:
    """GPU kernels vs PyTorch paths (float32 math) on an odd length with GQA."""
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16)
    out_ref, target_ref = attention_block_target_torch(q, k, v, block)
    target_err = out_err = 0.0
    for block_m in TILES_M or [0]:                          # every tile the timing sweep tries (0: the default)
        for block_n in sorted({block, max(block, 128)}):
            try:
                out, target = attention_block_target_triton(q, k, v, block, block_m=block_m, block_n=block_n)
            except Exception as error:                      # a tile that does not fit is skipped by the sweep too
                print(f"  correctness block_m={block_m} block_n={block_n}: {type(error).__name__}", flush=True)
                continue
            target_err = max(target_err, (target - target_ref).abs().max().item())
            out_err = max(out_err, (out.float() - out_ref.float()).abs().max().item())
    errors = {}
    if GLUON and gluon_supported(q, k, block):
        for stages, tile_n, pingpong, head_group, dynamic in GLUON:
            for shape in ((1, 8, 1000, 2), (2, 4, 200, 4), (1, 2, 64, 1), (1, 4, 2048, 1)):
                batch, heads, seq, kv = shape
                qs = torch.randn(batch, heads, seq, 128, device="cuda", dtype=torch.bfloat16)
                ks = torch.randn(batch, kv, seq, 128, device="cuda", dtype=torch.bfloat16)
                vs = torch.randn(batch, kv, seq, 128, device="cuda", dtype=torch.bfloat16)
                o_ref, t_ref = attention_block_target_torch(qs, ks, vs, block)
                o, t = attention_block_target_gluon(qs, ks, vs, block, stages=stages, tile_n=tile_n,
                                                    pingpong=bool(pingpong), head_group=head_group,
                                                    dynamic=bool(dynamic))
                name = gluon_name(stages, tile_n, pingpong, head_group, dynamic)
                errors[f"gluon_{name}_{batch}x{heads}x{seq}_kv{kv}"] = (
                    (t - t_ref).abs().max().item(), (o.float() - o_ref.float()).abs().max().item())
    n = target.shape[-1]
    mask = topk_mask(torch.rand(1, 2, n, n, device="cuda"), 0.3)
    sparse_ref = block_sparse_attention_torch(q, k, v, mask, block)
    sparse = block_sparse_attention_triton(q, k, v, mask, block)
    return {"target_max_abs_err": target_err, "target_out_max_abs_err": out_err, "gluon_target_out_err": errors,
            "sparse_max_abs_err": (sparse.float() - sparse_ref.float()).abs().max().item()}


def gluon_name(stages: int, tile_n: int, pingpong: int, head_group: int, dynamic: int) -> str:
    heads = f"_heads{head_group}" if head_group else ""
    return f"{stages}x{tile_n}{'_pingpong' * pingpong}{heads}{'_static' * (1 - dynamic)}"


def best_launch(fn, launches=None) -> tuple[float, tuple[int, int]] | None:
    """The fastest (ms, (warps, stages)) over `launches` (default LAUNCH); None when no setting fits the tile."""
    results = []
    for warps, stages in launches or LAUNCH:
        try:
            results.append((timed(lambda: fn(warps, stages)), (warps, stages)))
        except Exception as error:          # e.g. out of shared memory for a setting
            print(f"  launch {warps} warps / {stages} stages failed: {type(error).__name__}", flush=True)
    return min(results) if results else None


def bench_seq(seq: int, heads: int, kv_heads: int, head_dim: int, block: int, density: float) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    gqa = heads != kv_heads
    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
    backends = sdpa_backend_ms(q, k, v, gqa)
    target_runs = []      # (ms, setting, the call)
    # setting = (warps, stages, query rows per tile, keys per tile, K/V by descriptors, programs per SM)
    for block_m in TILES_M or sorted({block, max(block, 128)}):
        for block_n in sorted({block, max(block, 128)}):
            for tma in TMA:
                for per_sm in PER_SM:
                    best = best_launch(lambda w, s: attention_block_target_triton(
                        q, k, v, block, num_warps=w, num_stages=s, block_m=block_m, block_n=block_n, tma=tma,
                        programs_per_sm=per_sm))
                    if best is None:                # e.g. 256 x 128 tiles: out of shared memory at every launch
                        continue
                    ms, (warps, stages) = best
                    setting = (warps, stages, block_m, block_n, tma, per_sm)
                    target_runs.append((ms, setting, lambda setting=setting: attention_block_target_triton(
                        q, k, v, block, num_warps=setting[0], num_stages=setting[1], block_m=setting[2],
                        block_n=setting[3], tma=setting[4], programs_per_sm=setting[5])))
                    print(f"  target S={seq} block_m={block_m} block_n={block_n} tma={tma} programs/SM={per_sm}: "
                          f"{ms:.3f} ms {(warps, stages)}", flush=True)
    gluon_err = {}
    reference = attention_block_target_triton(q, k, v, block) if GLUON else None
    for stages, tile_n, pingpong, head_group, dynamic in GLUON if gluon_supported(q, k, block) else []:
        call = (lambda stages=stages, tile_n=tile_n, pingpong=pingpong, head_group=head_group, dynamic=dynamic:
                attention_block_target_gluon(q, k, v, block, stages=stages, tile_n=tile_n, pingpong=bool(pingpong),
                                             head_group=head_group, dynamic=bool(dynamic)))
        out, target = call()        # the timed size, many work items per program: against the Triton kernel
        gluon_err[gluon_name(stages, tile_n, pingpong, head_group, dynamic)] = (
            (target - reference[1]).abs().max().item(), (out.float() - reference[0].float()).abs().max().item())
        ms = timed(call)
        target_runs.append((ms, ("gluon", stages, tile_n, pingpong, head_group, dynamic), call))
        print(f"  target S={seq} gluon (warp-specialised, 128 rows) stages={stages} keys/tile={tile_n} "
              f"ping-pong={pingpong} head group={head_group or 'auto'} dynamic={dynamic}: {ms:.3f} ms; "
              f"target / output max abs diff to the Triton kernel "
              f"{gluon_err[list(gluon_err)[-1]]}", flush=True)
    del reference
    target_ms, target_launch, target_call = min(target_runs, key=lambda run: run[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()          # the best setting once more, alone: its extra memory
    target_call()
    extra_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    n = math.ceil(seq / block)
    mask = topk_mask(torch.rand(1, kv_heads, n, n, device="cuda"), density)
    measured = sparsity(mask)
    sparse_ms, sparse_launch = best_launch(lambda w, s: block_sparse_attention_triton(q, k, v, mask, block,
                                                                                       num_warps=w, num_stages=s),
                                           SPARSE_LAUNCH)
    full = torch.ones(1, kv_heads, n, n, dtype=torch.bool, device="cuda")
    full_ms, _ = best_launch(lambda w, s: block_sparse_attention_triton(q, k, v, full, block, num_warps=w,
                                                                          num_stages=s), SPARSE_LAUNCH)
    flops = 4 * seq * seq / 2 * head_dim * heads
    return {"seq": seq, "heads": heads, "kv_heads": kv_heads, "sdpa_ms": sdpa_ms,
            "sdpa_tflops": flops / sdpa_ms / 1e9, "target_ms": target_ms, "target_launch": target_launch,
            "target_over_sdpa": target_ms / sdpa_ms, "target_extra_mib": extra_mib, "gluon_vs_triton_err": gluon_err,
            "target_map_mib": heads * n * n * 4 / 2 ** 20, "seer_buffer_mib": heads * seq * n * 4 / 2 ** 20,
            "sparse_sparsity": measured, "sparse_ms": sparse_ms, "sparse_launch": sparse_launch,
            "sparse_speedup_over_sdpa": sdpa_ms / sparse_ms, "dense_blocksparse_ms": full_ms,
            "dense_blocksparse_over_sdpa": full_ms / sdpa_ms, "sdpa_backend_ms": backends,
            "target_over_sdpa_backend": {name: target_ms / ms for name, ms in backends.items()}}


def sdpa_backend_ms(q, k, v, gqa: bool) -> dict[str, float]:
    """SDPA forward forced to each backend that accepts these inputs (the default picks one of them): which one
    "dense SDPA" is matters, since cuDNN's Hopper kernel runs well above FlashAttention-2's rate."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                times[name.lower()] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   enable_gqa=gqa))
        except (RuntimeError, AttributeError) as error:    # a backend that rejects these shapes, or is absent
            print(f"  SDPA backend {name}: {type(error).__name__}: {str(error)[:120]}", flush=True)
    return times


def gate_pipeline_smoke() -> dict:
    """Gates on a random 3-layer Llama (9 heads, 3 kv heads, head dim 64 like SmolLM2): a few distillation
    steps and one sparsity curve point on the GPU, exercising every inference mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.eval.sparsity import sparsity_curve
    from lowbit.objectives.seer_attach import attach_gates
    from lowbit.objectives.seer_gate import distill_gates

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=3,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         initializer_range=0.1, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).cuda().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    controller = attach_gates(model, block_size=64)
    batches = (torch.randint(0, 1000, (2, 2000)) for _ in range(6))
    training = distill_gates(model, controller, batches, max_steps=6)
    rows = sparsity_curve(model, controller, torch.randint(0, 1000, (2, 2000)), [0.5, 0.9], [0.01])
    return {"training": training, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--json", default="")
    parser.add_argument("--launch", nargs="+", default=[f"{w},{s}" for w, s in LAUNCH],
                        help="(num_warps,num_stages) settings swept per kernel, e.g. 8,2 4,3")
    parser.add_argument("--tma", default="both", choices=["both", "on", "off"], help="K/V tile loads swept")
    parser.add_argument("--per-sm", type=int, nargs="+", default=[2], help="persistent programs per SM swept")
    parser.add_argument("--block-m", type=int, nargs="*", default=[], help="query rows per tile swept")
    parser.add_argument("--gluon", nargs="*", default=[], metavar="STAGES,KEYS[,PINGPONG[,HEADS[,DYNAMIC]]]",
                        help="also time the Hopper (Gluon) kernel: K/V ring depth, keys per tile, ping-pong (0/1), "
                             "query heads per group of work items (0: sized to the L2 cache; 1000: all heads in "
                             "one group), dynamic scheduler (1, the default, or 0: static), e.g. 2,64 2,128 2,128,1 "
                             "2,128,0,1000,0")
    parser.add_argument("--gate-smoke", action="store_true", help="also run the gate pipeline on a random Llama")
    parser.add_argument("--timer", default="sync", choices=["sync", "graph"],
                        help="sync: each call timed from an idle device (host work before the first launch counts); "
                             "graph: each call captured in a CUDA graph and its replays timed (device time only)")
    args = parser.parse_args()
    LAUNCH[:] = [tuple(int(n) for n in setting.split(",")) for setting in args.launch]
    TMA[:] = {"both": [True, False], "on": [True], "off": [False]}[args.tma]
    PER_SM[:] = args.per_sm
    TILES_M[:] = args.block_m
    TIMER[:] = [args.timer]
    GLUON[:] = [(*(int(n) for n in setting.split(",")), *(0, 0, 1)[setting.count(",") - 1:])[:5]
                for setting in args.gluon]
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"device {device}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC, timer {args.timer}", flush=True)
    print("correctness", check_correctness(args.block), flush=True)
    rows = []
    for kv_heads in args.kv_heads:
        for seq in args.seqs:
            row = bench_seq(seq, args.heads, kv_heads, args.head_dim, args.block, 1.0 - args.sparsity)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print(f"\n| S | heads (kv) | SDPA fwd ms | fused target ms | target/SDPA | target extra MiB | "
          f"block-sparse ms @ sparsity | speed-up vs SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['heads']} ({r['kv_heads']}) | {r['sdpa_ms']:.2f} | {r['target_ms']:.2f} | "
              f"{r['target_over_sdpa']:.2f}x | {r['target_extra_mib']:.1f} | {r['sparse_ms']:.2f} @ "
              f"{r['sparse_sparsity']:.3f} | {r['sparse_speedup_over_sdpa']:.2f}x |")
    print("\nSDPA forward by backend (ms) and the fused target's time over each:")
    for r in rows:
        cells = ", ".join(f"{name} {ms:.2f} ms (target {r['target_over_sdpa_backend'][name]:.2f}x)"
                          for name, ms in r["sdpa_backend_ms"].items())
        print(f"  S={r['seq']} kv={r['kv_heads']}: default {r['sdpa_ms']:.2f} ms; {cells}")
    smoke = {}
    if args.gate_smoke:
        smoke = gate_pipeline_smoke()
        print("gate smoke", json.dumps(smoke), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "timer": args.timer, "rows": rows,
                                                "gate_smoke": smoke}, indent=1))


if __name__ == "__main__":
    main()
