"""Remove mosaicml-streaming state that crashed or killed jobs left behind.

Every StreamingDataset registers a numeric prefix and creates shared-memory
segments `/dev/shm/NNNNNN_{locals,barrier,next_epoch,...}` plus file locks
`$TMPDIR/NNNNNN_{barrier,cache}_filelock`. A clean exit unlinks the
segments; the file locks always stay, and a killed job leaves everything.
Leftovers are skipped by later jobs (a fresh prefix is taken), so they waste
memory and push prefixes ever higher rather than corrupting runs.

streaming's `clean_stale_shared_memory()` is not usable on a shared host: it
unlinks every segment from prefix 0 up to the first unused prefix, including
the live segments of jobs running beside us (other ranks, other runs, test
suites). Here a segment counts as stale only when

- it belongs to this user, is older than `min_age_s` (so a segment being
  created right now is never touched), and
- no process of this user maps it (read from /proc/PID/maps: a live
  StreamingDataset keeps all its segments mapped until it exits);

and a file lock is removed only when no segment with its prefix remains.
Where /proc is not readable (not Linux), nothing is removed.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^(\d{6})_[a-z_]+$")
_FILELOCK = re.compile(r"^(\d{6})_(barrier|cache)_filelock$")


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
    """Delete streaming segments and file locks that no live process uses; return what went."""
    if not SHM_DIR.is_dir():
        return []
    uid = os.getuid()
    now = time.time()
    candidates: list[Path] = []
    live_prefixes: set[str] = set()
    for path in SHM_DIR.iterdir():
        match = _SEGMENT.match(path.name)
        if not match:
            continue
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == uid and now - info.st_mtime > min_age_s:
            candidates.append(path)
        else:
            live_prefixes.add(match.group(1))
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    removed: list[str] = []
    for path in candidates:
        if path.name in mapped:
            live_prefixes.add(path.name[:6])
            continue
        try:
            path.unlink()
            removed.append(str(path))
        except (FileNotFoundError, PermissionError):
            pass
    # Segments of a prefix that is still partly alive may have been created
    # recently; never remove a file lock such a prefix may be using.
    for path in SHM_DIR.iterdir():
        match = _SEGMENT.match(path.name)
        if match:
            live_prefixes.add(match.group(1))
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
