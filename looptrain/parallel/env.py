"""Who am I in the job: rank, world, device -- from torchrun, srun or deepspeed.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK (deepspeed
names the ranks per node LOCAL_SIZE); under a
bare `srun` only SLURM_* variables exist, so they are translated here (the
first node of SLURM_JOB_NODELIST becomes MASTER_ADDR). Variables that
mosaicml-streaming reads (LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are
exported before any dataset is built.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host_of_nodelist(nodelist)


def first_host_of_nodelist(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def export_slurm_rendezvous() -> None:
    """Translate SLURM_* into the torch.distributed variables when a launcher did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("SLURM_NTASKS_PER_NODE", str(max(1, ntasks // max(1, nnodes))))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # The batch script picks a port that is free on the first node (LOOPTRAIN_MASTER_PORT, see
    # looptrain.launch); a port derived from the job id would collide with other services.
    job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", os.environ.get("LOOPTRAIN_MASTER_PORT") or str(20000 + job_id % 20000))


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Read the launcher's variables, pick the device, and join the process group when world > 1."""
    export_slurm_rendezvous()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "LOCAL_SIZE" in os.environ:
        # The deepspeed launcher names it LOCAL_SIZE and leaves any inherited
        # LOCAL_WORLD_SIZE in place; streaming reads the latter, so it must agree.
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    # mosaicml-streaming requires these even in a single process.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 10000))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank, world, local_rank, local_world, device)


def _collect_before_teardown() -> None:
    gc.collect()


def shutdown_distributed() -> None:
    """Barrier, destroy the process groups, and free the objects that hold them before exit.

    Without the barrier a fast rank can tear down its gloo connections while a
    peer still uses them. Even after `destroy_process_group`, a DeviceMesh
    that survives into interpreter teardown (FSDP2's DTensor parameters hold
    one, inside reference cycles that only the garbage collector frees)
    aborts the process in roughly one exit of five to ten on gloo ("terminate called
    without an active exception", status 134). Collecting garbage before
    teardown -- now and again at exit, when the trainer's frames are gone --
    destroys those objects while the interpreter is still whole.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
            gc.collect()
            atexit.unregister(_collect_before_teardown)
            atexit.register(_collect_before_teardown)
