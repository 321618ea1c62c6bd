"""Throughput and longest sequence of llama_1b under one GPU, TP=2 (bf16 / fp8 rowwise) and Ulysses=2.

No Hydra: runs on the device image with the wheelhouse. One process per GPU, e.g.
  torchrun --nproc_per_node=1 bench/parallel.py --layout single
  torchrun --nproc_per_node=2 bench/parallel.py --layout tp2 --precision fp8_rowwise
  torchrun --nproc_per_node=2 bench/parallel.py --layout ulysses2 --find-max-seq
Prints (and appends to $OUT/parallel.jsonl when OUT is set) one JSON row per measurement:
tokens/s per GPU at --seq-len, and with --find-max-seq the longest power-of-two sequence (from
--search-from, at --search-batch sequences) whose forward+backward+AdamW step fits. Compare rows of one run/device: ratio = layout / single.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def build(layout: str, precision: str, device: torch.device):
    torch.manual_seed(0)
    with device:   # initialise on the GPU: a CPU init of 1.2B parameters takes ~15 s per build
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, attn_implementation="sdpa"))
    if precision != "bf16":
        from lowbit import precision as lowbit_precision
        from lowbit.config import PrecisionConfig
        model = lowbit_precision.apply(model, PrecisionConfig(recipe=precision))
    world = dist.get_world_size()
    if layout.startswith("tp"):
        from torch.distributed.device_mesh import init_device_mesh
        from lowbit.parallel.tensor import apply_tensor_parallel
        mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("tp",))
        model = apply_tensor_parallel(model, mesh, sequence_parallel=layout.endswith("sp"))
    elif layout.startswith("ulysses"):
        from lowbit.parallel.ulysses import apply_ulysses
        model = apply_ulysses(model, dist.group.WORLD)
    return model


def step(model, optimizer, input_ids, tensor_parallel: bool) -> float:
    from lowbit.objectives.base import next_token_nll
    from lowbit.parallel.tensor import loss_context, to_local
    with loss_context(tensor_parallel):
        with torch.autocast("cuda", dtype=torch.bfloat16):   # Ulysses: each rank scores its own shard
            nll, count = next_token_nll(model, input_ids)
        loss = nll / count
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return to_local(loss.detach()).item()


def measure(args, seq_len: int, steps: int) -> dict:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model = build(args.layout, args.precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not args.layout.startswith("tp"))
    tensor_parallel = args.layout.startswith("tp")
    generator = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, LLAMA_1B["vocab_size"], (args.batch, seq_len), generator=generator).to(device)
               for _ in range(2)]
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(model, optimizer, batches[i % 2], tensor_parallel)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = step(model, optimizer, batches[i % 2], tensor_parallel)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    world = dist.get_world_size()
    tokens_per_gpu = args.batch * seq_len * steps / elapsed / world   # every rank of a TP/Ulysses group shares one batch
    return {"layout": args.layout, "precision": args.precision, "gpus": world, "batch": args.batch,
            "seq_len": seq_len, "tokens_per_s_per_gpu": round(tokens_per_gpu, 1), "loss": round(loss, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__}


def fits(args, seq_len: int) -> bool:
    """Whether every rank completes one training step at `seq_len` (agreed over all ranks)."""
    try:
        measure(args, seq_len, steps=1)
        ok = torch.ones(1, device="cuda")
    except torch.OutOfMemoryError:
        ok = torch.zeros(1, device="cuda")
    torch.cuda.empty_cache()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def report(row: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "parallel.jsonl"), "a") as handle:
                handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="single", choices=["single", "tp2", "tp2_sp", "ulysses2"])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--find-max-seq", action="store_true")
    parser.add_argument("--max-seq-limit", type=int, default=262144)
    parser.add_argument("--search-batch", type=int, default=0, help="batch of the search (default --batch)")
    parser.add_argument("--search-from", type=int, default=0, help="first length the search tries (default --seq-len)")
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    report(measure(args, args.seq_len, args.steps))
    if args.find_max_seq:
        args.warmup, args.batch = 0, args.search_batch or args.batch
        seq_len, largest = args.search_from or args.seq_len, None
        while seq_len <= args.max_seq_limit and fits(args, seq_len):
            largest, seq_len = seq_len, seq_len * 2
        report({"layout": args.layout, "precision": args.precision, "gpus": dist.get_world_size(),
                "batch": args.batch, "largest_seq_len_fitting": largest, "next_tried": seq_len})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
