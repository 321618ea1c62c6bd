"""fwd+bwd of one linear layer: lowbit's quantized recipes vs bf16 nn.Linear vs torchao float8, one run.

Times, side by side on one GPU and in one process (METHOD.md: do_bench median, warm-up, rotating input
sets so no operand stays in L2, random data):
  1. the two ceilings: device copy bandwidth and the bf16 GEMM rate (8192^3);
  2. GEMMs alone at each shape: bf16 mm vs lowbit.kernels.gemm.scaled_mm (tensorwise, rowwise) and
     block_scaled_mm (DeepSeek 1x128/128x128, NVFP4 16, MXFP4 32) -> TFLOP/s;
  3. the quantize kernels (lowbit.kernels.quantize.quantize_pair: x -> x_q and x_q^T) vs the copy bandwidth;
  4. fwd+bwd (y = layer(x); dx, dW = autograd.grad(y, (x, W), dy)) of bf16 nn.Linear, lowbit QuantLinear
     per recipe (eager and torch.compile), torchao Float8Linear tensorwise / rowwise (torch.compile).
All parameters and activations are bf16 (the convention of torchao's float8 benchmarks).

    python bench/linear.py --out $OUT/linear.json [--shapes 8192x4096x4096,...] [--recipes ...]
    (a recipe fp8_rowwise+gw_hp keeps the weight-gradient GEMM in bf16, timed next to torchao's rowwise_with_gw_hp;
    nvfp4 and mxfp4 run their GEMMs by the dequant scheme, their default; RECIPE+rescale and RECIPE+prescale by
    the other schemes, precision.block_gemm=rescale / prescale; fp4_vectorwise+dge with the Differentiable Gradient
    Estimator on, as conf/precision/fp4_vectorwise.yaml and +exp=fp4_llama have it)
Prints a ratio table (speed-up over bf16 nn.Linear) last. Does not import hydra.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]      # (M tokens, K in, N out)
RECIPES = ["fp8_tensorwise", "fp8_rowwise", "fp8_blockwise", "fp4_vectorwise", "nvfp4", "mxfp4"]
BARS = {"fp8_tensorwise": 1.5, "fp8_rowwise": 1.4, "fp4_vectorwise": 1.35, "fp8_blockwise": 1.2, "nvfp4": 1.2}
TORCHAO_OF = {"fp8_tensorwise": "tensorwise", "fp8_rowwise": "rowwise"}
# RECIPE+SUFFIX: the recipe with these precision options (e.g. some GEMMs left in bf16), next to torchao's equivalent
SUFFIXES = {"gw_hp": ({"high_precision": ["wgrad"]}, "rowwise_with_gw_hp"),
            "prescale": ({"block_gemm": "prescale"}, None), "rescale": ({"block_gemm": "rescale"}, None),
            "dequant": ({"block_gemm": "dequant"}, None), "dge": ({"dge": True}, None),
            "delayed": ({}, None)}     # fp8_tensorwise+delayed: x and dy by an amax history, as `+exp=fp8_llama`
ROTATE = 3          # input sets rotated between calls


def median_ms(fn, warmup_ms=100, rep_ms=400) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_ms(step, sets) -> float:
    """Device time of `step(*args)`: one CUDA graph per input set, replays rotated (no host launch gaps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for args in sets:
                step(*args)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for args in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(*args)
        graphs.append(graph)
    return median_ms(rotating(lambda g: g.replay(), [(g,) for g in graphs]))


def rotating(fn, inputs):
    """A zero-arg callable that applies fn to the next input set each call (defeats L2 reuse)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        return fn(*inputs[state["i"]])
    return call


# --------------------------------------------------------------------------------------------------
# 1. ceilings
# --------------------------------------------------------------------------------------------------

def measure_ceilings() -> dict:
    src = torch.randn(512 * 2**20 // 2, device="cuda", dtype=torch.bfloat16)     # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * 2 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


# --------------------------------------------------------------------------------------------------
# 2. GEMMs alone
# --------------------------------------------------------------------------------------------------

def gemm_table(M, K, N) -> dict:
    from lowbit.kernels.gemm import block_scaled_mm, block_scaled_mm_reference, scaled_mm
    flops = 2 * M * N * K
    e4m3 = torch.float8_e4m3fn
    sets = [(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16))
            for _ in range(ROTATE)]
    rows = {"bf16_mm": median_ms(rotating(lambda a, b: a @ b.t(), sets))}
    q = [(a.to(e4m3), b.to(e4m3)) for a, b in sets]
    one = torch.tensor(1.0, device="cuda")
    rows["scaled_mm_tensorwise"] = median_ms(rotating(lambda a, b: scaled_mm(a, b, one, one), q))
    sa, sb = torch.rand(M, 1, device="cuda") + 0.5, torch.rand(N, 1, device="cuda") + 0.5
    rows["scaled_mm_rowwise"] = median_ms(rotating(lambda a, b: scaled_mm(a, b, sa, sb), q))
    rows["scaled_mm_rowwise_precise_accum"] = median_ms(rotating(lambda a, b: scaled_mm(a, b, sa, sb, use_fast_accum=False), q))
    a64, b64 = q[0][0][:256].double().cpu() * sa[:256].double().cpu(), q[0][1].double().cpu() * sb.double().cpu()
    expected = a64 @ b64.t()
    for fast in (True, False):
        for out_dtype in (torch.float32, torch.bfloat16):
            key = f"scaled_mm_rowwise_fast{int(fast)}_{str(out_dtype)[6:]}out_relerr"
            try:
                out = scaled_mm(q[0][0][:256], q[0][1], sa[:256], sb, out_dtype=out_dtype, use_fast_accum=fast)
                rows[key] = ((out.double().cpu() - expected).norm() / expected.norm()).item()
            except Exception as error:
                rows[key] = f"{type(error).__name__}: {str(error)[:100]}"
    for name, block_k, b_rows in (("block_deepseek_128x128", 128, 128), ("block_mxfp4_32", 32, 1), ("block_nvfp4_16", 16, 1)):
        a_s = torch.rand(M, K // block_k, device="cuda") + 0.5
        b_s = torch.rand(-(-N // b_rows), K // block_k, device="cuda") + 0.5
        fn = lambda a, b: block_scaled_mm(a, a_s, b, b_s, block_k=block_k, b_rows=b_rows)
        # correctness at full size before timing (fresh data, poisoned output would show as NaN)
        out = block_scaled_mm(q[0][0][:256], a_s[:256], q[0][1], b_s, block_k=block_k, b_rows=b_rows,
                              out_dtype=torch.float32).double().cpu()
        ref = block_scaled_mm_reference(q[0][0][:256].cpu(), a_s[:256].cpu(), q[0][1].cpu(), b_s.cpu(),
                                        block_k=block_k, b_rows=b_rows, out_dtype=torch.float32).double()
        err = ((out - ref).norm() / ref.norm()).item()          # fp32 output: the bar is 1e-3
        rows[name] = median_ms(rotating(fn, q))
        rows[name + "_relerr"] = err
    return {k: (v if "relerr" in k else {"ms": v, "TFLOPs": flops / v / 1e9}) for k, v in rows.items()}


def sweep_block_configs(M, K, N) -> dict:
    """TFLOP/s of block_scaled_mm_triton over tile configs and both accumulation schemes (pick defaults)."""
    from lowbit.kernels.gemm_triton import block_scaled_mm_triton
    flops = 2 * M * N * K
    e4m3 = torch.float8_e4m3fn
    q = [(torch.randn(M, K, device="cuda").to(e4m3), torch.randn(N, K, device="cuda").to(e4m3)) for _ in range(2)]
    fp8_tiles = [(128, 128, 8, 3), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 5), (128, 128, 8, 2),
                 (64, 256, 8, 4), (128, 64, 4, 3), (128, 128, 8, 4)]
    small_tiles = [(128, 128, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3)]
    out = {}
    # (name, block_k, b_rows, accumulate by rescaling, bf16 upcast, tiles)
    plans = [("deepseek", 128, 128, False, False, fp8_tiles), ("mxfp4", 32, 1, True, True, small_tiles),
             ("nvfp4", 16, 1, True, True, small_tiles), ("mxfp4", 32, 1, False, False, small_tiles[:2])]
    for name, block_k, b_rows, rescale, dot_bf16, tiles in plans:
        a_s = torch.rand(M, K // block_k, device="cuda") + 0.5
        b_s = torch.rand(-(-N // b_rows), K // block_k, device="cuda") + 0.5
        for bm, bn, warps, stages in tiles:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(block_k, 128), GROUP_M=8, num_warps=warps,
                       num_stages=stages, RESCALE=rescale, DOT_BF16=dot_bf16)
            key = (f"{name} bm{bm} bn{bn} w{warps} s{stages} {'rescale' if rescale else 'partial'}"
                   f"{' bf16dot' if dot_bf16 else ''}")
            try:
                fn = lambda a, b: block_scaled_mm_triton(a, a_s, b, b_s, block_k=block_k, b_rows=b_rows, config=cfg)
                ms = median_ms(rotating(fn, q), warmup_ms=30, rep_ms=80)
                out[key] = round(flops / ms / 1e9, 1)
            except Exception as error:
                out[key] = f"{type(error).__name__}: {str(error)[:120]}"
            print("sweep", key, out[key], flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# 3. quantize kernels vs copy bandwidth
# --------------------------------------------------------------------------------------------------

def quantize_row(recipe_name: str, xs, copy_GBps: float) -> dict:
    from lowbit.config import PrecisionConfig
    from lowbit.kernels.quantize import quantize, quantize_pair
    from lowbit.precision.recipes import build_recipe
    M, K = xs[0].shape
    r = build_recipe(PrecisionConfig(recipe=recipe_name))
    pair_ms = graph_ms(lambda x: quantize_pair(x, r.x, r.x_t), [(x,) for x in xs])
    one_ms = graph_ms(lambda x: quantize(x, r.x), [(x,) for x in xs])
    # fewest bytes: read x (2 B) once, write q (1 B) [+ q^T (1 B)]; scales are negligible
    pair_GBps, one_GBps = M * K * 4 / pair_ms / 1e6, M * K * 3 / one_ms / 1e6
    return {"pair_ms": pair_ms, "pair_GBps": pair_GBps, "pair_vs_copy": pair_GBps / copy_GBps,
            "single_ms": one_ms, "single_GBps": one_GBps, "single_vs_copy": one_GBps / copy_GBps}


def quantize_table(M, K, copy_GBps) -> dict:
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
    out = {}
    for recipe_name in ("fp8_tensorwise", "fp8_rowwise", "fp4_vectorwise", "fp8_blockwise", "nvfp4"):
        try:
            out[recipe_name] = quantize_row(recipe_name, xs, copy_GBps)
        except Exception as error:
            out[recipe_name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return out


# --------------------------------------------------------------------------------------------------
# 4. fwd+bwd of one linear layer
# --------------------------------------------------------------------------------------------------

def fwd_bwd_ms(layer: nn.Module, M, K, N, profile: int = 0, title: str = "") -> dict:
    """Device time of fwd+bwd (CUDA graphs; wall clock without); `profile` > 0: also its top CUDA kernels."""
    sets = []
    for _ in range(ROTATE):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        sets.append((x, torch.randn(M, N, device="cuda", dtype=torch.bfloat16)))

    def step(x, dy):
        y = layer(x)
        return torch.autograd.grad(y, (x, layer.weight), dy)
    for _ in range(3):                      # compile / autotune outside the timing
        step(*sets[0])
    torch.cuda.synchronize()
    timing = {"wall_ms": median_ms(rotating(step, sets))}
    try:
        timing["ms"] = graph_ms(step, sets)
    except Exception as error:              # not capturable: keep the wall-clock figure
        timing["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        timing["ms"] = timing["wall_ms"]
        torch.cuda.synchronize()
    if profile:
        from occ import profile_kernels      # bench/occ.py
        timing["kernels"] = profile_kernels(f"{title} {M}x{K}x{N}", lambda: step(*sets[0]), profile)
    return timing


def make_linear(K, N, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)


class DelayedLinear(nn.Module):
    """A QuantLinear with delayed scaling (lowbit.precision.delayed) as the trainer runs it between two optimizer
    steps: one recorded micro-batch (x's and dy's amaxes kept), after which every forward/backward scales x and dy
    by the history, with no amax pass; `compiled`: the layer under torch.compile (the trainer compiles layers and
    runs the model's hook outside them)."""

    def __init__(self, layer: nn.Module, K, N, compiled: bool):
        from lowbit.precision.delayed import install
        super().__init__()
        self.layer = layer
        self.delayed = install(self, length=16)
        if compiled:
            self.layer = torch.compile(layer)
        device = layer.weight.device
        x = torch.randn(4096, K, device=device, dtype=torch.bfloat16)
        self(x).backward(torch.randn(4096, N, device=device, dtype=torch.bfloat16))     # the record
        self(x)
        if self.delayed.mode != "delayed":
            raise RuntimeError(f"DelayedLinear: the forward after a record runs {self.delayed.mode!r}, not 'delayed'")

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def lowbit_layer(recipe_name: str, K, N, compiled: bool = False) -> nn.Module:
    """recipe_name: a recipe, or RECIPE+SUFFIX with SUFFIX a key of SUFFIXES (e.g. fp8_rowwise+gw_hp); `compiled`:
    under torch.compile."""
    from lowbit.config import PrecisionConfig
    from lowbit.precision.linear import QuantLinear
    from lowbit.precision.recipes import build_recipe
    recipe, _, suffix = recipe_name.partition("+")
    options = SUFFIXES[suffix][0] if suffix else {}
    layer = QuantLinear.from_linear(make_linear(K, N), build_recipe(PrecisionConfig(recipe=recipe, **options)))
    if suffix == "delayed":
        return DelayedLinear(layer, K, N, compiled)
    return torch.compile(layer) if compiled else layer


def torchao_layer(recipe: str, K, N) -> nn.Module:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    model = nn.Sequential(make_linear(K, N))
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe))
    return torch.compile(model[0])      # torchao's float8 training is meant to run under torch.compile


def check_close_to_bf16(layer: nn.Module, K, N) -> float:
    """Relative error of the quantized forward against the bf16 layer in float64 (sanity: fp8 ~3e-2, fp4 ~2e-1)."""
    x = torch.randn(512, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.weight.double().t()
    with torch.no_grad():
        y = layer(x).double()
    return ((y - ref).norm() / ref.norm()).item()


def linear_table(M, K, N, recipes, compile_recipes, deadline: float, profile: int = 0) -> dict:
    rows = {"bf16_nn.Linear": fwd_bwd_ms(make_linear(K, N), M, K, N, profile, "bf16_nn.Linear")}
    torchao = list(TORCHAO_OF.values()) + [SUFFIXES[r.partition("+")[2]][1] for r in recipes if "+" in r]
    torchao = [ao for ao in torchao if ao]
    variants = [(f"torchao_{ao}_compiled", lambda ao=ao: torchao_layer(ao, K, N)) for ao in dict.fromkeys(torchao)]
    variants += [(f"lowbit_{r}", lambda r=r: lowbit_layer(r, K, N)) for r in recipes]
    variants += [(f"lowbit_{r}_compiled", lambda r=r: lowbit_layer(r, K, N, compiled=True)) for r in compile_recipes]
    for name, build in variants:
        if time.time() > deadline:
            rows[name] = {"skipped": "time budget"}
            continue
        torch._dynamo.reset()                              # fresh compile per variant and shape (no recompile limit)
        try:
            layer = build()
            rows[name] = {**fwd_bwd_ms(layer, M, K, N, profile, name),
                          "fwd_relerr_vs_f64": check_close_to_bf16(layer, K, N)}
        except Exception as error:                         # report, keep the other variants
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            traceback.print_exc()
        torch.cuda.empty_cache()
    base, base_wall = rows["bf16_nn.Linear"]["ms"], rows["bf16_nn.Linear"]["wall_ms"]
    for row in rows.values():
        if "ms" in row:
            row["speedup_vs_bf16"] = base / row["ms"]
            row["wall_speedup_vs_bf16"] = base_wall / row["wall_ms"]
    return rows


def print_table(results: dict) -> None:
    print("\n== fwd+bwd speed-up over bf16 nn.Linear (CUDA-graph device time, median ms; [wall-clock x]; bar) ==")
    shapes = list(results["linear"])
    names = sorted({n for s in shapes for n in results["linear"][s]}, key=lambda n: (not n.startswith("bf16"), n))
    print(f"{'variant':34s}" + "".join(f"{s:>28s}" for s in shapes) + "   bar")
    for n in names:
        cells = []
        for s in shapes:
            row = results["linear"][s].get(n, {})
            cells.append(f"{row['ms']:7.3f}ms {row['speedup_vs_bf16']:4.2f}x [{row['wall_speedup_vs_bf16']:4.2f}]"
                         if "ms" in row else f"{('ERR' if 'error' in row else 'skip'):>20s}")
        recipe = n.replace("lowbit_", "").replace("_compiled", "")
        print(f"{n:34s}" + "".join(f"{c:>28s}" for c in cells) + f"   {BARS.get(recipe.partition('+')[0], '')}")
    print("\n== GEMM alone (TFLOP/s) ==")
    for s, rows in results.get("gemm", {}).items():
        print(s, " ".join(f"{k}={v['TFLOPs']:.0f}" if isinstance(v, dict) and "TFLOPs" in v else f"{k}={v}"
                          for k, v in rows.items()))
    print("\n== quantize kernels vs copy ==", json.dumps(results.get("ceilings")))
    for s, rows in results.get("quantize", {}).items():
        for k, v in rows.items():
            if not isinstance(v, dict) or "pair_GBps" not in v:
                print(s, k, v)
                continue
            print(s, k, f"pair {v['pair_GBps']:.0f} GB/s ({v['pair_vs_copy']:.0%} of copy), "
                        f"single {v['single_GBps']:.0f} GB/s ({v['single_vs_copy']:.0%})")


def markdown(results: dict) -> str:
    """The fwd+bwd ratio table and the GEMM / quantize figures as markdown (for docs/RESULTS.md)."""
    shapes = list(results["linear"])
    names = sorted({n for sh in shapes for n in results["linear"][sh]}, key=lambda n: (not n.startswith("bf16"), n))
    lines = [f"Device: {results['device']}, torch {results['torch']}, triton {results.get('triton')}, "
             f"torchao {results.get('torchao')}, {results['date']} UTC, quantize path: {results.get('quantize_path')}.",
             "fwd+bwd of one linear (bf16 x, W, dy), M x K x N; CUDA-graph device time (median ms) and speed-up over "
             "bf16 nn.Linear; [wall-clock speed-up without graphs].", "",
             "| variant | " + " | ".join(shapes) + " | bar |", "| --- |" + " --- |" * (len(shapes) + 1)]
    for n in names:
        cells = []
        for sh in shapes:
            row = results["linear"][sh].get(n, {})
            cells.append(f"{row['ms']:.3f} ms **{row['speedup_vs_bf16']:.2f}x** [{row['wall_speedup_vs_bf16']:.2f}x]"
                         if "ms" in row else ("error" if "error" in row else "skipped"))
        recipe = n.replace("lowbit_", "").replace("_compiled", "")
        bar = f">= {BARS[recipe]}x" if recipe in BARS and n.startswith("lowbit") else ""
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {bar} |")
    lines += ["", "GEMM alone, TFLOP/s (relative error vs float64 with fp32 output where given):", ""]
    for sh, rows in results.get("gemm", {}).items():
        lines.append(f"- {sh}: " + ", ".join(f"{k} {v['TFLOPs']:.0f}" if isinstance(v, dict) and "TFLOPs" in v
                                             else f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in rows.items()))
    ceil = results.get("ceilings", {})
    lines += ["", f"Quantize kernels (x [M, K] bf16 -> fp8/fp4-as-e4m3), device copy {ceil.get('copy_GBps', 0):.0f} GB/s; "
              "bandwidth counted with the fewest bytes (read x once, write q [and q^T] once):", ""]
    for sh, rows in results.get("quantize", {}).items():
        lines.append(f"- {sh}: " + ", ".join(
            f"{k} pair {v['pair_vs_copy']:.0%} / single {v['single_vs_copy']:.0%}" if "pair_vs_copy" in v else f"{k} {v}"
            for k, v in rows.items()))
    return "\n".join(lines)


def run_shapes_in_subprocesses(args) -> None:
    """One process per shape: a failed CUDA-graph capture leaves the CUDA RNG unusable for the rest of its
    process ("Offset increment outside graph capture"), which must not take the other shapes down with it."""
    import subprocess
    merged = None
    out = Path(args.out)
    for index, shape in enumerate(args.shapes.split(",")):
        part_out = out.with_name(f"{out.stem}_{shape}.json")
        parts = args.parts if index == 0 else ",".join(p for p in args.parts.split(",") if p != "sweep")
        command = [sys.executable, __file__, "--shapes", shape, "--recipes", args.recipes, "--parts", parts,
                   "--compile-lowbit", args.compile_lowbit, "--budget-s", str(args.budget_s / len(args.shapes.split(","))),
                   "--quantize-kernels", args.quantize_kernels, "--profile", str(args.profile), "--out", str(part_out)]
        subprocess.run(command, check=False)
        if not part_out.exists():
            continue
        part = json.loads(part_out.read_text())
        if merged is None:
            merged = part
        else:
            for key in ("linear", "gemm", "quantize", "sweep"):
                merged[key].update(part.get(key, {}))
    if merged is None:
        raise SystemExit("no shape produced results")
    out.write_text(json.dumps(merged, indent=1))
    print_table(merged)
    out.with_suffix(".md").write_text(markdown(merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{m}x{k}x{n}" for m, k, n in SHAPES), help="MxKxN,...")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--parts", default="ceilings,sweep,gemm,quantize,linear")
    parser.add_argument("--compile-lowbit", default="", help="recipes,... also timed as torch.compile(QuantLinear)")
    parser.add_argument("--budget-s", type=float, default=300, help="skip remaining variants after this")
    parser.add_argument("--out", default="bench_linear.json", help="results JSON (a directory: its linear.json)")
    parser.add_argument("--markdown-from", help="print the markdown tables of an earlier --out JSON and exit")
    parser.add_argument("--quantize-kernels", choices=["triton", "torch"], default="triton",
                        help="lowbit's quantize kernels (triton) or the PyTorch path, which Inductor fuses under "
                             "torch.compile (torch: what precision.quantize_kernels=auto gives compiled layers)")
    parser.add_argument("--profile", type=int, default=0,
                        help="N > 0: print (and keep in the JSON) each linear variant's top N CUDA kernels")
    args = parser.parse_args()
    if Path(args.out).is_dir():
        args.out = str(Path(args.out) / "linear.json")
    if args.markdown_from:
        print(markdown(json.loads(Path(args.markdown_from).read_text())))
        return
    deadline = time.time() + args.budget_s
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.recompile_limit = 64
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if len(shapes) > 1:
        return run_shapes_in_subprocesses(args)
    recipes = [r for r in args.recipes.split(",") if r]
    parts = args.parts.split(",")
    results = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "torch": torch.__version__, "linear": {}, "gemm": {}, "quantize": {}, "sweep": {}}
    try:
        import triton
        results["triton"] = triton.__version__
        import torchao
        results["torchao"] = torchao.__version__
    except Exception as error:
        results["torchao"] = f"unavailable: {error}"

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    import importlib.util

    from lowbit.kernels.quantize import kernels, set_kernels
    if importlib.util.find_spec("lowbit.kernels.quantize_triton") is None or args.quantize_kernels == "torch":
        set_kernels("torch")      # the PyTorch path (fused by Inductor under torch.compile)
    results["quantize_path"] = "torch reference" if kernels() == "torch" else "triton"
    print("quantize path:", results["quantize_path"], flush=True)
    if "ceilings" in parts:
        results["ceilings"] = measure_ceilings()
        print("ceilings", results["ceilings"], flush=True)
    for M, K, N in shapes:
        key = f"{M}x{K}x{N}"
        for part, fn in (("sweep", lambda: sweep_block_configs(M, K, N)),
                         ("gemm", lambda: gemm_table(M, K, N)),
                         ("quantize", lambda: quantize_table(M, K, results.get("ceilings", {}).get("copy_GBps", 1.0))),
                         ("linear", lambda: linear_table(M, K, N, recipes, [r for r in args.compile_lowbit.split(",") if r], deadline,
                                                        args.profile))):
            if part not in parts or (part == "sweep" and results["sweep"]):
                continue
            try:
                results[part][key] = fn()
            except Exception as error:
                results[part][key] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                traceback.print_exc()
            print(part, key, json.dumps(results[part][key]), flush=True)
            save()
    print_table(results)
    save()
    Path(args.out).with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
