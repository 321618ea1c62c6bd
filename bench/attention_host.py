"""Host-side cost of one fused-target call (Python argument handling, descriptors, allocations, launches), which
bench/attention.py's sync timer counts and its graph timer does not: microseconds of host time per call for the
Gluon and Triton target kernels and SDPA, then the Gluon wrapper's parts. The device is kept busy by a sleep kernel
queued first, so each figure is the host's time alone, not the device's.

    python bench/attention_host.py          # on an sm_90 GPU
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from lowbit.kernels.attention_target import (attention_block_target_gluon, attention_block_target_triton,
                                             check_attention_inputs, gluon_supported)


def host_us(fn, calls: int = 100) -> float:
    """Median over 5 rounds of the host's microseconds per call of `fn`, queued behind a sleeping device."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        torch.cuda._sleep(200_000_000)                  # ~0.1 s of device time: every launch below only queues
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from lowbit.kernels.attention_target_gluon import shared_layout

    seq = args.seq
    q, k, v = (torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    target = torch.rand(1, 32, seq // 64, seq // 64, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count       # the row-maximum scratch: a slot per SM
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, S={seq}, 32 heads, head dim 128, bf16")
    calls = {
        "Gluon kernel, whole call": lambda: attention_block_target_gluon(q, k, v, 64),
        "Triton kernel, whole call": lambda: attention_block_target_triton(q, k, v, 64),
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "  Gluon call: input checks": lambda: (check_attention_inputs(q, k, v, 64), gluon_supported(q, k, 64)),
        "  Gluon call: 4 TMA descriptors": lambda: [
            TensorDescriptor.from_tensor(t.view(-1, seq, 128), [1, rows, 128], shared_layout(rows, 128, True))
            for t, rows in ((q, 64), (k, 128), (v, 128), (q, 64))],
        "  Gluon call: 3 allocations (one zeroed)": lambda: (
            torch.empty_like(q), torch.zeros(target.numel() + 4, device="cuda"),
            torch.empty((sms, seq // 64 + 1, 128), device="cuda")),
        "  Gluon call: normalising the target": lambda: target / target.sum(-1, keepdim=True),
    }
    for name, fn in calls.items():
        print(f"{name}: {host_us(fn):.1f} us host per call", flush=True)


if __name__ == "__main__":
    main()
