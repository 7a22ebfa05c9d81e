"""`train.profile` and `train.memory_snapshot`: where the time and the memory of a step go.

train.profile: {start: S, steps: N}
    torch.profiler records steps S+1 .. S+N (1-based, counted over the whole
    run, so a resumed run past the window records nothing) on every rank and
    writes, per rank, into RUN_DIR/profile/:
      rank{R}.steps{S+1}-{S+N}.pt.trace.json  Chrome trace (Perfetto, chrome://tracing,
                                              TensorBoard's profiler plugin)
      rank{R}.steps{S+1}-{S+N}.ops.txt        the operators by total time
    CPU activity always, CUDA kernels on GPU. Leave a few steps before the
    window (S >= 2): the first steps include one-off work (allocator growth,
    compilation, the data loader starting).

train.memory_snapshot: true
    On GPU, the CUDA caching allocator's history is recorded from the first
    step and RUN_DIR/memory/rank{R}.snapshot.pickle is written when training
    ends (any exit: finished, halted, preempted); drop it on
    https://pytorch.org/memory_viz. On every device, RUN_DIR/memory/rank{R}.json
    reports the peak memory: the process's peak resident set (VmHWM) and the
    steps at which it grew, plus torch.cuda's peak allocated/reserved bytes on GPU.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

GIB = 2**30
HISTORY_ENTRIES = 100_000  # CUDA allocator events kept (a ring buffer)


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size (VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


class StepProfiler:
    """Drives the profiler window and the memory report from the training loop (one call per step edge)."""

    def __init__(self, run_dir: str, rank: int, device: torch.device, start: int, steps: int,
                 memory_snapshot: bool):
        self.run_dir = run_dir
        self.rank = rank
        self.device = device
        self.first = start + 1  # first traced step (1-based)
        self.last = start + steps
        self.enabled = steps > 0
        self.memory = memory_snapshot
        self._prof: Optional[torch.profiler.profile] = None
        self._traced_until = start
        self._step_range: Optional[torch.profiler.record_function] = None
        self._rss_steps: list[tuple[int, float]] = []  # (step, peak RSS GiB) whenever the peak grew
        self._closed = False
        if memory_snapshot and device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)

    @classmethod
    def from_recipe(cls, recipe, rank: int, device: torch.device) -> "StepProfiler":
        t = recipe.train
        return cls(recipe.run_dir, rank, device, t.profile.start, t.profile.steps, t.memory_snapshot)

    def _trace_name(self) -> str:
        return f"rank{self.rank}.steps{self.first}-{self.last}"

    def step_begin(self, step: int) -> None:
        """Before running step `step + 1` (`step` steps are done)."""
        if self.enabled and self._prof is None and step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self._prof.start()
        if self._prof is not None:  # one named range per step: the timeline shows where each step starts
            self._step_range = torch.profiler.record_function(f"train step {step + 1}")
            self._step_range.__enter__()

    def step_end(self, step: int) -> None:
        """After step `step` (1-based) is done."""
        if self._prof is not None:
            self._traced_until = step
            self._step_range.__exit__(None, None, None)
            if step >= self.last:
                self._finish_trace()
        if self.memory:
            rss = peak_rss_bytes()
            if rss is not None and (not self._rss_steps or rss / GIB > 1.01 * self._rss_steps[-1][1]):  # grew by > 1%
                self._rss_steps.append((step, rss / GIB))

    def _finish_trace(self) -> None:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.stop()
        out = os.path.join(self.run_dir, "profile")
        os.makedirs(out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out, self._trace_name() + ".pt.trace.json"))
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        with open(os.path.join(out, self._trace_name() + ".ops.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        if self.rank == 0:
            print(f"looptrain: profile of steps {self.first}-{self.last} written to {out}/ "
                  "(open the .pt.trace.json at https://ui.perfetto.dev)", flush=True)

    def close(self) -> None:
        """When training ends, however it ends: finish an open window, write the memory report."""
        if self._closed:
            return
        self._closed = True
        if self._prof is not None:  # the run ended inside the window: keep what was recorded
            self.last = self._traced_until
            self._finish_trace()
        if not self.memory:
            return
        out = os.path.join(self.run_dir, "memory")
        os.makedirs(out, exist_ok=True)
        rss = peak_rss_bytes()
        report = {
            "rank": self.rank,
            "device": str(self.device),
            "peak_rss_gib": rss / GIB if rss is not None else None,
            "peak_rss_grew_at_step": [{"step": s, "peak_rss_gib": g} for s, g in self._rss_steps],
        }
        if self.device.type == "cuda":
            report["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            report["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
            snapshot = os.path.join(out, f"rank{self.rank}.snapshot.pickle")
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            report["cuda_snapshot"] = snapshot
        with open(os.path.join(out, f"rank{self.rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
