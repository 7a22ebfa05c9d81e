"""Read the records of an offline W&B run file (`offline-run-*/run-*.wandb`).

The wandb SDK no longer ships a Python reader for its run files; this one
lets tests and `looptrain inspect` check what a run sent to W&B (metrics,
alerts, config) without a server. The file is a LevelDB-style log: a 7-byte
header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
chunk a 7-byte header (crc32, little-endian length, type FULL/FIRST/MIDDLE/
LAST) and data; a block's last < 7 bytes are zero padding. Each complete
payload is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import os
import struct
import zlib
from typing import Iterator

BLOCK = 32768
CHUNK_HEADER = 7
FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_run_files(run_dir: str) -> list[str]:
    """The `.wandb` files of the offline runs under `run_dir/wandb`, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))


def read_payloads(path: str) -> Iterator[bytes]:
    """The raw record payloads of one run file, in order."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < FILE_HEADER.size:
        return
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r}, magic {magic:#x})")
    pos = FILE_HEADER.size
    pending = b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:
            pos += room  # zero trailer of the block
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        start = pos + CHUNK_HEADER
        chunk = data[start : start + length]
        if len(chunk) < length:
            break  # truncated tail of a file still being written
        if checksum == 0 and length == 0 and kind == 0:
            pos += room  # unused rest of the block
            continue
        expected = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        if checksum != expected:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def read_records(path: str) -> Iterator["object"]:
    """The `wandb_internal_pb2.Record` messages of one run file."""
    from wandb.proto import wandb_internal_pb2

    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record
