"""Peak GPU memory and tokens/s of the memory savers, side by side in one run (issue 6 bars).

For one model (default llama_1b, fp32 master weights, bf16 autocast, SDPA, eager or with --compile each
decoder layer compiled) and one batch shape
(default seq 4096, micro-batch 1, 4 micro-batches per step), each configuration trains a few steps on
random tokens and reports: peak allocated / reserved GiB over a step, the peak activation memory (peak
of one micro-batch's forward+backward minus what was allocated before it, over the micro-batches after the
first, whose backward also allocates AdamW's gradient buffers), tokens/s, and the ratios to
the baseline (AdamW with gradient accumulation). Then, per configuration, the largest micro-batch (at
the given seq) and the largest sequence (at micro-batch 1) that fit, by doubling until out of memory.

No hydra: needs torch, transformers and omegaconf (lowbit.config's MISSING) only.

    python bench/memory.py --model llama_1b --seq 4096 --micro-batches 4 --out docs/RESULTS.md
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lowbit.config import MemoryConfig  # noqa: E402
from lowbit.memory import apply as apply_memory  # noqa: E402
from lowbit.objectives.base import next_token_nll  # noqa: E402
from lowbit.optim.adama import AdamA  # noqa: E402

GIB = 2.0 ** 30

# name -> (optimizer, MemoryConfig fields)
CONFIGS = {
    "adamw+accum (baseline)": ("adamw", {}),
    "adama": ("adama", {}),
    "adama (PyTorch fold)": ("adama_unfused", {}),
    "adama (summed)": ("adama_summed", {}),             # optim.second_moment=summed, global clipping as AdamW's
    "adama (summed)+ckpt full": ("adama_summed", {"checkpointing": "full"}),
    "adamw+offload": ("adamw", {"offload": True}),
    "adamw+offload(large, layers 0-7)": ("adamw", {"offload": True, "offload_min_bytes": 32 << 20,
                                                  "offload_layers": ["model.layers.[0-7]"]}),
    "adamw+ckpt full": ("adamw", {"checkpointing": "full"}),
    "adamw+ckpt selective": ("adamw", {"checkpointing": "selective"}),
    "adama+offload": ("adama", {"offload": True}),
    "adama+ckpt full": ("adama", {"checkpointing": "full"}),
    "adama+ckpt selective": ("adama", {"checkpointing": "selective"}),
    "adama+selective(0-7)+offload(8-15)": ("adama", {"checkpointing": "selective", "offload": True,
                                                     "checkpoint_layers": ["model.layers.[0-7]"],
                                                     "offload_layers": ["model.layers.[89]", "model.layers.1?"]}),
}
FIT_CONFIGS = ["adamw+accum (baseline)", "adama", "adamw+offload", "adamw+ckpt full", "adamw+ckpt selective",
               "adama+ckpt full", "adama+selective(0-7)+offload(8-15)"]


def build(model_name: str, optimizer_name: str, memory: dict, max_positions: int, compile_layers: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = yaml.safe_load((ROOT / "conf" / "model" / f"{model_name}.yaml").read_text())
    values = {**spec["config"], "vocab_size": 49152, "use_cache": False,
              "max_position_embeddings": max(max_positions, spec["config"].get("max_position_embeddings", 0))}
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.train()
    if compile_layers:                  # as the trainer does with model.compile=true: compile, then checkpoint
        from lowbit.train.run import compile_layers as compile_each
        compile_each(model)
    apply_memory(model, MemoryConfig(**memory))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    elif optimizer_name == "adama_summed":
        optimizer = AdamA(groups, lr=1e-4, betas=(0.9, 0.95), second_moment="summed", clip_global=1.0)
    else:
        optimizer = AdamA(groups, lr=1e-4, betas=(0.9, 0.95), clip_per_tensor=1.0,
                          fused=optimizer_name != "adama_unfused")
    return model, optimizer


def train_step(model, optimizer, micro_batch: int, seq: int, micro_batches: int, compiled: bool = False) -> dict:
    """One optimizer step; peak memory over it and the largest activation peak of one micro-batch. The loss is the
    trainer's (lowbit.objectives.base.next_token_nll; `compiled` as with model.compile: no float32 copy of the
    logits)."""
    torch.cuda.synchronize()
    step_peak = 0
    activation_peak = 0
    start = time.perf_counter()
    for index in range(micro_batches):
        input_ids = torch.randint(0, 49152, (micro_batch, seq), device="cuda")
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, count = next_token_nll(model, input_ids, compiled=compiled)
        loss = nll / count
        (loss / micro_batches).backward()
        if isinstance(optimizer, AdamA):
            optimizer.finish_micro_batch()
        peak = torch.cuda.max_memory_allocated()
        # the first micro-batch of a step also allocates AdamW's gradient buffers (set to None by the last step's
        # zero_grad) while its backward runs: that is not activation memory, so with several micro-batches the
        # activation peak comes from the later ones (AdamA frees each gradient in its hook, in every micro-batch)
        if index > 0 or micro_batches == 1:
            activation_peak = max(activation_peak, peak - before)
        step_peak = max(step_peak, peak)
    torch.cuda.reset_peak_memory_stats()
    if not isinstance(optimizer, AdamA):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    step_peak = max(step_peak, torch.cuda.max_memory_allocated())
    return {"seconds": seconds, "peak_alloc": step_peak, "activation_peak": activation_peak,
            "loss": loss.item()}


def release() -> None:
    """Return cached device and pinned-host memory so the next configuration starts clean."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    torch.cuda.reset_peak_memory_stats()


def measure(args, name: str) -> dict:
    optimizer_name, memory = CONFIGS[name]
    model, optimizer = build(args.model, optimizer_name, memory, args.seq, args.compile)
    torch.cuda.reset_peak_memory_stats()
    runs = [train_step(model, optimizer, args.micro_batch, args.seq, args.micro_batches, args.compile)
            for _ in range(args.steps)]
    measured = runs[1:]                                   # the first step allocates optimizer state
    seconds = sorted(r["seconds"] for r in measured)[len(measured) // 2]
    offloader = getattr(model, "_lowbit_offloader", None)
    row = {"config": name, "peak_alloc_gib": max(r["peak_alloc"] for r in measured) / GIB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "activation_peak_gib": max(r["activation_peak"] for r in measured) / GIB,
           "tokens_per_s": args.micro_batch * args.seq * args.micro_batches / seconds,
           "offloaded_gib_per_step": (offloader.bytes_offloaded / GIB / args.steps) if offloader else 0.0,
           "loss": measured[-1]["loss"]}
    if args.profile:
        profile_step(args, name, model, optimizer)
    if isinstance(optimizer, AdamA):
        optimizer.remove_hooks()
    del model, optimizer, offloader
    release()
    return row


def host_link_gbps(gib: float = 1.0) -> dict:
    """Measured pinned-host <-> GPU copy rates (GB/s): one way each, then both ways at once on two streams --
    the ceiling that activation offload's transfers have to fit under."""
    n = int(gib * GIB)
    device = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    device_in = torch.empty_like(device)

    def seconds(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 3

    def both():
        with torch.cuda.stream(streams[0]):
            host[0].copy_(device, non_blocking=True)
        with torch.cuda.stream(streams[1]):
            device_in.copy_(host[1], non_blocking=True)

    d2h = n / seconds(lambda: host[0].copy_(device, non_blocking=True)) / 1e9
    h2d = n / seconds(lambda: device_in.copy_(host[1], non_blocking=True)) / 1e9
    duplex = 2 * n / seconds(both) / 1e9
    del device, host, device_in
    release()
    return {"d2h_gbps": d2h, "h2d_gbps": h2d, "both_ways_gbps": duplex}


def profile_step(args, name: str, model, optimizer) -> None:
    """One more step under torch.profiler: where the time goes (GPU kernels, CPU ops) and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = train_step(model, optimizer, args.micro_batch, args.seq, args.micro_batches, args.compile)["seconds"]
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"profile {name}: step {seconds * 1e3:.1f} ms (profiled), GPU kernels {gpu_us / 1e3:.1f} ms "
          f"({gpu_us / 1e4 / seconds:.0f}% busy)", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=12), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


def combine(name: str, measured: list[dict]) -> dict:
    """One row per config over the rounds: the median tokens/s (the spread kept), the largest memory figures."""
    if any("oom" in m for m in measured):
        return {"config": name, "oom": True}
    speeds = sorted(m["tokens_per_s"] for m in measured)
    row = {**measured[0], "tokens_per_s": speeds[len(speeds) // 2], "tokens_per_s_range": [speeds[0], speeds[-1]]}
    for key in ("peak_alloc_gib", "peak_reserved_gib", "activation_peak_gib"):
        row[key] = max(m[key] for m in measured)
    return row


def reset_after_oom(model, optimizer) -> None:
    """Drop what a failed micro-batch left behind so the same model can try the next size."""
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, AdamA):
        optimizer._pending.clear()
        optimizer.reset_grad_norm()
        for state in optimizer.state.values():
            state["folded"] = 0
    offloader = getattr(model, "_lowbit_offloader", None)
    if offloader is not None:
        offloader.waiting.clear()
        offloader.current_call = None


def largest(args, name: str, deadline: float, host_gib_per_token: float) -> dict:
    """Doubling search on one model: largest micro-batch at --seq, largest seq at micro-batch 1.

    Each trial is one micro-batch forward/backward plus the optimizer step, with the optimizer state
    already allocated. ">=N" = the search stopped early (time budget or the host-memory cap of offload).
    """
    optimizer_name, memory = CONFIGS[name]
    model, optimizer = build(args.model, optimizer_name, memory, 131072)
    out = {}
    for key, sizes in (("max_micro_batch", [(b, args.seq) for b in (1, 2, 4, 8, 16, 32, 64)]),
                       ("max_seq", [(1, s) for s in (4096, 8192, 16384, 32768, 65536, 131072)])):
        best = None
        for micro_batch, seq in sizes:
            if time.perf_counter() > deadline:
                best = f">={best} (time)"
                break
            if host_gib_per_token * micro_batch * seq > args.max_host_gib:
                best = f">={best} (host cap)"
                break
            fitted = True
            try:
                train_step(model, optimizer, micro_batch, seq, 1, args.compile)
            except torch.OutOfMemoryError:
                fitted = False                       # the traceback (and its tensors) dies here
            if not fitted:
                reset_after_oom(model, optimizer)
                release()
                break
            best = micro_batch if key == "max_micro_batch" else seq
            release()
        out[key] = best
    del model, optimizer
    release()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_1b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8,
                        help="steps per config; the first is dropped, the median of the rest timed")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--fit-configs", nargs="*", default=FIT_CONFIGS)
    parser.add_argument("--fit-seconds", type=float, default=180.0, help="time budget of the fit search")
    parser.add_argument("--max-host-gib", type=float, default=80.0, help="skip fit trials offloading more")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer, as the trainer does with model.compile=true")
    parser.add_argument("--repeat", type=int, default=1, help="rounds through the configs (median tokens/s)")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each config")
    parser.add_argument("--json", default="")
    parser.add_argument("--out", default="", help="append a markdown section to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/memory.py needs a CUDA GPU (peak GPU memory is what it measures)")
    device = torch.cuda.get_device_name()
    link = host_link_gbps()
    print(json.dumps({"host_link": link}), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for _ in range(args.repeat):        # rounds through every config, so drift hits them all alike
        for name in args.configs:
            try:
                runs[name].append(measure(args, name))
            except torch.OutOfMemoryError:
                runs[name].append({"config": name, "oom": True})
            release()
            print(json.dumps(runs[name][-1]), flush=True)
    rows = [combine(name, measured) for name, measured in runs.items()]
    base = rows[0]
    for row in rows:
        if "oom" in row or "oom" in base:
            continue
        row["peak_vs_base"] = row["peak_alloc_gib"] / max(base["peak_alloc_gib"], 1e-12)
        row["activation_vs_base"] = row["activation_peak_gib"] / max(base["activation_peak_gib"], 1e-12)
        row["throughput_vs_base"] = row["tokens_per_s"] / max(base["tokens_per_s"], 1e-12)
    host_per_token = {r["config"]: r.get("offloaded_gib_per_step", 0.0) / (args.micro_batch * args.seq * args.micro_batches)
                      for r in rows}
    fit_rows = []
    for name in args.fit_configs:
        deadline = time.perf_counter() + args.fit_seconds / max(1, len(args.fit_configs))
        fit_rows.append({"config": name, **largest(args, name, deadline, host_per_token.get(name, 0.0))})
        print(json.dumps(fit_rows[-1]), flush=True)
    report = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model, "seq": args.seq, "micro_batch": args.micro_batch,
              "micro_batches": args.micro_batches, "repeat": args.repeat, "compiled": args.compile, "rows": rows, "fits": fit_rows,
              "host_link": link}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    table = markdown(report)
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")


def markdown(report: dict) -> str:
    lines = [f"### bench/memory.py -- {report['model']}, seq {report['seq']}, micro-batch {report['micro_batch']} x "
             f"{report['micro_batches']} micro-batches, bf16 autocast, fp32 master, "
             f"{'compiled decoder layers' if report.get('compiled') else 'eager'}; tokens/s: median of "
             f"{report['repeat']} round(s) through the configs (range in brackets)",
             f"{report['device']}, torch {report['torch']}, {report['date']}; pinned host link: "
             f"{report['host_link']['d2h_gbps']:.1f} GB/s to host, {report['host_link']['h2d_gbps']:.1f} GB/s to "
             f"the GPU, {report['host_link']['both_ways_gbps']:.1f} GB/s both ways at once", "",
             "| config | peak alloc GiB | peak reserved GiB | activation peak GiB | tokens/s | peak vs base | "
             "activation vs base | throughput vs base |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "oom" in r:
            lines.append(f"| {r['config']} | OOM | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | "
                     f"{r['activation_peak_gib']:.2f} | {r['tokens_per_s']:.0f} [{r['tokens_per_s_range'][0]:.0f}-"
                     f"{r['tokens_per_s_range'][1]:.0f}] | {r.get('peak_vs_base', 0):.3f} | "
                     f"{r.get('activation_vs_base', 0):.3f} | {r.get('throughput_vs_base', 0):.3f} |")
    lines += ["", "| config | largest micro-batch at seq | largest seq at micro-batch 1 |", "|---|---|---|"]
    for r in report["fits"]:
        lines.append(f"| {r['config']} | {r['max_micro_batch']} | {r['max_seq']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
