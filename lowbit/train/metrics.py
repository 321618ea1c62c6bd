"""Throughput, MFU and memory of a training step."""
from __future__ import annotations

import resource
import sys
import time

import torch


class StepClock:
    """Step times without stalling the host: a mark is a CUDA event on the current stream, so the time between two
    marks is the device's time for the work queued between them, read once that work has run. On CPU, where work
    runs as it is queued, a mark is the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float,
               peak_flops: float | None) -> dict[str, float]:
    """tokens/s over all ranks and per device; MFU against the device's datasheet peak when known."""
    per_second = tokens / max(seconds, 1e-9)
    out = {"perf/tokens_per_s": per_second, "perf/tokens_per_s_per_device": per_second / world_size,
           "perf/step_time_s": seconds}
    if peak_flops:
        out["perf/mfu"] = per_second / world_size * flops_per_token / peak_flops
    return out


def memory(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset: allocated and reserved on CUDA, process RSS on CPU (GiB)."""
    gib = 2.0 ** 30
    if device.type == "cuda":
        stats = {"mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
                 "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem/peak_rss_gib": rss_kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2.0 ** 20}
