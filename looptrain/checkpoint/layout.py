"""Where checkpoints live and how their names read.

    <run_dir>/checkpoints/
        latest                    text file: the name of the newest committed checkpoint
        step_00000100/            a committed checkpoint (manifest.json inside, written last)
        .tmp-step_00000200/       a save in progress, or one killed half-way: never loaded
        .deleting-step_00000050/  a checkpoint being removed by retention
        .universal-step_00000100/ DeepSpeed universal conversion of step_00000100 (a cache)

Only directories named `step_<8 digits>` are checkpoints. A save becomes one
by a single rename after every file and the manifest are on disk, so a crash
at any moment leaves either the old set or the new one, never a half state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from looptrain.fileio import write_text_atomic

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
DELETING_PREFIX = ".deleting-"
UNIVERSAL_PREFIX = ".universal-"
_STEP_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> Optional[int]:
    """The step of a committed checkpoint directory name, else None."""
    match = _STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def committed(ckpt_root: str | os.PathLike) -> list[Path]:
    """Committed checkpoint directories under `ckpt_root`, oldest step first.

    Committed means renamed into place; whether the files are intact is
    `manifest.validate`'s question.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p))


def write_latest(ckpt_root: str | os.PathLike, name: str) -> None:
    write_text_atomic(Path(ckpt_root) / LATEST_FILE, name + "\n")


def read_latest(ckpt_root: str | os.PathLike) -> Optional[str]:
    try:
        name = (Path(ckpt_root) / LATEST_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return name or None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint, a checkpoints directory or a run directory.

    For a directory of checkpoints the `latest` pointer wins; without one the
    newest committed checkpoint is taken. Raises FileNotFoundError naming what
    was looked for.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path.absolute()}: no checkpoint here (no such directory)")
    if (path / MANIFEST_FILE).is_file() or step_of(path) is not None:
        return path
    for root in (path, path / CHECKPOINTS_DIR):
        latest = read_latest(root)
        if latest and (root / latest).is_dir():
            return root / latest
        found = committed(root)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"{path}: no checkpoint here (looked for {MANIFEST_FILE}, a '{LATEST_FILE}' pointer and step_* directories)"
    )
