"""Where the Gluon target kernel's time goes, by leaving one stage out (device METHOD: "time variants that leave one
stage out ... and take differences"): each variant is a copy of lowbit/kernels/attention_target_gluon.py with one
stage disabled, timed in the same process as the kernel itself at each shape. Outputs of the variants are wrong by
construction; only their times mean anything. Without a GPU, `--compile-only` compiles every variant for sm_90.

    python bench/attention_probe.py --seqs 8192 32768 --kv-heads 32 8      # on an sm_90 GPU
    python bench/attention_probe.py --compile-only                         # any machine: each variant compiles

Variants: no_pool (the pooling epilogue's loop), no_out (the output's TMA store, skipped), no_epilogue (both),
no_exp (the exponentials of the online softmax: P = the scaled scores), no_rowmax (the key-tile loop's row-maximum
stores to the scratch); pool8/pool32/pool64 (key blocks per pooling step; correct outputs). Timed by CUDA graph
replays (device time alone; `--timer sync` from an idle device).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCE = Path(__file__).resolve().parents[1] / "lowbit" / "kernels" / "attention_target_gluon.py"
PATCHES = {
    "no_pool": [("for kb0 in range(0, key_blocks, POOL):", "for kb0 in range(0, key_blocks * 0, POOL):")],
    "no_out": [("        _tma_store(o_desc, [", "        if m0 < 0:\n            _tma_store(o_desc, [")],
    "no_exp": [("p = gl.exp2(s * scale_log2 - gl.expand_dims(m_i, 1))", "p = s * scale_log2 - gl.expand_dims(m_i, 1)"),
               ("p_b = gl.exp2(s_b * scale_log2 - gl.expand_dims(m_i, 1))",
                "p_b = s_b * scale_log2 - gl.expand_dims(m_i, 1)"),
               ("p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))",
                "p = s * scale_log2 - gl.expand_dims(m_new, 1)"),
               ("p_b = gl.exp2(s_b * scale_log2 - gl.expand_dims(m_new, 1))",
                "p_b = s_b * scale_log2 - gl.expand_dims(m_new, 1)")],
}
PATCHES["no_epilogue"] = PATCHES["no_pool"] + PATCHES["no_out"]
# other steps of the pooling epilogue (correct outputs; key blocks per step: fewer, longer L2 round trips)
PATCHES.update({f"pool{n}": [("POOL = gl.constexpr(16)", f"POOL = gl.constexpr({n})")] for n in (8, 32, 64)})
# the key-tile loop's stores of each gate block's row maxima to the scratch (predicated off: no value exceeds +inf)
PATCHES["no_rowmax"] = [("gl.store(row_max_ptr, block_max)",
                         "gl.store(row_max_ptr, block_max, mask=block_max > float('inf'))")]


def variant_module(name: str, directory: Path):
    """The kernel module with variant `name`'s stage disabled (every patch must apply: the kernel's text is checked,
    so a renamed line fails loudly instead of timing the unpatched kernel)."""
    text = SOURCE.read_text()
    for old, new in PATCHES.get(name, []):
        if old not in text:
            raise SystemExit(f"variant {name}: {old!r} is not in {SOURCE.name}; update bench/attention_probe.py")
        text = text.replace(old, new)
    path = directory / f"attention_target_gluon_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--variants", nargs="+", default=["kernel", *PATCHES])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--timer", default="graph", choices=["graph", "sync"])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        modules = {name: variant_module(name, Path(tmp)) for name in args.variants}
        if args.compile_only:
            for name, module in modules.items():
                binary = module.hopper_binary(tile_n=128, stages=2)
                print(f"{name}: {binary['registers']} registers, {binary['spill_bytes']} B spilled, "
                      f"{sum(sum(loop.values()) for loop in module.key_tile_loops(binary['sass']))} instructions in "
                      f"the key-tile loops")
            return
        import torch
        import torch.nn.functional as F

        import lowbit.kernels.attention_target_gluon as gluon_kernel
        from bench.attention import TIMER, timed
        TIMER[:] = [args.timer]
        from lowbit.kernels.attention_target import attention_block_target_gluon
        rows = []
        for kv_heads in args.kv_heads:
            for seq in args.seqs:
                q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, kv_heads, seq, 128, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                row = {"seq": seq, "kv_heads": kv_heads, "sdpa_ms": timed(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 32))}
                for name, module in modules.items():
                    gluon_kernel.attention_target_fa3_kernel = module.attention_target_fa3_kernel
                    row[name] = timed(lambda: attention_block_target_gluon(q, k, v, 64))
                rows.append(row)
                print(json.dumps({key: round(value, 4) if isinstance(value, float) else value
                                  for key, value in row.items()}), flush=True)
        print("\n| S | heads (kv) | SDPA ms | " + " | ".join(f"{name} ms" for name in modules) + " |")
        print("|---|---|---|" + "---|" * len(modules))
        for row in rows:
            print(f"| {row['seq']} | 32 ({row['kv_heads']}) | {row['sdpa_ms']:.3f} | "
                  + " | ".join(f"{row[name]:.3f}" for name in modules) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
