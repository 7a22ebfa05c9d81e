"""How many intra-op CPU threads each rank uses (`train.threads: auto | N`).

PyTorch's default is one thread per physical core of the whole machine, in
every process. On a shared or allocated machine that oversubscribes: several
ranks, other jobs, or a container or Slurm allocation smaller than the host
all fight for the same cores, and a loaded 2-core machine ran 2.5x slower per
step with the default than with 1 thread. `auto` therefore takes

1. `OMP_NUM_THREADS` when it is set (an explicit choice; torchrun sets 1 for
   several ranks per node, `looptrain train --nproc N` sets cores / N);
2. else Slurm's `SLURM_CPUS_PER_TASK` (already per rank);
3. else the cores this process may use -- the smallest of its CPU affinity
   mask (`os.sched_getaffinity`) and the cgroup CPU quota (containers) --
   divided by the ranks on this node (`LOCAL_WORLD_SIZE`), at least 1.

An integer N uses N threads, whatever the environment says.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Union

CGROUP_V2_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str = "") -> Optional[int]:
    """Whole CPUs the cgroup quota allows (rounded up), or None without a quota."""
    text = _read(root + CGROUP_V2_MAX)
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    quota, period = _read(root + CGROUP_V1_QUOTA), _read(root + CGROUP_V1_PERIOD)
    if quota and period and int(quota) > 0 and int(period) > 0:
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def available_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def _positive_int(text: str, name: str) -> int:
    from looptrain.config.schema import RecipeError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise RecipeError(f"{name}={text!r}: must be a whole number of threads >= 1 (or unset it)")
    return value


def choose_threads(setting: Union[str, int], env: Optional[Mapping[str, str]] = None,
                   cores: Optional[int] = None) -> tuple[int, str]:
    """(threads per rank, why) for `train.threads` in this environment (module docstring)."""
    from looptrain.config.schema import RecipeError

    env = os.environ if env is None else env
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise RecipeError(f"train.threads: must be 'auto' or a number of threads >= 1, got {setting}")
        return setting, "train.threads"
    if setting != "auto":
        raise RecipeError(f"train.threads: must be 'auto' or a number of threads >= 1, got {setting!r}")
    if env.get("OMP_NUM_THREADS"):
        return _positive_int(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    if env.get("SLURM_CPUS_PER_TASK"):
        return _positive_int(env["SLURM_CPUS_PER_TASK"], "SLURM_CPUS_PER_TASK"), "SLURM_CPUS_PER_TASK"
    cores = available_cores() if cores is None else cores
    local_ranks = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, cores // local_ranks), f"{cores} available cores / {local_ranks} local rank(s)"


def apply_threads(setting: Union[str, int]) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; returns (threads, why)."""
    import torch  # lazy for start-up time

    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    return threads, why
