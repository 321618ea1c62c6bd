"""Step profiling (`trainer.profile_step=N`, `trainer.profile_steps=K`): steps N .. N+K-1 of the run under
torch.profiler, written to `{run_dir}/profile/`: a Chrome trace per rank (open in Perfetto or chrome://tracing) and
a table of the operators and kernels with the most device time (CPU time on a CPU). The log line gives the profiled
steps' wall time next to the time the GPU spent in kernels, the first question when tokens/s falls short of what the
kernels alone would give: a GPU busy for much less than the wall time waits on the host (launch overhead, Python,
synchronisation). The profiler's own overhead inflates the wall time of profiled steps a little.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("lowbit")


class StepProfiler:
    """Profile steps [first, first + count) of a run (steps counted from 0, as the trainer's state.step before the
    step runs). `enter(step)` before a step, `exit(step)` after it."""

    def __init__(self, first: int, count: int, out_dir: str | Path, rank: int, device: torch.device, top: int = 30):
        if count < 1:
            raise ValueError(f"trainer.profile_steps={count}: profile at least one step (or set "
                             f"trainer.profile_step=-1 to profile nothing)")
        self.first, self.last = first, first + count - 1
        self.out_dir, self.rank, self.device, self.top = Path(out_dir), rank, device, top
        self._prof = None
        self.written = False

    def enter(self, step: int) -> None:
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, record_shapes=False)
        self._prof.__enter__()
        self._start = time.perf_counter()

    def starts_at(self, step: int) -> bool:
        return step == self.first

    def ends_at(self, step: int) -> bool:
        """Whether `exit(step)` ends the profile (the trainer reads its queued steps first)."""
        return self._prof is not None and step == self.last

    def exit(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_s = time.perf_counter() - self._start
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.write(prof, wall_s)
        self.written = True

    def close(self, step: int) -> None:
        """At the end of fit (`step`: the steps done): write a profile cut short (trainer.stop_after_steps), or say
        that none was taken (the run ended before trainer.profile_step or resumed past it)."""
        if self._prof is not None:
            self.last = step - 1
            self.exit(self.last)
        elif not self.written:
            log.warning("trainer.profile_step=%d: this run covered no step from it (it ended or resumed at step %d); "
                        "nothing profiled", self.first, step)

    def write(self, prof, wall_s: float) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        cuda = self.device.type == "cuda"
        table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                               row_limit=self.top)
        steps = self.last - self.first + 1
        summary = f"steps {self.first}-{self.last}: wall {wall_s * 1e3 / steps:.1f} ms per step"
        if cuda:
            kernels_ms = device_kernel_ms(prof.events()) / steps
            summary += (f", GPU kernels {kernels_ms:.1f} ms per step (busy {kernels_ms / (wall_s * 1e3 / steps):.0%} "
                        f"of the wall time)")
        if cuda:        # a host-bound step: which operators spend the CPU time (Python, launches, allocations)
            table += "\n\nBy CPU time (with what they launch):\n" + averages.table(sort_by="cpu_time_total",
                                                                                  row_limit=self.top)
        top = self.out_dir / f"top_rank{self.rank}.txt"
        top.write_text(summary + "\n\n" + table + "\n")
        log.info("profile: %s; trace %s, top operators %s", summary, trace, top)
        return trace


def device_kernel_ms(events) -> float:
    """Milliseconds the device spent in kernels and copies: the sum of the device-side events' durations (kernels
    on several streams that overlap count twice; the trainer runs one compute stream)."""
    from torch.autograd import DeviceType
    return sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
