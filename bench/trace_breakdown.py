"""Where a profiled training step's GPU time goes, from the Chrome trace the trainer writes (trainer.profile_step).

Kernel time by kind (FP8 and bf16 GEMMs, attention, Inductor's fused kernels split by whether they quantize, aten
elementwise, optimizer, ...), the kernels with the most time under their full names, and the GPU's idle time: its
total, how it spreads over the step (in tenths of the wall time) and the longest gaps with the kernels around them.

    python bench/trace_breakdown.py run/profile/trace_rank0.json[.gz] [--top 40]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

# (kind, substrings of a kernel's name); the first kind that matches names it. Inductor's kernels (triton_*)
# quantize when they take an amax, clamp to the format's range or feed _scaled_mm
INDUCTOR = [("inductor, quantizing", ("amax", "scaled_mm", "clamp", "float8")), ("inductor, other", ("",))]
KINDS = [
    ("gemm fp8", ("_qq", "f8f8", "e4m3", "fp8_gemm", "block_gemm")),    # cuBLAS nvjet_sm90_qq*: FP8 A and B
    ("gemm bf16", ("nvjet", "gemm", "cutlass", "sm90_xmma", "ampere_bf16")),
    ("attention", ("sdpa", "flash", "fmha", "attention", "_attn")),
    ("optimizer", ("multi_tensor", "fused_adam", "adam")),
    ("softmax / loss", ("softmax", "nll_loss", "cross_entropy")),
    ("reduction", ("reduce_kernel",)),
    ("elementwise / copy", ("elementwise", "copy", "fill", "memcpy", "memset", "cat_")),
    ("triton, lowbit", ("_kernel",)),    # lowbit's own kernels: _quantize_*_kernel, _hadamard_*_kernel, ...
]


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, needles in INDUCTOR if lower.startswith("triton_") else KINDS:
        if any(needle in lower for needle in needles):
            return kind
    return "other"


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        events = json.load(handle)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                  key=lambda e: e["ts"])


def breakdown(kernels: list[dict], top: int) -> str:
    start, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    wall = end - start
    by_kind, by_name = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for k in kernels:
        by_kind[kind_of(k["name"])] += k["dur"]
        by_name[k["name"]] += k["dur"]
        calls[k["name"]] += 1
    busy = sum(by_kind.values())
    lines = [f"{len(kernels)} kernels over {wall / 1e3:.1f} ms (first kernel start to last end); kernel time "
             f"{busy / 1e3:.1f} ms (overlaps counted twice)", "", "| kind | ms | share |", "|---|---|---|"]
    lines += [f"| {kind} | {us / 1e3:.1f} | {us / busy:.1%} |" for kind, us in by_kind.most_common()]
    lines += ["", f"| kernel (top {top}) | kind | calls | ms | us per call |", "|---|---|---|---|---|"]
    lines += [f"| `{name[:150]}` | {kind_of(name)} | {calls[name]} | {us / 1e3:.2f} | {us / calls[name]:.1f} |"
              for name, us in by_name.most_common(top)]
    # idle: time covered by no kernel, in tenths of the wall time, and the longest gaps
    gaps, covered_to = [], start
    previous = None
    for k in kernels:
        if k["ts"] > covered_to:
            gaps.append((k["ts"] - covered_to, covered_to, previous, k["name"]))
        if k["ts"] + k["dur"] > covered_to:
            covered_to, previous = k["ts"] + k["dur"], k["name"]
    idle = sum(g[0] for g in gaps)
    tenths = [0.0] * 10
    for length, at, _, _ in gaps:
        tenths[min(int((at - start) / wall * 10), 9)] += length
    lines += ["", f"GPU idle {idle / 1e3:.1f} ms of {wall / 1e3:.1f} ({idle / wall:.1%}) in {len(gaps)} gaps; "
              f"by tenth of the step (ms): " + " ".join(f"{t / 1e3:.1f}" for t in tenths), "",
              "| gap us | at ms | after | before |", "|---|---|---|---|"]
    lines += [f"| {length:.0f} | {(at - start) / 1e3:.1f} | `{(after or '')[:60]}` | `{before[:60]}` |"
              for length, at, after, before in sorted(gaps, reverse=True)[:12]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    for path in args.trace:
        kernels = load(path)
        if not kernels:
            raise SystemExit(f"{path}: no GPU kernels in this trace (a CPU run, or profiled without CUDA activity)")
        print(f"## {path}\n\n{breakdown(kernels, args.top)}\n")


if __name__ == "__main__":
    main()
