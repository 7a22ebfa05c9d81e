"""Prepared dataset -> batches of token ids, resumable mid-epoch.

Batches are `torch.LongTensor[B, seq_len + 1]`: inputs are `batch[:, :-1]`,
targets `batch[:, 1:]`. A plain tensor (not a dict) because every sample has
exactly one field and the same length; the trainer needs nothing else.

Determinism and resume
    Order comes from mosaicml-streaming: `StreamingDataset` with the
    per-device batch size, `shuffle_seed` and `num_canonical_nodes` fixes the
    global sample order; `StreamingDataLoader` counts what it has yielded, so
    `state_dict()` / `load_state_dict()` resume at the exact next sample.
    `InfiniteBatches` wraps the train loader into an endless stream of
    epochs whose state (epoch included) is one small dict for checkpoints.

Processes and shared memory
    streaming reads `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `RANK`, `MASTER_ADDR`,
    `MASTER_PORT` when a dataset is built; single-process defaults are filled
    in when absent (never overriding a launcher's values). Each dataset takes
    a fresh shared-memory prefix, so datasets built one after another in a
    process (train then val, or tests) never share state. The prefix is
    registered under a host-wide lock, and what killed jobs left behind is
    removed under the same lock (see `looptrain.data.shm`): jobs packed onto
    one machine never share or break each other's shared memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from looptrain.config.schema import DataConfig
from looptrain.data.errors import DataError
from looptrain.data.prepare import DATASET_FORMAT, TOKENS_COLUMN
from looptrain.data.tokenizer import file_sha256
from looptrain.paths import shown

PREPARE_HINT = "looptrain prepare YOUR_TEXT_OR_JSONL_FILES --out {dir}"
SINGLE_PROCESS_ENV = {
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


# --------------------------------------------------------------------- validation


@dataclass(frozen=True)
class DatasetInfo:
    """What check_dataset learned about a prepared directory."""

    dir: Path
    vocab_size: int
    seq_len: int
    eos_id: int
    dtype: str
    tokenizer_path: Path
    splits: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # the whole dataset.json


def _load_meta(root: Path) -> dict:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(
            f"{shown(meta_path)}: missing, so it is not a finished dataset (an interrupted prepare?); "
            f"re-run `{PREPARE_HINT.format(dir=root.absolute())} --overwrite`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_path}: unreadable ({err}); re-run `looptrain prepare --overwrite`") from err
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != DATASET_FORMAT:
        raise DataError(f"{meta_path}: not a looptrain dataset (format {found!r}); make one with `looptrain prepare`")
    return meta


def _check_split(root: Path, split: str, meta: dict, check_shards: bool = True) -> None:
    index_path = root / split / "index.json"
    if split not in meta.get("splits", {}):
        fix = (
            "set train.val_every=0 or re-prepare with --val-fraction 0.05"
            if split == "val"
            else "re-run `looptrain prepare --overwrite`"
        )
        raise DataError(f"{root}: has no {split} split; {fix}")
    if not index_path.is_file():
        raise DataError(
            f"{index_path}: missing, the {split} shards are incomplete; re-run `looptrain prepare --overwrite`"
        )
    index = json.loads(index_path.read_text())
    expected = f"ndarray:{meta['dtype']}:{meta['seq_len'] + 1}"
    if not index.get("shards"):
        raise DataError(f"{index_path}: lists no shards; re-run `looptrain prepare --overwrite`")
    for shard in index.get("shards", []):
        if shard.get("column_names") != [TOKENS_COLUMN] or shard.get("column_encodings") != [expected]:
            raise DataError(
                f"{index_path}: shards hold {shard.get('column_names')} {shard.get('column_encodings')}, "
                f"expected [{TOKENS_COLUMN!r}] [{expected!r}]; re-run `looptrain prepare --overwrite`"
            )
        if not check_shards:  # a remote stream's shards arrive while training
            continue
        path = root / split / shard["raw_data"]["basename"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing; re-run `looptrain prepare --overwrite`")
        # A truncated or padded shard would fail mid-epoch with an IndexError
        # from streaming; its size is in the index, so compare it now (one stat).
        expected_bytes, found_bytes = shard["raw_data"].get("bytes"), path.stat().st_size
        if expected_bytes is not None and found_bytes != expected_bytes:
            raise DataError(
                f"{path}: {found_bytes} bytes but index.json says {expected_bytes} (truncated or damaged copy); "
                "copy the dataset again or re-run `looptrain prepare --overwrite`"
            )


def check_dataset(
    data_dir: str | os.PathLike,
    seq_len: int,
    vocab_size: int,
    splits: Sequence[str] = ("train",),
    check_shards: bool = True,
) -> DatasetInfo:
    """Validate a prepared dataset against the model before anything heavy is built.

    seq_len is model.max_seq_len and vocab_size model.vocab_size. Every
    problem is a one-line DataError naming the path and the fix.
    """
    root = Path(data_dir)
    hint = PREPARE_HINT.format(dir=root.absolute())
    if not root.exists():
        raise DataError(f"{shown(root)}: no dataset here; make one with `{hint}` or set data.dir")
    if not root.is_dir():
        raise DataError(
            f"{shown(root)}: is a file, not a dataset directory; set data.dir to a `looptrain prepare` output"
        )
    if not any(root.iterdir()):
        raise DataError(f"{shown(root)}: empty directory; make a dataset with `{hint} --overwrite`")
    meta = _load_meta(root)

    tokenizer_path = root / str(meta.get("tokenizer_file", "tokenizer.model"))
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path}: missing; re-run `looptrain prepare --overwrite` for {root}")
    if meta.get("tokenizer_sha256") and file_sha256(tokenizer_path) != meta["tokenizer_sha256"]:
        raise DataError(
            f"{tokenizer_path}: differs from the tokenizer the shards were made with (sha256 in dataset.json); "
            "restore it or re-run `looptrain prepare --overwrite`"
        )
    data_vocab, data_seq_len = int(meta["vocab_size"]), int(meta["seq_len"])
    if data_vocab > vocab_size:
        raise DataError(
            f"{root}: the tokenizer has {data_vocab} tokens but model.vocab_size={vocab_size}; "
            f"set model.vocab_size={data_vocab} or re-prepare with --vocab-size {vocab_size}"
        )
    if data_seq_len != seq_len:
        raise DataError(
            f"{root}: sequences hold {data_seq_len} tokens (+1 target) but model.max_seq_len={seq_len}; "
            f"set model.max_seq_len={data_seq_len} or re-prepare with --seq-len {seq_len}"
        )
    for split in splits:
        _check_split(root, split, meta, check_shards)
    return DatasetInfo(
        dir=root,
        vocab_size=data_vocab,
        seq_len=data_seq_len,
        eos_id=int(meta["eos_id"]),
        dtype=str(meta["dtype"]),
        tokenizer_path=tokenizer_path,
        splits=dict(meta["splits"]),
        meta=meta,
    )


# ------------------------------------------------------------------- environment


def ensure_streaming_env() -> dict[str, str]:
    """Fill in the process-group variables streaming needs; return those that were set here.

    A launcher's values are never overridden. With several ranks (WORLD_SIZE > 1)
    nothing is guessed: a missing variable is an error, because a wrong
    LOCAL_WORLD_SIZE would silently change the data order.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        missing = [k for k in ("LOCAL_WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DataError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun or `looptrain launch`"
            )
    filled = {}
    for key, value in SINGLE_PROCESS_ENV.items():
        if key not in os.environ:
            if key == "LOCAL_RANK" and "RANK" in os.environ and world_size == 1:
                value = os.environ["RANK"]
            os.environ[key] = value
            filled[key] = value
    return filled


# ------------------------------------------------------------------------ loaders


def collate_tokens(samples: list[dict[str, np.ndarray]]) -> torch.Tensor:
    """Stack samples into LongTensor[B, seq_len + 1] (ids are stored as uint16/int32)."""
    return torch.from_numpy(np.stack([s[TOKENS_COLUMN] for s in samples]).astype(np.int64))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _build(
    cfg: DataConfig,
    split: str,
    *,
    seq_len: int,
    vocab_size: int,
    micro_batch_size: int,
    shuffle: bool,
    drop_last: bool,
    stream: str | None = None,
):
    from looptrain.data.streams import resolve_streams, streaming_streams

    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size={micro_batch_size}: must be >= 1")
    resolved = resolve_streams(cfg, seq_len=seq_len, vocab_size=vocab_size, splits=(split,), only=stream)
    if split == "val":
        resolved = [s for s in resolved if "val" in s.info.splits]
    ensure_streaming_env()

    from looptrain.data.streaming_import import import_streaming

    streaming = import_streaming()
    # Each dataset's shared-memory prefix is registered under a host-wide lock
    # (looptrain.data.shm.get_shm_prefix), so jobs starting together never share one.
    dataset = streaming.StreamingDataset(
        streams=streaming_streams(resolved, split, weighted=split == "train", download_timeout=cfg.download_timeout),
        batch_size=micro_batch_size,
        shuffle=shuffle,
        shuffle_seed=cfg.shuffle_seed,
        num_canonical_nodes=cfg.num_canonical_nodes,
        predownload=cfg.predownload,
    )
    loader = streaming.StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=collate_tokens,
        num_workers=cfg.num_workers,
        drop_last=drop_last,
        persistent_workers=cfg.num_workers > 0,
        # Its own generator: without one, every epoch start draws a seed from the
        # global torch RNG, and a run resumed at an epoch end would shift the
        # dropout stream of the model.
        generator=torch.Generator().manual_seed(cfg.shuffle_seed),
    )
    return resolved, loader


def build_train_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    vocab_size: int,
    micro_batch_size: int,
    global_batch_size: int | None = None,
):
    """The training StreamingDataLoader of this rank (shuffled, last partial batch dropped).

    Rank and world come from the environment (see ensure_streaming_env).
    global_batch_size, when given, must be a multiple of micro_batch_size x
    world size; it is checked here so a bad combination fails before data
    is read. Wrap the result in InfiniteBatches for an endless stream.
    """
    ensure_streaming_env()
    world = _world_size()
    if global_batch_size is not None and global_batch_size % (micro_batch_size * world):
        raise DataError(
            f"global batch {global_batch_size} is not a multiple of micro_batch_size {micro_batch_size} x "
            f"world size {world}; change train.global_batch_size or train.micro_batch_size"
        )
    resolved, loader = _build(
        cfg,
        "train",
        seq_len=seq_len,
        vocab_size=vocab_size,
        micro_batch_size=micro_batch_size,
        shuffle=cfg.shuffle,
        drop_last=True,
    )
    sequences = int(loader.dataset.epoch_size)
    if sequences < micro_batch_size * world:
        where = resolved[0].where if len(resolved) == 1 else "data.streams"
        raise DataError(
            f"{where}: the train split has {sequences} sequences, fewer than one batch "
            f"({micro_batch_size} x {world} ranks); use more text or a smaller train.micro_batch_size"
        )
    return loader


def build_val_loaders(cfg: DataConfig, *, seq_len: int, vocab_size: int, micro_batch_size: int) -> dict:
    """One validation loader per stream that has a val split, by stream name."""
    from looptrain.data.streams import resolve_streams

    resolved = resolve_streams(cfg, seq_len=seq_len, vocab_size=vocab_size, splits=("val",))
    return {
        s.name: build_val_loader(cfg, seq_len=seq_len, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                                 stream=s.name)
        for s in resolved
        if "val" in s.info.splits
    }


def build_val_loader(
    cfg: DataConfig, *, seq_len: int, vocab_size: int, micro_batch_size: int, stream: str | None = None
):
    """The validation StreamingDataLoader of this rank: fixed order, every sequence once.

    No shuffling, and the last partial batch is kept. Ranks read disjoint
    parts of the split (streaming may repeat a few samples so that every rank
    gets the same count). Each `iter()` starts again from the beginning.
    """
    _, loader = _build(
        cfg,
        "val",
        seq_len=seq_len,
        vocab_size=vocab_size,
        micro_batch_size=micro_batch_size,
        shuffle=False,
        drop_last=False,
        stream=stream,
    )
    return loader


class InfiniteBatches:
    """An endless iterator over a StreamingDataLoader, epoch after epoch, resumable.

    `state_dict()` is streaming's loader state (epoch and sample offset, the
    canonical node count and the shuffle seed) plus counters; load it into a
    freshly built InfiniteBatches before its first batch to continue with
    exactly the batches an uninterrupted run would have seen. Each epoch is
    a new shuffle (streaming mixes the epoch into its shuffle seed).
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.batches_seen = 0
        self._iterator: Iterator[torch.Tensor] | None = None

    def __iter__(self) -> "InfiniteBatches":
        return self

    def __next__(self) -> torch.Tensor:
        # A run resumed exactly at the end of an epoch finds that epoch empty
        # once; a second empty epoch in a row means no full batch exists at all.
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                continue
            self.batches_seen += 1
            return batch
        raise DataError("the training split yields no full batch; use a smaller micro batch or more data")

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "epoch": self.epoch, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise RuntimeError("load the data state into a freshly built loader, before its first batch")
        self.loader.load_state_dict(state["loader"])
        self.epoch = int(state["epoch"])
        self.batches_seen = int(state["batches_seen"])
