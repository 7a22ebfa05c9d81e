"""The manifest: the list of files a checkpoint is made of, written last.

Its presence means every other file was on disk when it was written; its
sizes and checksums let a load detect a truncated or damaged file and name
it, instead of failing deep inside a deserialiser (or, worse, loading zeros).

Checksum: SHA-256. Measured here at ~1.1 GB/s per core (SHA-NI), against
~3.5 GB/s for zlib's CRC-32 and ~0.7 GB/s for BLAKE2b. Files are hashed in
parallel threads (hashlib releases the GIL), the save-side hashing runs off
the training thread for asynchronous saves, and a 129M-parameter checkpoint
(weights + two Adam moments, ~1.5 GB) costs about a second; for that price
the digest is also usable to compare checkpoints across machines, which a
32-bit CRC is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.layout import MANIFEST_FILE
from looptrain.fileio import write_text_atomic

MANIFEST_FORMAT = "looptrain-checkpoint"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def list_files(directory: str | os.PathLike) -> list[str]:
    """Every regular file under `directory` (relative POSIX paths), the manifest excluded."""
    root = Path(directory)
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def describe_files(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} for every file of a checkpoint directory."""
    root = Path(directory)
    names = list_files(root)
    with ThreadPoolExecutor(_hash_workers()) as pool:
        digests = list(pool.map(lambda rel: file_sha256(root / rel), names))
    return {rel: {"bytes": (root / rel).stat().st_size, "sha256": d} for rel, d in zip(names, digests)}


def write_manifest(directory: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file, then write manifest.json (fsynced) as the directory's last file."""
    directory = Path(directory)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        **info,
        "committed_unix_time": time.time(),
        "files": describe_files(directory),
    }
    write_text_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint directory; CheckpointError when absent or unreadable."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so {directory} is not a complete checkpoint (its save was interrupted before "
            "the commit); resume from another checkpoint (checkpoint.resume=PATH) or delete this directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: unreadable ({err}); the checkpoint is damaged, resume from another one"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not a looptrain checkpoint manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {manifest.get('version')!r}, this looptrain reads version {MANIFEST_VERSION}; "
            "use the looptrain version that wrote it"
        )
    return manifest


def validate(directory: str | os.PathLike, *, checksums: bool = True) -> dict[str, Any]:
    """Check that every file the manifest lists is present with its size (and digest).

    Returns the manifest; raises CheckpointError naming the first bad file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    files: dict[str, dict[str, Any]] = manifest.get("files") or {}
    if not files:
        raise CheckpointError(f"{directory / MANIFEST_FILE}: lists no files; the checkpoint is damaged")
    fix = "resume from an earlier checkpoint (checkpoint.resume=PATH) or delete this one"
    for rel, entry in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE}); {fix}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "larger than written"
            raise CheckpointError(
                f"{path}: {size} bytes but {MANIFEST_FILE} says {entry['bytes']} ({what}); {fix}"
            )
    if checksums:
        names = list(files)
        with ThreadPoolExecutor(_hash_workers()) as pool:
            digests = list(pool.map(lambda rel: file_sha256(directory / rel), names))
        for rel, digest in zip(names, digests):
            if digest != files[rel]["sha256"]:
                raise CheckpointError(
                    f"{directory / rel}: sha256 {digest[:16]}... differs from {files[rel]['sha256'][:16]}... in "
                    f"{MANIFEST_FILE} (the file was modified or damaged after the save); {fix}"
                )
    return manifest
