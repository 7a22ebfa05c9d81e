"""One training per run directory: an exclusive lock held for the life of a training.

Two trainings in one run directory would write the same `.tmp-step_N`
checkpoint directories, append to the same metrics.jsonl and delete each
other's checkpoints through retention. So rank 0 takes an exclusive POSIX
record lock (`fcntl.lockf`) on `RUN_DIR/.lock` before anything is written into
the run directory, and holds it until the training ends; the other ranks of
the same job are covered by it.

Why a kernel lock: the kernel drops it when the process ends, however it ends
(kill -9, the OOM killer, a Slurm requeue), so a dead run never leaves the
directory stuck and a requeued attempt finds it free. Why lockf rather than
flock: a record lock belongs to the process and is not inherited by forked
children (data-loader workers), which could otherwise outlive a killed
trainer holding its lock; NFS also implements record locks across hosts. The
holder's PID, host and start time are written into the file only so that a
refused start can say who holds it. On a filesystem without lock support
(ENOLCK, EOPNOTSUPP) the run warns once and goes on unlocked.

Within one process the lock is re-entrant (keyed by the directory's real
path): tests build several trainers of one run in a single process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from looptrain.config.schema import RecipeError

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
# real path of a run directory -> (fd holding its lock, the outermost directory this start created, or None)
_held: dict[str, tuple[int, Optional[str]]] = {}


class RunDirBusy(RecipeError):
    """Another live training holds the run directory's lock."""


def _holder(fd: int) -> str:
    """Who holds the lock, as written into the file by the holder (best effort)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {info['pid']} on host {info['host']}, started {when}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its PID yet"


def acquire(run_dir: str) -> None:
    """Lock `run_dir` (created if missing) for this process, or raise RunDirBusy naming the holder."""
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    created = None
    parent = os.path.abspath(run_dir)
    while not os.path.isdir(parent):  # the outermost directory that makedirs is about to create
        created, parent = parent, os.path.dirname(parent)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            holder = _holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another training ({holder}); wait for it to finish, "
                "or pick another name= for this run"
            ) from None
        os.close(fd)
        if err.errno not in _UNSUPPORTED:
            raise
        print(f"looptrain: warning: {path}: this filesystem does not support file locks ({err.strerror}); "
              "the run directory is not protected against a second training", file=sys.stderr, flush=True)
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = (fd, created)


def release(run_dir: str) -> None:
    """Drop this process's lock on `run_dir` (no-op when it holds none).

    A start that failed before writing anything leaves no run directory: one
    that this process created and that holds only the lock file is removed
    (while still locked, so that no other start can be using it).
    """
    held = _held.pop(os.path.realpath(run_dir), None)
    if held is None:
        return
    fd, created = held
    try:
        if created is not None and os.listdir(run_dir) == [LOCK_FILE]:
            os.unlink(os.path.join(run_dir, LOCK_FILE))
            path = os.path.abspath(run_dir)
            while True:  # the run directory, then the parents this start created (out_dir), while empty
                os.rmdir(path)
                if path == created:
                    break
                path = os.path.dirname(path)
    except OSError:
        pass  # something else is in there (someone else's file appeared meanwhile): leave it alone
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def hold_run_dir(run_dir: str, env) -> None:
    """Take the run directory's lock for a job: rank 0 locks, every rank learns the outcome.

    Collective under torch.distributed, so that a refused start ends every
    rank with the same exit status instead of leaving peers in a collective.
    """
    error = ""
    if env.is_main:
        try:
            acquire(run_dir)
        except RunDirBusy as err:
            error = str(err)
    if env.distributed:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if error else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not error:
            error = (f"run directory {run_dir} is in use by another training (rank 0 names it); wait, "
                     "or pick another name=")
    if error:
        raise RunDirBusy(error)
