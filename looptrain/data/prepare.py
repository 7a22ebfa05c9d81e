"""Text -> tokenizer + packed token sequences in MDS shards, written atomically.

Output layout (what `looptrain.data.loader.check_dataset` expects):

    OUT/tokenizer.model   the sentencepiece model (trained here, or copied), or
    OUT/tokenizer.json    a Hugging Face tokenizer (dataset.json names the file and its sha256)
    OUT/dataset.json      what was made and from what (see `prepare_dataset`)
    OUT/train/            index.json over block-NNNNN/ MDS shards, column "tokens": seq_len + 1 ids
    OUT/val/              the same for held-out documents (absent if val_fraction=0)

How text becomes sequences
    Documents are tokenized and each is followed by EOS. The corpus is cut
    into blocks of consecutive documents (`looptrain.data.encode`); in each
    block, each split's documents form one token stream, cut into rows of
    seq_len + 1 tokens (model inputs are row[:-1], targets row[1:]).
    Consecutive rows overlap by one token, so every token of the stream after
    the first is a target exactly once; the tail that does not fill a row is
    dropped (counted in dataset.json). Blocks depend only on the corpus, so
    the output is the same for any number of workers or array tasks.

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
from typing import Sequence

import numpy as np

from looptrain.data.corpus import DocumentSource, TextSplit
from looptrain.data.errors import DataError
from looptrain.data.tokenizer import file_sha256, load_tokenizer, tokenizer_file, train_tokenizer

DATASET_FORMAT = "looptrain-mds-tokens"
DATASET_VERSION = 1
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "val")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 256
TOKENIZER_SAMPLE_LINES = 2_000_000  # the tokenizer learns from a reservoir sample of this many lines
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
    tokens_field: str | None = None,
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    block_bytes: int | None = None,
) -> dict:
    """Make a dataset directory from text; return the contents of its dataset.json.

    inputs: a built-in corpus name ("bible"), files/directories (see
    `looptrain.data.corpus`), or a DocumentSource. tokenizer_path: reuse this
    sentencepiece model instead of training one (vocab_size is then ignored).
    """
    _check_arguments(vocab_size, seq_len, val_fraction)
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} --num-shards {num_shards}: need 0 <= index < num-shards")
    out_dir = Path(out_dir)
    if num_shards > 1:  # an array task writes its part; `--merge` joins them into OUT
        if out_dir.exists():
            raise DataError(f"{out_dir}: already exists; the parts of an array preparation go into a new --out")
        out_dir = part_dir(out_dir, shard_index, num_shards)
        overwrite = overwrite or (out_dir / PART_FILE).is_file()
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir}: already exists; pass --overwrite to replace it or choose another --out")
    if isinstance(inputs, DocumentSource):
        source = inputs
    else:
        source = DocumentSource.from_inputs(inputs, text_field, text_split, tokens_field)
    if not (num_shards > 1 and (out_dir / PART_FILE).is_file()):  # a part of ours may be redone
        check_replaceable(out_dir, source.describe.get("files", []))
    if tokenizer_path is not None:  # a .model, a tokenizer.json, or a prepared dataset's tokenizer
        tokenizer_path = tokenizer_file(tokenizer_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work_dirs(out_dir)
    work = out_dir.with_name(f"{out_dir.name}.tmp-{_HOST}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        summary = _prepare_into(
            source, work, vocab_size, seq_len, val_fraction, seed, tokenizer_path, progress,
            workers=workers, shard_index=shard_index, num_shards=num_shards, block_bytes=block_bytes,
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
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    block_bytes: int | None = None,
) -> dict:
    """Scan, train or copy the tokenizer, encode the blocks of this task; return dataset.json's contents.

    With num_shards > 1 only the blocks b with b % num_shards == shard_index
    are encoded and no index is merged (`merge_prepared_parts` does that).
    """
    from tqdm import tqdm

    from looptrain.data import encode
    from looptrain.data.streaming_import import import_streaming

    sample_lines = TOKENIZER_SAMPLE_LINES if tokenizer_path is None else 0
    scan = encode.scan_corpus(source.documents(), max_lines=sample_lines, seed=seed,
                              block_bytes=block_bytes or encode.BLOCK_BYTES)
    n_documents = scan.documents
    if n_documents == 0:
        raise DataError(f"no documents in {json.dumps(source.describe)}: every input is empty")
    is_val = _choose_validation(n_documents, val_fraction, seed)

    model_path = work / ("tokenizer.json" if str(tokenizer_path or "").endswith(".json") else "tokenizer.model")
    if tokenizer_path is None:
        if scan.token_documents == scan.documents:
            raise DataError("the input is pre-tokenized: pass --tokenizer (the tokenizer its ids come from)")
        # Lines of training documents only, in corpus order (all of them when they fit the sample).
        lines = [line for index, line in scan.sample if not is_val[index]]
        train_tokenizer(lines, model_path, vocab_size, seed=seed, max_lines=TOKENIZER_SAMPLE_LINES,
                        progress=progress)
    else:
        shutil.copyfile(tokenizer_path, model_path)
    scan.sample = []
    tokenizer = load_tokenizer(model_path)
    dtype = token_dtype(tokenizer.vocab_size)
    import_streaming()  # once in the parent, so forked workers inherit it
    settings = encode.EncodeSettings(
        tokenizer_path=str(model_path), seq_len=seq_len, dtype=dtype,
        columns={TOKENS_COLUMN: f"ndarray:{dtype}:{seq_len + 1}"}, shard_size_limit=SHARD_SIZE_LIMIT, out=str(work),
    )
    mine = (lambda block: block % num_shards == shard_index)
    total = sum(1 for b in range(len(scan.block_starts)) if mine(b))
    bar = tqdm(total=total, unit="block", desc="encoding", disable=not progress)
    rate = encode.Throughput()

    def on_block(result) -> None:
        rate.add(result)
        mb_s, tok_s = rate.rates()
        bar.set_postfix_str(f"{mb_s:.1f} MB/s, {tok_s / 1e3:.0f}k tokens/s", refresh=False)
        bar.update(1)

    try:
        blocks = encode.encode_blocks(settings, source.documents(), scan, is_val, workers=workers, mine=mine,
                                      on_block=on_block)
    finally:
        bar.close()
    if sum(r.bytes for r in blocks) and len(blocks) != total:
        raise DataError(f"the inputs changed while being prepared ({len(blocks)} blocks, expected {total}); run again")
    summary = _summary(source, scan, tokenizer, model_path, tokenizer_path, seq_len, dtype, val_fraction, seed,
                       [encode.as_dict(r) for r in blocks])
    if num_shards > 1:
        summary["part"] = {"index": shard_index, "of": num_shards, "blocks": len(scan.block_starts)}
        (work / PART_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    _finish_splits(work, summary)
    return summary


def _summary(source, scan, tokenizer, model_path, tokenizer_path, seq_len, dtype, val_fraction, seed, blocks):
    return {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "seq_len": seq_len,
        "sample_tokens": seq_len + 1,
        "column": TOKENS_COLUMN,
        "dtype": dtype,
        "tokenizer_sha256": file_sha256(model_path),
        "tokenizer_file": model_path.name,
        "tokenizer_source": "trained" if tokenizer_path is None else str(Path(tokenizer_path).absolute()),
        "source": source.describe,
        "documents": scan.documents,
        "bytes": scan.bytes,
        "val_fraction": val_fraction,
        "seed": seed,
        "blocks": blocks,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _finish_splits(work: Path, summary: dict) -> None:
    """Sum the blocks' statistics, merge each split's block indexes, write dataset.json."""
    from looptrain.data import encode

    blocks = sorted(summary.pop("blocks"), key=lambda b: b["block"])
    splits: dict[str, SplitStats] = {}
    for name in SPLITS:
        stats = [b["splits"][name] for b in blocks if name in b["splits"]]
        if not stats:
            continue
        total = SplitStats(**{key: sum(s[key] for s in stats) for key in asdict(SplitStats())})
        if total.sequences == 0:
            raise DataError(
                f"the {name} split has {total.tokens} tokens, fewer than one sequence of "
                f"seq_len + 1 = {summary['seq_len'] + 1}; use more text, a smaller --seq-len"
                + (" or a larger --val-fraction" if name == "val" else "")
            )
        encode.merge_block_indexes(work / name, [b["block"] for b in blocks])
        splits[name] = total
    summary["blocks"] = len(blocks)
    summary["splits"] = {name: asdict(value) for name, value in splits.items()}
    (work / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")


PART_FILE = "part.json"


def part_dir(out_dir: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    """Where array task `shard_index` of `num_shards` writes its part of OUT."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.part-{shard_index:05d}-of-{num_shards:05d}")


def merge_prepared_parts(out_dir: str | os.PathLike, num_shards: int, *, overwrite: bool = False) -> dict:
    """Join the parts written by `--shard-index i --num-shards n` tasks into the dataset OUT.

    Every part must exist and be made from the same corpus, tokenizer and
    settings; the parts are removed once OUT is committed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir}: already exists; pass --overwrite to replace it or choose another --out")
    check_replaceable(out_dir, [])
    parts = [part_dir(out_dir, i, num_shards) for i in range(num_shards)]
    missing = [str(p) for p in parts if not (p / PART_FILE).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: missing or unfinished ({len(missing)} of {num_shards} parts); "
                        "run the array tasks that did not finish, then merge again")
    metas = [json.loads((p / PART_FILE).read_text()) for p in parts]
    same = ("tokenizer_sha256", "seq_len", "documents", "bytes", "val_fraction", "seed", "source", "dtype")
    for part, meta in zip(parts[1:], metas[1:]):
        for key in same:
            if meta.get(key) != metas[0].get(key):
                hint = " (pass the same --tokenizer to every task)" if key == "tokenizer_sha256" else ""
                raise DataError(f"{part}: {key} differs from {parts[0]}'s; the parts are not of one corpus{hint}")
    work = out_dir.with_name(f"{out_dir.name}.tmp-{_HOST}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        shutil.copyfile(parts[0] / "tokenizer.model", work / "tokenizer.model")
        blocks = []
        for part, meta in zip(parts, metas):
            for name in SPLITS:
                if (part / name).is_dir():
                    (work / name).mkdir(exist_ok=True)
                    for block in sorted((part / name).iterdir()):
                        os.rename(block, work / name / block.name)
            blocks += meta["blocks"]
        if len({b["block"] for b in blocks}) != metas[0]["part"]["blocks"]:
            raise DataError(f"{out_dir}: the parts hold {len(blocks)} of {metas[0]['part']['blocks']} blocks; "
                            "prepare them again with the same --num-shards")
        summary = dict(metas[0])
        summary.pop("part")
        summary["blocks"] = blocks
        _finish_splits(work, summary)
        _commit(work, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return summary


# What `looptrain prepare` writes at the top of a dataset directory: the only
# entries --overwrite may delete.
DATASET_ENTRIES = frozenset({"dataset.json", "tokenizer.model", "tokenizer.json", *SPLITS})


def check_replaceable(out_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse to overwrite anything but an empty directory or a finished dataset, or one holding an input.

    --overwrite replaces a dataset; it must never delete a user's files (a
    corpus, a directory given by mistake), so a directory whose top level holds
    anything `looptrain prepare` does not write, or that lacks dataset.json,
    is refused with the name of what is in the way.
    """
    if not out_dir.exists():
        return
    resolved = out_dir.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == resolved or resolved in path.parents:
            raise DataError(
                f"{out_dir}: holds the input {item}; --out must be a new directory, not one with the corpus in it"
            )
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: is a file, not a dataset directory; choose another --out")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    foreign = [name for name in entries if name not in DATASET_ENTRIES]
    if foreign or "dataset.json" not in entries:
        what = f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}" if foreign else "has no dataset.json"
        raise DataError(
            f"{out_dir}: not a prepared dataset ({what}), so --overwrite will not delete it; "
            "choose another --out or empty it yourself"
        )
    try:
        fmt = json.loads((out_dir / "dataset.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != DATASET_FORMAT:
        raise DataError(
            f"{out_dir}: dataset.json is not a looptrain dataset's, so --overwrite will not delete it; "
            "choose another --out"
        )


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
    check_replaceable(out_dir, [])
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
