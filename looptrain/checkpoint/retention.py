"""Which checkpoints stay: the newest `keep_last`, every multiple of
`keep_every`, and the one this run resumed from (it may be the only valid
one if a newer save turns out damaged). Only directories with a manifest
count; a `step_*` directory without one is not ours to delete. Removal first renames a directory
out of the `step_*` namespace, so an interrupted removal never leaves a
half-deleted directory that looks like a checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from looptrain.checkpoint.layout import (
    DELETING_PREFIX,
    MANIFEST_FILE,
    TMP_PREFIX,
    UNIVERSAL_PREFIX,
    committed,
    step_of,
)


def to_keep(steps: Iterable[int], keep_last: int, keep_every: int, protected: Iterable[int] = ()) -> set[int]:
    """The steps retention keeps out of `steps`."""
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    keep |= set(protected) & set(ordered)
    return keep


def remove_dir(path: Path) -> None:
    doomed = path.with_name(DELETING_PREFIX + path.name.lstrip("."))
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def apply_retention(
    ckpt_root: Path,
    keep_last: int,
    keep_every: int,
    protected: Iterable[Path] = (),
    in_progress: Optional[Path] = None,
) -> list[Path]:
    """Delete checkpoints retention does not keep, plus leftovers of crashed saves
    and deletions and universal conversions of removed checkpoints. Returns what was removed."""
    protected_paths = {Path(p).resolve() for p in protected}
    # A step directory without a manifest cannot come from a commit (the manifest
    # is written before the rename): it is not counted, and not deleted either.
    found = [p for p in committed(ckpt_root) if (p / MANIFEST_FILE).is_file()]
    keep = to_keep(
        (step_of(p) for p in found), keep_last, keep_every,
        protected=(step_of(p) for p in found if p.resolve() in protected_paths),
    )
    removed = []
    for path in found:
        if step_of(path) not in keep:
            remove_dir(path)
            removed.append(path)
    survivors = {p.name for p in committed(ckpt_root)}
    for path in Path(ckpt_root).iterdir():
        name = path.name
        if in_progress is not None and path.resolve() == Path(in_progress).resolve():
            continue
        stale = (
            name.startswith(TMP_PREFIX)
            or name.startswith(DELETING_PREFIX)
            or (name.startswith(UNIVERSAL_PREFIX) and name[len(UNIVERSAL_PREFIX):].rsplit("-", 1)[0] not in survivors
                and not any(name[len(UNIVERSAL_PREFIX):].startswith(p.name) for p in protected_paths))
        )
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if not name.startswith(DELETING_PREFIX):
                removed.append(path)
    return removed
