"""End-to-end training throughput and MFU of lowbit presets, measured side by side in one run.

Each variant runs the real trainer (`python train.py +exp=... overrides`) for a few steps in its own
process; the median tokens/s and MFU over the steps after warm-up (compilation, autotuning) come
from its metrics.jsonl. Ratios are against the first variant. An override `env:NAME=VALUE` sets an environment
variable of that variant's process instead; `entry:PATH` runs PATH (a script that wraps train.py, e.g.
bench/amax_ceiling.py) instead of train.py; `nproc:N` launches it on N local GPUs with torchrun (tokens/s are the
whole job's, as rank 0 logs them).

    python bench/train_throughput.py --steps 12 --out docs/RESULTS.md \
        --variant "bf16=+exp=bf16_llama" --variant "fp8_rowwise=+exp=fp8_llama precision=fp8_rowwise"

--profile N runs step N of each variant under torch.profiler (trainer.profile_step; --profile-steps K profiles
steps N to N+K-1 as one window; they are left out of the median) and copies its top-kernel table to --profile-dir
as NAME_top.txt; the table's first line, the step's wall
time against the GPU's kernel time, is printed with the variant's figures; --trace also keeps its Chrome trace
(NAME_trace.json.gz) for bench/trace_breakdown.py.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_variant(overrides: list[str], steps: int, warmup: int, run_dir: Path, timeout: int,
                profile: int = -1, profile_steps: int = 1) -> dict:
    entry = next((o[6:] for o in overrides if o.startswith("entry:")), "train.py")
    nproc = next((int(o[6:]) for o in overrides if o.startswith("nproc:")), 1)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    command = [*launcher, str(ROOT / entry), *overrides, f"trainer.max_steps={steps}",
               "trainer.eval_every=-1", "trainer.eval_at_start=false", "trainer.save_every=-1",
               "trainer.export=false", "logger.backends=[jsonl]", f"run_dir={run_dir}"]
    if profile >= 0:
        command += [f"trainer.profile_step={profile}", f"trainer.profile_steps={profile_steps}"]
    env = dict(os.environ, **dict(o[4:].split("=", 1) for o in overrides if o.startswith("env:")))
    command = [o for o in command if not o.startswith(("env:", "entry:", "nproc:"))]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish {steps} steps within --timeout {timeout} s"}
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout)[-1500:]}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r][warmup:]
    profiled = range(profile + 1, profile + 1 + profile_steps) if profile >= 0 else range(0)
    rows = [r for r in rows if r["step"] not in profiled]        # the profiled steps (step N is logged as N + 1)
    pick = lambda key: statistics.median(r[key] for r in rows) if rows and key in rows[0] else float("nan")
    # A second clock: the host's wall time between the rows of consecutive timed steps, against the trainer's
    # per-step device time (CUDA events) behind perf/tokens_per_s. A row is written once its step has run and the
    # host has queued the next one (the last row, written at the end, is left out: it follows no queued step).
    pairs = [(a, b) for a, b in zip(rows[:-1], rows[1:-1]) if b["step"] == a["step"] + 1 and "time" in a]
    wall_tokens_per_s = (sum(b["perf/tokens_per_s"] * b["perf/step_time_s"] for _, b in pairs)
                         / sum(b["time"] - a["time"] for a, b in pairs)) if pairs else float("nan")
    result = {"tokens_per_s": pick("perf/tokens_per_s"), "wall_tokens_per_s": wall_tokens_per_s,
              "mfu": pick("perf/mfu"), "peak_gib": pick("mem/peak_allocated_gib"),
              "loss": rows[-1]["loss"] if rows else float("nan"),
              "steps_timed": len(rows)}
    top = run_dir / "profile" / "top_rank0.txt"
    if profile >= 0 and top.is_file():
        result["profile"] = top.read_text().splitlines()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (space separated)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, help="append a markdown table to this file")
    parser.add_argument("--profile", type=int, default=-1, help="profile this step of each variant (-1: none)")
    parser.add_argument("--profile-steps", type=int, default=1, help="profile this many steps from --profile on")
    parser.add_argument("--profile-dir", type=Path, default=Path("."), help="where NAME_top.txt tables go")
    parser.add_argument("--trace", action="store_true", help="also copy each profiled step's Chrome trace there, "
                        "gzipped, as NAME_trace.json.gz (read it with bench/trace_breakdown.py)")
    args = parser.parse_args()
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variant:
            name, _, overrides = spec.partition("=")
            results[name] = run_variant(shlex.split(overrides), args.steps, args.warmup, Path(tmp) / name, args.timeout,
                                        args.profile, args.profile_steps)
            profiled = Path(tmp) / name / "profile"
            if (profiled / "top_rank0.txt").is_file():
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                (args.profile_dir / f"{name}_top.txt").write_text((profiled / "top_rank0.txt").read_text())
            if args.trace and (profiled / "trace_rank0.json").is_file():       # for bench/trace_breakdown.py
                with open(profiled / "trace_rank0.json", "rb") as src, \
                        gzip.open(args.profile_dir / f"{name}_trace.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            print(name, results[name], flush=True)
    base = next(iter(results.values())).get("tokens_per_s")
    lines = [f"\n### Training throughput, {device}, {datetime.date.today()}\n",
             f"`python bench/train_throughput.py --steps {args.steps}` (median of steps {args.warmup + 1}-{args.steps}; "
             f"wall: the host clock over the consecutive timed steps)\n",
             "| variant | overrides | tokens/s | vs first | wall tokens/s | MFU | peak GiB | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, (name, r) in zip(args.variant, results.items()):
        overrides = spec.partition("=")[2]
        if "error" in r:
            lines.append(f"| {name} | `{overrides}` | failed: {r['error'][-200:]!r} | | | | | |")
            continue
        lines.append(f"| {name} | `{overrides}` | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{r['wall_tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['loss']:.3f} |")
    lines += [f"\nprofile of step {args.profile}, {name}: {r['profile']}" for name, r in results.items() if "profile" in r]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
