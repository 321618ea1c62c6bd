"""Quantize kernels on a GPU: bit-exactness against the PyTorch reference, bandwidth against a device copy,
QuantLinear of every recipe (Triton path == torch path, torch.compile == eager), and fwd+bwd times.

    python bench/quantize.py [--out DIR]      # no hydra; prints a table, writes quantize_bench.json
    python bench/quantize.py --skip kernels,sweep,sides,bandwidth,linear,llama,timing   # the FP4 block tile sweep only

Bandwidth: the rowwise pair kernel (x along K and x^T along M) reads x twice (amax pass + quantize pass)
and writes two 1-byte copies; "achieved" counts those bytes over the time, compared with the bytes per
second of a device-to-device copy (x.clone: read + write) measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels.quantize import set_kernels  # noqa: E402
from lowbit.kernels import quantize_blocks_triton as blocks  # noqa: E402
from lowbit.kernels.quantize_blocks_triton import quantize_blocks_triton  # noqa: E402
from lowbit.kernels import quantize_triton  # noqa: E402
from lowbit.kernels.quantize_triton import quantize_pair_triton  # noqa: E402
from lowbit.precision.formats import E2M1, E4M3, E5M2  # noqa: E402
from lowbit.precision.linear import QuantLinear  # noqa: E402
from lowbit.config import PrecisionConfig  # noqa: E402
from lowbit.precision.recipes import build_recipe  # noqa: E402
from lowbit.precision.scaling import Quantizer, quantize_reference  # noqa: E402

BASE = dict(grad_format="e4m3", dge=False, dge_k=5.0, dge_clip=3.0, occ=False, occ_quantile=0.99, occ_product="dense",
            occ_scope="tensor", stochastic_rounding=False, hadamard=False, hadamard_size=16, asymmetric=False,
            block_size=128, high_precision=[])
RECIPES = {"fp8_tensorwise": {}, "fp8_rowwise": {}, "fp8_rowwise_e5m2": {"grad_format": "e5m2"},
           "fp8_blockwise": {}, "fp4_vectorwise": {}, "fp4_vectorwise_dge_occ": {"dge": True, "occ": True},
           "nvfp4": {}, "mxfp4": {}}


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn) -> float:
    """GPU time of fn replayed from a CUDA graph (no Python/launch overhead between kernels)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def recipe_of(key):
    name = key.replace("_e5m2", "").replace("_dge_occ", "")
    return build_recipe(PrecisionConfig(recipe=name, **{**BASE, **RECIPES[key]}))


def check_kernels(results):
    mismatches = 0
    for hw in (False, True):            # lowbit's integer rounding, then the float8 cast's own (the default)
        quantize_triton.HARDWARE_CAST = hw
        mismatches += check_kernels_once(hw)
    results["kernel_bitwise_mismatches"] = mismatches
    print(f"kernels: {mismatches} mismatching cases of Triton vs reference")


def check_kernels_once(hw: bool) -> int:
    torch.manual_seed(0)
    mismatches = 0
    for shape in [(333, 517), (8192, 4096), (4096, 14336)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(shape, device="cuda", dtype=dtype) * 4
            x[0, :7] = torch.tensor([0.0, -0.0, 1e-9, 448.0, 1e5, -3.0, 0.5])
            for fmt in (E4M3, E5M2, E2M1):
                for block in ((0, 0), (1, 0)):
                    q = Quantizer(fmt, *block)
                    got, got_t = quantize_pair_triton(x, q, q)
                    want, want_t = quantize_reference(x, q), quantize_reference(x.t(), q)
                    same = torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)) and \
                        torch.equal(got_t.data.view(torch.uint8), want_t.data.view(torch.uint8)) and \
                        torch.equal(got.scale, want.scale) and torch.equal(got_t.scale, want_t.scale)
                    mismatches += not same
                    if not same:
                        print("MISMATCH", shape, dtype, fmt.name, block, "cast rounds" if hw else "")
    for shape in [(333 // 16 * 16 * 8, 512), (8192, 4096)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(shape, device="cuda", dtype=dtype) * 4
            for q in (Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E4M3, 1, 128),
                      Quantizer(E4M3, 128, 128)):
                got, got_t = quantize_blocks_triton(x, q, q)
                want, want_t = quantize_reference(x, q), quantize_reference(x.t(), q)
                same = torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)) and \
                    torch.equal(got_t.data.view(torch.uint8), want_t.data.view(torch.uint8)) and \
                    torch.equal(got.scale, want.scale) and torch.equal(got_t.scale, want_t.scale)
                mismatches += not same
                if not same:
                    print("MISMATCH blocks", shape, dtype, q, "cast rounds" if hw else "")
                    describe_mismatch(x, got, want, "x")
                    describe_mismatch(x.t(), got_t, want_t, "x^T")
    return mismatches


def describe_mismatch(x, got, want, what):
    """Where a kernel's output differs from the reference: scales, then elements (a few, with their inputs)."""
    bad_scale = (got.scale != want.scale).nonzero()
    print(f"  {what}: {len(bad_scale)} of {got.scale.numel()} scales differ", end="")
    for i in bad_scale[:3].tolist():
        print(f"; scale{i} {got.scale[tuple(i)].item()!r} vs {want.scale[tuple(i)].item()!r}", end="")
    bad = (got.data.view(torch.uint8) != want.data.view(torch.uint8)).nonzero()
    print(f"; {len(bad)} of {got.data.numel()} elements differ")
    for i in bad[:4].tolist():
        i = tuple(i)
        print(f"    {what}{list(i)} = {x[i].item()!r}: kernel {got.data[i].float().item()!r}, "
              f"reference {want.data[i].float().item()!r}")


def bandwidth(results):
    rows = []
    for shape in [(8192, 4096), (8192, 14336)]:
        xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        n = xs[0].numel()
        out = torch.empty_like(xs[0])
        i = [0]

        def rotate():
            i[0] = (i[0] + 1) % 3
            return xs[i[0]]
        copy_ms = graph_ms(lambda: out.copy_(xs[0]))
        copy_eager_ms = bench_ms(lambda: out.copy_(rotate()))
        print(f"{str(shape):>14} device copy graph {copy_ms:.3f} ms, eager {copy_eager_ms:.3f} ms")
        copy_gbs = 4 * n / copy_ms / 1e6
        for label, q, qt, bytes_moved in [
            ("rowwise pair (x, x^T) e4m3", Quantizer(E4M3, 1, 0), Quantizer(E4M3, 1, 0), 6 * n),
            ("tensorwise pair e4m3", Quantizer(E4M3, 0, 0), Quantizer(E4M3, 0, 0), 6 * n),
            ("rowwise single e4m3", Quantizer(E4M3, 1, 0), None, 5 * n),
            ("rowwise pair e2m1", Quantizer(E2M1, 1, 0), Quantizer(E2M1, 1, 0), 6 * n),
            ("1x128 blocks pair e4m3", Quantizer(E4M3, 1, 128), Quantizer(E4M3, 1, 128), 4 * n),
            ("128x128 blocks pair e4m3", Quantizer(E4M3, 128, 128), Quantizer(E4M3, 128, 128), 4 * n),
            ("nvfp4 pair (tensor amax + blocks)", Quantizer(E2M1, 1, 16, "nvfp4"), Quantizer(E2M1, 1, 16, "nvfp4"), 6 * n),
            ("mxfp4 pair", Quantizer(E2M1, 1, 32, "pow2"), Quantizer(E2M1, 1, 32, "pow2"), 4 * n),
        ]:
            kernel = quantize_blocks_triton if q.blocked else quantize_pair_triton
            # E4M3: rounding by lowbit's integer steps, then by the float8 cast itself (the default); E2M1: integer
            # steps (rounding by float additions, 8 operations instead of ~20, was no faster: RESULTS, 14th session);
            # 1 x b block pairs: one launch for both sides, then one launch per side (SPLIT_PAIRS)
            # (FP4 1 x b pairs always run as one launch: quantize_blocks_triton.FP4_PAIR_TILES)
            splits = (False, True) if q.blocked and q.block_rows == 1 and q.block_cols >= 32 and q.fmt.name != "e2m1" \
                else (None,)
            for split in splits:
                for hw in ((False, True) if q.fmt.name != "e2m1" else (False,)):
                    quantize_triton.HARDWARE_CAST = hw
                    if split is not None:
                        blocks.SPLIT_PAIRS = split
                        bytes_moved = (6 if split else 4) * n       # x read once per launch, x_q and x^T_q written once
                    name = f"{label} ({'cast rounds' if hw else 'integer steps'})" + \
                        ("" if split is None else " split, one launch per side" if split else " one launch")
                    eager_ms = bench_ms(lambda: kernel(rotate(), q, qt))
                    ms = graph_ms(lambda: kernel(xs[0], q, qt))
                    gbs = bytes_moved / ms / 1e6
                    rows.append(dict(shape=shape, kernel=name, graph_ms=ms, eager_ms=eager_ms, gbs=gbs,
                                     copy_gbs=copy_gbs, ratio=gbs / copy_gbs, bytes_per_element=bytes_moved / n))
                    print(f"{str(shape):>14} {name:<48} graph {ms:6.3f} ms (eager {eager_ms:6.3f}) {gbs:6.0f} GB/s  "
                          f"copy {copy_gbs:5.0f} GB/s  ratio {gbs / copy_gbs:4.2f}", flush=True)
            quantize_triton.HARDWARE_CAST = True
            blocks.SPLIT_PAIRS = True
    results["bandwidth"] = rows


def sides(results):
    """Each pair kernel against its x side alone (quantizer_t=None), in device copies of x: what the transposed
    side costs (ideal: x read once, 1 byte per element written per side, so a pair = 1 copy, one side = 0.75)."""
    rows = []
    for shape in [(8192, 4096), (8192, 14336)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        copy_ms = graph_ms(lambda: out.copy_(x))
        for label, q, kernel in [("mxfp4", Quantizer(E2M1, 1, 32, "pow2"), quantize_blocks_triton),
                                 ("nvfp4", Quantizer(E2M1, 1, 16, "nvfp4"), quantize_blocks_triton),
                                 ("rowwise e2m1", Quantizer(E2M1, 1, 0), quantize_pair_triton),
                                 ("rowwise e4m3", Quantizer(E4M3, 1, 0), quantize_pair_triton)]:
            pair, single = graph_ms(lambda: kernel(x, q, q)), graph_ms(lambda: kernel(x, q, None))
            row = dict(shape=shape, kernel=label, pair_ms=pair, x_side_ms=single, copy_ms=copy_ms)
            tma = ""
            if kernel is quantize_blocks_triton:     # x^T_q by the other store (blocks.TMA_TRANSPOSED), checked first
                switched = blocks.TMA_TRANSPOSED
                key, other = ("pair_pointer_ms", "pointer") if switched else ("pair_tma_ms", "TMA")
                blocks.TMA_TRANSPOSED = not switched
                try:
                    other_t = kernel(x, q, q)[1].data
                    row[key] = graph_ms(lambda: kernel(x, q, q))
                finally:
                    blocks.TMA_TRANSPOSED = switched
                same = torch.equal(other_t.view(torch.uint8), kernel(x, q, q)[1].data.view(torch.uint8))
                tma = f" ({other} store of x^T: {row[key]:.4f} ms, bit-exact {same})"
            rows.append(row)
            print(f"{str(shape):>14} {label}: pair {pair:.4f} ms ({pair / copy_ms:.2f} copies){tma}, x side only "
                  f"{single:.4f} ms ({single / copy_ms:.2f} copies)", flush=True)
    results["sides"] = rows


def sweep(results):
    """Tiles of the two passes of the rowwise and tensorwise pair kernels (E4M3, x and x^T), against the copy."""
    rows = []
    defaults = (quantize_triton.AMAX_TILE, quantize_triton.PAIR_TILE, quantize_triton.PAIR_WARPS)
    for shape in [(8192, 4096), (8192, 14336)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        copy_gbs = 4 * x.numel() / graph_ms(lambda: out.copy_(x)) / 1e6
        for label, q in (("rowwise", Quantizer(E4M3, 1, 0)), ("tensorwise", Quantizer(E4M3, 0, 0))):
            for amax_tile in ((32, 128, 512, 3), (64, 64, 512, 3), (16, 128, 256, 3), (32, 64, 512, 3)):
                for pair_tile, warps in (((64, 64), 4), ((128, 64), 4), ((64, 128), 4), ((128, 128), 8)):
                    quantize_triton.AMAX_TILE, quantize_triton.PAIR_TILE = amax_tile, pair_tile
                    quantize_triton.PAIR_WARPS = warps
                    try:
                        ms = graph_ms(lambda: quantize_pair_triton(x, q, q))
                    except Exception as error:
                        print(f"  {label} amax {amax_tile} pair {pair_tile}/{warps}: {type(error).__name__}")
                        continue
                    ratio = 6 * x.numel() / ms / 1e6 / copy_gbs
                    rows.append(dict(shape=shape, kernel=label, amax_tile=amax_tile, pair_tile=pair_tile, warps=warps,
                                     graph_ms=ms, ratio=ratio))
                    print(f"{str(shape):>14} {label:<10} amax {str(amax_tile):<18} pair {str(pair_tile):<9} "
                          f"{warps} warps: {ms:6.3f} ms  ratio {ratio:4.2f}", flush=True)
    quantize_triton.AMAX_TILE, quantize_triton.PAIR_TILE, quantize_triton.PAIR_WARPS = defaults
    results["sweep"] = rows


BLOCK_TILES = [(r, c, w) for r, c in ((16, 128), (32, 64), (32, 128), (64, 64), (64, 128), (128, 32), (128, 64),
                                       (128, 128), (64, 256), (256, 64)) for w in (4, 8)]


def block_sweep(results, shapes=((8192, 4096), (8192, 14336)), device="cuda", tiles=None, maxnregs=(None,)):
    """Tiles and warps of the FP4 block pair kernel (NVFP4 1 x 16 with its tensor amax pass, MXFP4 1 x 32), one
    launch for both sides and one per side, each checked bit for bit against the PyTorch path first. Ratio: bytes of
    x read once and x_q, x^T_q written once (4 per element) per second, over the device copy's. maxnregs: register
    caps of the pair launch to try at each tile (quantize_blocks_triton.PAIR_MAXNREG; None: ptxas's choice)."""
    rows = []
    blocks.FP4_PAIR_KERNEL = "triton"       # this Triton kernel's tiles (bench/quantize_fp4.py: the Gluon kernel)
    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        copy_gbs = 4 * x.numel() / graph_ms(lambda: out.copy_(x)) / 1e6
        for label, q in (("nvfp4 pair", Quantizer(E2M1, 1, 16, "nvfp4")), ("mxfp4 pair", Quantizer(E2M1, 1, 32, "pow2"))):
            want, want_t = quantize_reference(x, q), quantize_reference(x.t(), q)
            for split, maxnreg in [(split, m) for split in (True, False) for m in maxnregs]:
                for tile in [None] + (BLOCK_TILES if tiles is None else tiles):
                    blocks.TILE, blocks.SPLIT_PAIRS, blocks.PAIR_MAXNREG = tile, split, maxnreg
                    try:
                        got, got_t = quantize_blocks_triton(x, q, q)
                        exact = all(torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                                    and torch.equal(a.scale, b.scale) for a, b in ((got, want), (got_t, want_t)))
                        ms = graph_ms(lambda: quantize_blocks_triton(x, q, q))
                    except Exception as error:
                        print(f"{str(shape):>14} {label} split={split} tile {tile}: {type(error).__name__} {error}"[:200])
                        continue
                    ratio = 4 * x.numel() / ms / 1e6 / copy_gbs
                    rows.append(dict(shape=shape, kernel=label, split=split, tile=tile or "default", graph_ms=ms,
                                     ratio=ratio, exact=exact, maxnreg=maxnreg))
                    print(f"{str(shape):>14} {label} {'split' if split else 'one launch':<10} tile "
                          f"{str(tile or 'default'):<14} {f'maxnreg {maxnreg} ' if maxnreg else ''}{ms:6.3f} ms  "
                          f"ratio {ratio:4.2f}  exact {exact}", flush=True)
            best = min((r for r in rows if r["shape"] == shape and r["kernel"] == label and r["exact"]),
                       key=lambda r: r["graph_ms"], default=None)
            if best:
                print(f"{str(shape):>14} {label} best: {'split' if best['split'] else 'one launch'} tile "
                      f"{best['tile']} maxnreg {best['maxnreg']} {best['graph_ms']:.3f} ms ratio {best['ratio']:.2f}",
                      flush=True)
    blocks.TILE, blocks.SPLIT_PAIRS, blocks.PAIR_MAXNREG = None, True, None
    blocks.FP4_PAIR_KERNEL = os.environ.get("LOWBIT_FP4_PAIR_KERNEL", "triton")
    results["block_sweep"] = rows


def linear_checks(results):
    torch.manual_seed(0)
    rows = {}
    for key in RECIPES:
        recipe = recipe_of(key)
        linear = torch.nn.Linear(512, 384, device="cuda")
        layer = QuantLinear.from_linear(linear, recipe, name=key)
        x = torch.randn(4, 96, 512, device="cuda", requires_grad=True)
        grads = {}
        for path in ("triton", "torch"):
            set_kernels(path)
            x.grad = linear.weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().mean().backward()
            grads[path] = (y.detach().clone(), x.grad.clone(), linear.weight.grad.clone())
        set_kernels("triton")
        same = all(torch.equal(a, b) for a, b in zip(grads["triton"], grads["torch"]))
        exact = linear(x.detach())
        err = ((grads["triton"][0].float() - exact).norm() / exact.norm()).item()
        if key not in ("fp8_rowwise", "fp4_vectorwise_dge_occ"):
            rows[key] = dict(triton_equals_torch=same, rel_err_vs_bf16=err)
            print(f"linear {key:<24} triton==torch {same}  rel.err {err:.4f}")
            continue
        try:
            compiled = torch.compile(layer)
            x.grad = linear.weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yc = compiled(x)
            yc.float().square().mean().backward()
            rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
            compile_ok = dict(y_rel_diff=rel(yc, grads["triton"][0]), dx_rel_diff=rel(x.grad, grads["triton"][1]),
                              dw_rel_diff=rel(linear.weight.grad, grads["triton"][2]))
        except Exception as error:  # report, keep going
            compile_ok = f"error: {type(error).__name__}: {str(error)[:200]}"
        rows[key] = dict(triton_equals_torch=same, rel_err_vs_bf16=err, compile_equals_eager=compile_ok)
        print(f"linear {key:<24} triton==torch {same}  rel.err {err:.4f}  compile==eager {compile_ok}")
    results["linear"] = rows


def linear_timing(results):
    rows = []
    M = 8192
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        base = torch.nn.Linear(K, N, bias=False, device="cuda")

        def step(module):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = module(x)
                y.backward(dy)
            return run
        bf16_ms = bench_ms(step(base))
        try:
            bf16_graph_ms = graph_ms(step(base))
        except Exception as error:
            bf16_graph_ms = None
            print("graph capture failed:", repr(error)[:200])
        row = dict(M=M, K=K, N=N, bf16_ms=bf16_ms, bf16_graph_ms=bf16_graph_ms)
        for key in ("fp8_tensorwise", "fp8_rowwise", "fp4_vectorwise", "fp4_vectorwise_dge_occ", "fp8_blockwise",
                    "nvfp4", "mxfp4"):
            try:
                layer = QuantLinear.from_linear(base, recipe_of(key))
                row[key] = bf16_ms / bench_ms(step(layer))
                if bf16_graph_ms is not None and key != "fp4_vectorwise_dge_occ":   # OCC's sparse ops sync
                    row[key + "_graph"] = bf16_graph_ms / graph_ms(step(layer))
            except Exception as error:
                row[key] = f"error: {type(error).__name__}: {str(error)[:120]}"
        rows.append(row)
        print(f"fwd+bwd M={M} K={K} N={N}: bf16 {bf16_ms:.3f} ms (graph {bf16_graph_ms}); speed-up " +
              ", ".join(f"{k} {v:.2f}x" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                        if k not in ("M", "K", "N", "bf16_ms", "bf16_graph_ms")))
    results["linear_timing"] = rows


def llama_training(results):
    """A small HF Llama converted by lowbit.precision.apply, 30 AdamW steps under bf16 autocast per recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from lowbit import precision
    rows = {}
    for key in ("bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise", "fp4_vectorwise", "fp4_vectorwise_dge_occ",
                "nvfp4", "mxfp4"):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
        model = LlamaForCausalLM(config)
        name = key.replace("_dge_occ", "")
        options = {**BASE, **RECIPES.get(key, {})}
        cfg = PrecisionConfig(recipe=name, include=["*.layers.*"], exclude=["*lm_head*", "*embed*"], **options)
        model = precision.apply(model, cfg).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.randint(0, 64, (8, 256), device="cuda")       # a learnable, low-entropy token stream
        data = (data + torch.arange(256, device="cuda")) % 512
        losses = []
        try:
            for _ in range(30):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=data, labels=data).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            rows[key] = dict(first=losses[0], last=losses[-1], finite=all(map(lambda v: v == v, losses)))
        except Exception as error:
            rows[key] = f"error: {type(error).__name__}: {str(error)[:200]}"
        print(f"llama {key:<24} {rows[key]}")
    results["llama_training"] = rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    results["triton"] = triton.__version__
    print(results)
    for name, fn in [("kernels", check_kernels), ("sweep", sweep), ("block_sweep", block_sweep), ("sides", sides),
                     ("bandwidth", bandwidth), ("linear", linear_checks),
                     ("llama", llama_training), ("timing", linear_timing)]:
        if name in args.skip.split(","):
            continue
        try:
            fn(results)
        except Exception as error:
            import traceback
            traceback.print_exc()
            results[f"{name}_error"] = repr(error)
        Path(args.out, "quantize_bench.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
