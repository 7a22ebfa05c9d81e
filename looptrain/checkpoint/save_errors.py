"""A save that fails: say why in one line, and leave the checkpoints as they were.

A full disk surfaces in many shapes: `OSError(ENOSPC)` from a plain write,
`RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos` or
`... file write failed` from `torch.save`'s zip writer, and, from
`torch.distributed.checkpoint`, a `CheckpointException` that wraps one of those
per rank and derives from `BaseException` (so `except Exception` misses it).
`save_failure` looks through all of them and turns a full disk into a
`CheckpointError` that names the directory, the free space and the size the
checkpoint needs.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterator, Optional

from looptrain.checkpoint.errors import CheckpointError
from looptrain.fileio import human_size
from looptrain.checkpoint.layout import committed, read_latest
from looptrain.checkpoint.manifest import read_manifest

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("no space left", "disk quota", "unexpected pos", "file write failed", "file too large")


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (the partial directory was removed)."""


def _causes(err: BaseException) -> Iterator[BaseException]:
    """err, its causes and contexts, and the per-rank exceptions of a DCP CheckpointException."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo.append(failure[0] if isinstance(failure, tuple) else failure)


def disk_full(err: BaseException) -> bool:
    for e in _causes(err):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _FULL_TEXT):
            return True
    return False


def needed_bytes(ckpt_root: Path, fallback: int) -> tuple[int, str]:
    """The size of the newest committed checkpoint (same model, same state), else `fallback`."""
    for path in reversed(committed(ckpt_root)):
        try:
            files = read_manifest(path).get("files") or {}
        except CheckpointError:
            continue
        if files:
            return sum(int(e["bytes"]) for e in files.values()), f"as much as {path.name}"
    return fallback, "estimated from the model and optimizer state"


def save_failure(err: BaseException, *, step: int, tmp: Path, ckpt_root: Path, estimate: int,
                 remove: bool) -> BaseException:
    """The exception to raise for a failed save; removes the partial directory when `remove`.

    A full disk becomes a one-line `CheckpointSaveError`; anything else keeps its
    type, except DCP's `CheckpointException` (a BaseException), which becomes a
    RuntimeError so that error handling sees it."""
    try:
        free = human_size(shutil.disk_usage(ckpt_root).free)  # at the failure, before the partial directory goes
    except OSError:
        free = "unknown"
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = read_latest(ckpt_root)
    kept = (f"`latest` still points at {latest}, from which `checkpoint.resume: auto` continues"
            if latest else "no earlier checkpoint exists")
    if disk_full(err):
        need, how = needed_bytes(ckpt_root, estimate)
        return CheckpointSaveError(
            f"the disk is full: the checkpoint of step {step} could not be written to {ckpt_root} (it needs about "
            f"{human_size(need)}, {how}; {free} was free when the write failed); the partial {tmp.name} was removed "
            f"and {kept}; free space "
            "there (or lower checkpoint.keep_last, or move out_dir) and run again"
        )
    if isinstance(err, Exception):
        return err
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    inner: Optional[BaseException] = next((e for e in _causes(err) if e is not err and isinstance(e, Exception)), None)
    detail = f"{type(inner).__name__}: {inner}" if inner is not None else first
    return RuntimeError(f"the checkpoint of step {step} could not be written ({detail}); {kept}")
