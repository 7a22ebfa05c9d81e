"""Throughput, model FLOPs utilisation and memory.

MFU = (model FLOPs per token x tokens per second per device) / peak FLOP/s.

MFU is only reported against a true upper bound, so that it cannot exceed
100% by construction: `train.peak_tflops` when the recipe sets it, else the
vendor's dense peak of a known GPU for the precision the matmuls run in
(bf16 tensor cores; TF32 when fp32 matmuls are allowed to use it). On CPU,
and on a GPU missing from the table, there is no MFU unless
`train.peak_tflops` is set: a matmul probe measures what the machine did at
that moment, not what it can do, and on a loaded machine it gave "MFU" of
166-211% once the load moved.
"""

from __future__ import annotations

import math
import time

import torch

# Dense (non-sparse) peak FLOP/s per device for bf16 / TF32 / fp32, from vendor data sheets.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12},  # SXM
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "B200": {"bf16": 2250e12, "tf32": 1100e12, "fp32": 80e12},
    "GH200": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12},
}


def matmul_precision_key(precision: str) -> str:
    """Which peak applies: bf16 autocast, fp32 matmuls on TF32 tensor cores, or plain fp32."""
    if precision == "bf16":
        return "bf16"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float:
    """Peak FLOP/s per device that MFU is computed against; NaN when there is no trustworthy one
    (CPU, or a GPU missing from GPU_PEAKS) and the recipe sets none: MFU is then not reported."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAKS, key=len, reverse=True):
            if key in name:
                return GPU_PEAKS[key][matmul_precision_key(precision)]
    return float("nan")


class RunClock:
    """Wall time since this process started training and the time left at the current pace.

    The ETA extrapolates from every step run so far in this attempt (validation
    and checkpoints included), so it is a wall-clock estimate, not a compute one.
    """

    def __init__(self, start_step: int, total_steps: int):
        self.start = time.perf_counter()
        self.start_step = start_step
        self.total_steps = total_steps

    def read(self, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        done = step - self.start_step
        eta = elapsed / done * max(0, self.total_steps - step) if done > 0 else math.nan
        return {"time/elapsed_s": elapsed, "time/eta_s": eta}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    except (ImportError, OSError):
        return float("nan")
