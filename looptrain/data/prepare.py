"""Text -> tokenizer + packed token sequences in MDS shards, written atomically.

Output layout (what `looptrain.data.loader.check_dataset` expects):

    OUT/tokenizer.model   the sentencepiece model (trained here, or copied)
    OUT/dataset.json      what was made and from what (see `prepare_dataset`)
    OUT/train/            MDS shards, column "tokens": ndarray of seq_len + 1 ids
    OUT/val/              the same for held-out documents (absent if val_fraction=0)

How text becomes sequences
    Documents are tokenized and each is followed by EOS; each split's documents
    form one token stream, cut into rows of seq_len + 1 tokens (model inputs
    are row[:-1], targets row[1:]). Consecutive rows overlap by one token, so
    every token of the stream after the first is a target exactly once; the
    tail that does not fill a row is dropped (counted in dataset.json).

Held-out split
    Whole documents go to validation: round(val_fraction * documents) of
    them (at least one), drawn with `seed`. The tokenizer is trained on the
    training documents only, so nothing about validation text leaks in.

Atomicity
    Everything is written into OUT.tmp-<host>-<pid> and renamed to OUT at the
    end; a failure removes the temporary directory, and one left by a killed
    prepare on this host is removed by the next prepare of the same OUT. A
    directory without dataset.json is never a finished dataset. An existing
    OUT is refused unless overwrite=True, in which case the old one is moved
    aside, the new one renamed in, and the old one deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from looptrain.data.corpus import DocumentSource, TextSplit
from looptrain.data.errors import DataError
from looptrain.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

DATASET_FORMAT = "looptrain-mds-tokens"
DATASET_VERSION = 1
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "val")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 256
ENCODE_BATCH_DOCUMENTS = 256
SHARD_SIZE_LIMIT = 1 << 25  # 32 MiB per shard


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # tokens in the stream, EOS included
    sequences: int = 0
    dropped_tokens: int = 0  # the tail that did not fill a row


def token_dtype(vocab_size: int) -> str:
    """The smallest integer type that holds every id (uint16 halves the disk and I/O)."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class SequencePacker:
    """Cuts a token stream into rows of `seq_len + 1` tokens; consecutive rows share one token."""

    def __init__(self, seq_len: int, dtype: str):
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self._pending = np.empty(0, dtype=self.dtype)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens; return the full rows now available, shape [n, seq_len + 1]."""
        stream = np.concatenate([self._pending, tokens.astype(self.dtype, copy=False)])
        row = self.seq_len + 1
        rows = (len(stream) - 1) // self.seq_len if len(stream) >= row else 0
        self._pending = stream[rows * self.seq_len :]
        if rows == 0:
            return np.empty((0, row), dtype=self.dtype)
        return np.lib.stride_tricks.sliding_window_view(stream[: (rows - 1) * self.seq_len + row], row)[
            :: self.seq_len
        ]


def _choose_validation(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over documents: True = held out for validation."""
    mask = np.zeros(n_documents, dtype=bool)
    if val_fraction <= 0:
        return mask
    if n_documents < 2:
        raise DataError(
            f"only {n_documents} document(s): a validation split needs at least 2; "
            "add text, split text files into paragraphs (--text-split paragraph) or pass --val-fraction 0"
        )
    n_val = min(max(1, round(val_fraction * n_documents)), n_documents - 1)
    mask[np.random.default_rng(seed).choice(n_documents, size=n_val, replace=False)] = True
    return mask


def _documents_of(source: DocumentSource, mask: np.ndarray, want_val: bool) -> Iterator[str]:
    for index, document in enumerate(source.documents()):
        if index < len(mask) and mask[index] == want_val:
            yield document


def _batched(items: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_arguments(vocab_size: int, seq_len: int, val_fraction: float) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be >= 1 (the model's max_seq_len)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1), e.g. 0.05")
    if vocab_size < 1:
        raise DataError(f"vocab_size={vocab_size}: must be >= 1")


def prepare_dataset(
    inputs: str | Sequence[str | os.PathLike] | DocumentSource,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    val_fraction: float = 0.05,
    seed: int = 0,
    tokenizer_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    text_field: str = "text",
    text_split: TextSplit = "paragraph",
    progress: bool = True,
) -> dict:
    """Make a dataset directory from text; return the contents of its dataset.json.

    inputs: a built-in corpus name ("bible"), files/directories (see
    `looptrain.data.corpus`), or a DocumentSource. tokenizer_path: reuse this
    sentencepiece model instead of training one (vocab_size is then ignored).
    """
    _check_arguments(vocab_size, seq_len, val_fraction)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir}: already exists; pass --overwrite to replace it or choose another --out")
    if isinstance(inputs, DocumentSource):
        source = inputs
    else:
        source = DocumentSource.from_inputs(inputs, text_field, text_split)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise DataError(f"{tokenizer_path}: no tokenizer model here; drop --tokenizer to train one")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work_dirs(out_dir)
    work = out_dir.with_name(f"{out_dir.name}.tmp-{_HOST}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        summary = _prepare_into(
            source, work, vocab_size, seq_len, val_fraction, seed, tokenizer_path, progress
        )
        _commit(work, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


_HOST = socket.gethostname().split(".")[0].replace("-", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_work_dirs(out_dir: Path) -> None:
    """Delete OUT.tmp-HOST-PID left by a killed prepare on this host (its PID is gone)."""
    for path in out_dir.parent.glob(f"{out_dir.name}.tmp-{_HOST}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _prepare_into(
    source: DocumentSource,
    work: Path,
    vocab_size: int,
    seq_len: int,
    val_fraction: float,
    seed: int,
    tokenizer_path: str | os.PathLike | None,
    progress: bool,
) -> dict:
    from tqdm import tqdm

    from looptrain.data.streaming_import import import_streaming

    n_documents = sum(1 for _ in source.documents())
    if n_documents == 0:
        raise DataError(f"no documents in {json.dumps(source.describe)}: every input is empty")
    is_val = _choose_validation(n_documents, val_fraction, seed)

    model_path = work / "tokenizer.model"
    if tokenizer_path is None:
        train_tokenizer(_documents_of(source, is_val, want_val=False), model_path, vocab_size, seed=seed,
                        progress=progress)
    else:
        shutil.copyfile(tokenizer_path, model_path)
    tokenizer = Tokenizer.load(model_path)
    dtype = token_dtype(tokenizer.vocab_size)
    columns = {TOKENS_COLUMN: f"ndarray:{dtype}:{seq_len + 1}"}

    streaming = import_streaming()
    splits = ["train", "val"] if is_val.any() else ["train"]
    stats = {name: SplitStats() for name in splits}
    packers = {name: SequencePacker(seq_len, dtype) for name in splits}
    writers = {
        name: streaming.MDSWriter(out=str(work / name), columns=columns, size_limit=SHARD_SIZE_LIMIT)
        for name in splits
    }
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    try:
        bar = tqdm(total=n_documents, unit="doc", desc="tokenizing", disable=not progress)
        for batch in _batched(enumerate(source.documents()), ENCODE_BATCH_DOCUMENTS):
            encoded = tokenizer.encode_batch([text for _, text in batch])
            for (index, _), ids in zip(batch, encoded):
                if index >= n_documents:
                    raise DataError(
                        f"the inputs changed while being prepared (now more than {n_documents} documents); run again"
                    )
                name = "val" if is_val[index] else "train"
                tokens = np.concatenate([np.asarray(ids, dtype=dtype), eos])
                split = stats[name]
                split.documents += 1
                split.tokens += len(tokens)
                for row in packers[name].add(tokens):
                    writers[name].write({TOKENS_COLUMN: row})
                    split.sequences += 1
            bar.update(len(batch))
        bar.close()
    finally:
        for writer in writers.values():
            writer.finish()
    for name in splits:
        split = stats[name]
        split.dropped_tokens = split.tokens - (split.sequences * seq_len + 1 if split.sequences else 0)
        if split.sequences == 0:
            raise DataError(
                f"the {name} split has {split.tokens} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}; use more text, a smaller --seq-len"
                + (" or a larger --val-fraction" if name == "val" else "")
            )

    summary = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "seq_len": seq_len,
        "sample_tokens": seq_len + 1,
        "column": TOKENS_COLUMN,
        "dtype": dtype,
        "tokenizer_sha256": file_sha256(model_path),
        "tokenizer_source": "trained" if tokenizer_path is None else str(Path(tokenizer_path).absolute()),
        "source": source.describe,
        "documents": n_documents,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {name: asdict(value) for name, value in stats.items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (work / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _commit(work: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished work directory to out_dir (moving an old one aside first)."""
    if not out_dir.exists():
        try:
            os.rename(work, out_dir)
        except OSError as err:
            raise DataError(f"{out_dir}: appeared while preparing (another prepare?); nothing was replaced") from err
        return
    if not overwrite:
        raise DataError(f"{out_dir}: appeared while preparing; pass --overwrite to replace it")
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out_dir, old)
    try:
        os.rename(work, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_dataset_json(data_dir: str | os.PathLike) -> dict:
    """The dataset.json of a prepared directory (no validation; see loader.check_dataset)."""
    return json.loads((Path(data_dir) / "dataset.json").read_text())
