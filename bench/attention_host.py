"""Host-side cost of one fused-target call (Python argument handling, descriptors, allocations, launches): launches
per second without synchronising, and cProfile's top functions, for the Gluon and Triton target kernels and SDPA.
The sync timer of bench/attention.py counts this work; the graph timer does not."""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from lowbit.kernels.attention_target import attention_block_target_gluon, attention_block_target_triton


def host_us(fn, calls: int = 200) -> float:
    """Microseconds of host time per call, the device kept busy (no sync inside)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--profile", type=int, default=45, help="top cProfile entries of the Gluon call")
    args = parser.parse_args()
    q, k, v = (torch.randn(1, 32, args.seq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    calls = {"gluon": lambda: attention_block_target_gluon(q, k, v, 64),
             "triton": lambda: attention_block_target_triton(q, k, v, 64),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, fn in calls.items():
        print(f"{name}: {host_us(fn):.1f} us host per call (S={args.seq})", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(50):
        calls["gluon"]()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
