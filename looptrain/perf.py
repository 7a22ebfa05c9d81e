"""Throughput, model FLOPs utilisation and memory.

MFU = (model FLOPs per token x tokens per second per device) / peak FLOP/s.
Peaks for known GPUs are dense bf16 tensor-core numbers from vendor sheets; on
CPU the peak is measured once by a short matmul probe, so CPU MFU reads as
"share of what this machine's matmul achieves".
"""

from __future__ import annotations

import functools
import time

import torch

# Dense (non-sparse) peak FLOP/s per device for bf16 / fp32.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},  # SXM
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "B200": {"bf16": 2250e12, "fp32": 80e12},
    "GH200": {"bf16": 989e12, "fp32": 67e12},
}


@functools.lru_cache(maxsize=None)
def cpu_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul on this CPU (best of a few runs).

    The operands come from a private generator: drawing them from the global RNG
    would shift the dropout stream of the run that happens to measure first (the
    result is cached), so two runs of one recipe in one process would differ.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, generator=generator)
    b = torch.randn(size, size, dtype=dtype, generator=generator)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAKS, key=len, reverse=True):
            if key in name:
                return GPU_PEAKS[key]["bf16" if precision == "bf16" else "fp32"]
        return float("nan")
    return cpu_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    except (ImportError, OSError):
        return float("nan")
