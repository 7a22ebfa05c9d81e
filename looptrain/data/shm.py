"""mosaicml-streaming's shared memory on a host shared by many jobs.

Every StreamingDataset registers a numeric prefix and creates shared-memory
segments `/dev/shm/NNNNNN_{locals,barrier,next_epoch,...}` plus file locks
`$TMPDIR/NNNNNN_{barrier,cache}_filelock`. A clean exit unlinks the
segments; the file locks always stay, and a killed job leaves everything.

Two things here, both done by a job's local leader while it holds one
host-wide lock (`/dev/shm/looptrain-streaming-prefix.lock`), so that no job
ever sees another half-way:

- choosing and registering the prefix (`get_shm_prefix`, installed in place
  of streaming's own, which lets every rank scan on its own and races);
- removing what killed jobs left (`remove_stale_streaming_state`).

streaming's `clean_stale_shared_memory()` is not usable on a shared host: it
unlinks every segment from prefix 0 up to the first unused prefix, including
the live segments of jobs running beside us. Here a prefix counts as stale
only when all of its segments belong to this user, are older than
`min_age_s` (a prefix being set up right now is never touched), and none is
mapped by any process of this user (read from /proc/PID/maps: a live
StreamingDataset keeps its segments mapped until it exits). A file lock is
removed only when no segment with its prefix remains. Where /proc is not
readable (not Linux), nothing is removed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^(\d{6,})_[a-z_]+$")
_FILELOCK = re.compile(r"^(\d{6,})_(barrier|cache)_filelock$")


def _mapped_shm_names() -> set[str] | None:
    """Names of /dev/shm files mapped by any of this user's processes, or None if unknown."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    uid = os.getuid()
    names: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(entry / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find("/dev/shm/")
                    if at >= 0:
                        names.add(line[at + len("/dev/shm/") :].split(" (deleted)")[0].strip())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process just exited
        except PermissionError:
            if entry.name == str(os.getpid()):
                return None
            continue
    return names


def remove_stale_streaming_state(min_age_s: float = 30.0, tmp_dir: str | None = None) -> list[str]:
    """Delete the segments and file locks of prefixes that no live process uses; return what went.

    Safe beside running jobs only while holding the host lock (`host_lock()`),
    as `get_shm_prefix` does: otherwise a prefix found stale here could be
    registered afresh by another job between the check and the unlink.
    """
    if not SHM_DIR.is_dir():
        return []
    uid = os.getuid()
    now = time.time()
    segments: dict[str, list[Path]] = {}
    live_prefixes: set[str] = set()
    for path in SHM_DIR.iterdir():
        match = _SEGMENT.match(path.name)
        if not match:
            continue
        prefix = match.group(1)
        segments.setdefault(prefix, []).append(path)
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if info.st_uid != uid or now - info.st_mtime <= min_age_s:
            live_prefixes.add(prefix)
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    removed: list[str] = []
    for prefix, paths in segments.items():
        if prefix in live_prefixes or any(p.name in mapped for p in paths):
            live_prefixes.add(prefix)
            continue
        for path in paths:
            try:
                path.unlink()
                removed.append(str(path))
            except (FileNotFoundError, PermissionError):
                pass
    lock_dir = Path(tmp_dir or tempfile.gettempdir())
    try:
        locks = list(lock_dir.iterdir())
    except OSError:
        return removed
    for path in locks:
        match = _FILELOCK.match(path.name)
        if not match or match.group(1) in live_prefixes:
            continue
        try:
            info = path.stat()
            if info.st_uid == uid and now - info.st_mtime > min_age_s:
                path.unlink()
                removed.append(str(path))
        except (FileNotFoundError, PermissionError):
            pass
    return removed


# ------------------------------------------------------------ prefix registration
#
# streaming (0.13) lets every rank scan /dev/shm on its own for the first free
# prefix, then the local leader registers it and the other local ranks check
# that they found the same one. Two jobs starting together on one host race:
# a rank finds a prefix that another job's leader takes a moment later, and
# the job fails with "shared memory registered does not match local leader",
# or, worse, its ranks attach to the other job's barrier and hang. Here the
# local leader alone chooses and registers the prefix while it holds a
# host-wide lock, and tells its local ranks which one through the process
# group; nothing else is left to chance.

LOCK_NAME = "looptrain-streaming-prefix.lock"
_PREFIX = re.compile(r"^(\d{6,})_")


def _prefix_lock_path() -> Path:
    """The host-wide lock: in /dev/shm (shared by every job on the machine, whatever its TMPDIR)."""
    return SHM_DIR / LOCK_NAME if SHM_DIR.is_dir() else Path(tempfile.gettempdir()) / LOCK_NAME


class _HostLock:
    """An exclusive fcntl lock on a file every user of the host can open."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_HostLock":
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's file we may not open: lock a private one
            self.path = Path(tempfile.gettempdir()) / f"{LOCK_NAME}.{os.getuid()}"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(self.fd, 0o666)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def host_lock() -> _HostLock:
    """The lock under which prefixes are registered and stale state removed on this host."""
    return _HostLock(_prefix_lock_path())


def used_prefixes(tmp_dir: str | None = None) -> set[int]:
    """Every prefix that has a segment in /dev/shm or a file lock in the temp dir (live or stale)."""
    used: set[int] = set()
    for folder in (SHM_DIR, Path(tmp_dir or tempfile.gettempdir())):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = _PREFIX.match(name)
            if match:
                used.add(int(match.group(1)))
    return used


def register_prefix(streams_local: list[str]) -> tuple[int, object]:
    """Remove stale state, take the lowest prefix nobody uses and create its `locals` segment; under the host lock."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _pack_locals

    with host_lock():
        remove_stale_streaming_state()
        used = used_prefixes()
        prefix = 0
        while True:
            while prefix in used:
                prefix += 1
            data = _pack_locals(streams_local, prefix)
            try:
                shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
            except FileExistsError:  # a streaming job that does not take the lock
                used.add(prefix)
                continue
            shm.buf[: len(data)] = data
            return prefix, shm


def get_shm_prefix(streams_local: list[str], streams_remote: list, world, retry: int = 100) -> tuple[int, object]:
    """Drop-in for `streaming.base.shared.prefix.get_shm_prefix` (same arguments and result)."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _check_self, _get_path, _unpack_locals

    _check_self(streams_local)
    prefix, shm = register_prefix(streams_local) if world.is_local_leader else (None, None)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and world.ranks_per_node > 1:
        chosen: list = [None] * dist.get_world_size()
        dist.all_gather_object(chosen, (world.node, prefix) if world.is_local_leader else None)
        prefix = dict(entry for entry in chosen if entry is not None)[world.node]
    elif not world.is_local_leader:
        raise RuntimeError("streaming: ranks of one node need a process group to agree on a shared-memory prefix")
    if not world.is_local_leader:
        _wait_for_leader_segments(prefix)
        shm = SharedMemory(_get_path(prefix, LOCALS), False)
        their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
        if their_locals != streams_local or their_prefix != prefix:
            raise RuntimeError(
                f"streaming shared memory {_get_path(prefix, LOCALS)} holds {their_locals} (prefix {their_prefix}), "
                f"not this job's {streams_local}"
            )
    return prefix, shm


# The segments every rank of a node opens right after registration, in streaming 0.13's
# StreamingDataset.__init__, each "create, or attach if it exists".
_SETUP_SEGMENTS = ("barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times")
LEADER_WAIT_S = 600.0


def _wait_for_leader_segments(prefix: int, timeout_s: float = LEADER_WAIT_S) -> None:
    """Let the local leader create the node's segments before the other ranks attach to them.

    Otherwise a rank can find a segment that the leader has created but not yet sized, and
    fail with "cannot mmap an empty file" (seen with 20 processes on 2 cores). The leader
    creates them straight after registering, with no collective in between, so this wait
    cannot deadlock.
    """
    from streaming.base.shared.prefix import _get_path

    if not SHM_DIR.is_dir():  # not Linux: segments are not files we can watch
        return
    deadline = time.monotonic() + timeout_s
    for name in _SETUP_SEGMENTS:
        path = SHM_DIR / _get_path(prefix, name)
        while True:
            try:
                if path.stat().st_size > 0:
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streaming: {path} was not created by the local leader within {timeout_s:.0f} s")
            time.sleep(0.005)


def install_prefix_registration(streaming_module) -> None:
    """Make StreamingDataset register its prefix with `get_shm_prefix` above.

    The replaced name is the one `streaming.base.dataset` imported; the
    signature is checked, so a streaming release that changes it fails
    loudly here instead of racing silently.
    """
    import inspect

    dataset_module = sys.modules.get("streaming.base.dataset")
    if dataset_module is None:
        import importlib

        dataset_module = importlib.import_module("streaming.base.dataset")
    original = getattr(dataset_module, "get_shm_prefix", None)
    if original is get_shm_prefix:
        return
    if original is None or list(inspect.signature(original).parameters)[:3] != [
        "streams_local", "streams_remote", "world"
    ]:
        raise RuntimeError(
            f"mosaicml-streaming {getattr(streaming_module, '__version__', '?')}: get_shm_prefix changed; "
            "looptrain's host-wide prefix registration supports streaming 0.13"
        )
    dataset_module.get_shm_prefix = get_shm_prefix
