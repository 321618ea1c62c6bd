"""The next-token loss over a micro-batch's logits, forward + backward, measured side by side in one run: the
former form (shifted slice, then a float32 copy), the current eager form (last position ignored, no slice copy) and
the compiled one the trainer uses with model.compile (lowbit.objectives.base.compiled_token_nll).

    python bench/loss.py [--batch 2 --seq 4096 --vocab 49152]

Prints ms per call and the peak memory each adds on top of the logits (CUDA; on a CPU only the times).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lowbit.objectives.base import compiled_token_nll, token_nll


def sliced_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The form used up to 2026-12-03."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")


def measure(fn, logits, input_ids, repeats: int) -> tuple[float, float, float]:
    """(ms per forward + backward, value, peak GiB above the start)."""
    cuda = logits.is_cuda
    for _ in range(2):                                     # compile / warm up
        fn(logits, input_ids).backward()
        logits.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    for _ in range(repeats):
        value = fn(logits, input_ids)
        value.backward()
        logits.grad = None
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / repeats * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else float("nan")
    return ms, value.item(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = (3 * torch.randn(args.batch, args.seq, args.vocab, device=device)).to(torch.bfloat16).requires_grad_()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"next-token loss fwd+bwd, {name}, logits [{args.batch}, {args.seq}, {args.vocab}] bf16")
    print("| form | ms | vs sliced | peak GiB above the logits | loss |\n|---|---|---|---|---|")
    first = None
    for label, fn in (("sliced + float (before)", sliced_nll), ("ignore last, eager", token_nll),
                      ("ignore last, compiled", compiled_token_nll)):
        ms, value, peak = measure(fn, logits, input_ids, args.repeats)
        first = first or ms
        print(f"| {label} | {ms:.3f} | {first / ms:.2f}x | {peak:.2f} | {value:.6g} |", flush=True)


if __name__ == "__main__":
    main()
