"""Small-file writes that a crash or a concurrent reader never sees half-done.

Run records, resolved recipes, checkpoint manifests and the `latest` pointer
are read by other processes (a resumed run, `looptrain status`, a launcher)
while a job may be killed at any moment. Each is written to a temporary file
in the same directory, flushed to disk, and renamed over the target: a reader
sees the old content or the new, never a part.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` atomically and durably; the parent directory must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of an append-only .jsonl file, in file order.

    Lines that are blank, cut short (a writer killed mid-line) or not an object
    are skipped. A missing file raises FileNotFoundError for the caller to judge.
    """
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def human_size(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB, for messages and listings (checkpoint sizes, free disk)."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
