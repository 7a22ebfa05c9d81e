"""Encoding a corpus in parallel with output that does not depend on the parallelism.

The corpus is cut into *blocks* of consecutive documents, a new block
starting once the previous one holds `BLOCK_BYTES` of text. Block boundaries
depend only on the corpus, never on the number of workers or array tasks.
Each block is encoded and packed on its own (its documents' token stream
cut into rows of seq_len + 1, the tail that fills no row dropped, at most
seq_len tokens per block and split) and written as MDS shards into
`SPLIT/block-NNNNN/`; the blocks' indexes are then merged, in block order,
with mosaicml-streaming's `merge_index`. So 1 worker, 8 workers or a Slurm
array of 16 tasks write the same samples in the same order into the same
shard files.

The corpus is read twice: a scan (count documents, place block boundaries,
reservoir-sample lines for the tokenizer, one pass without encoding) and the
encoding pass, in which the main process reads and hands whole blocks to
worker processes, a bounded number at a time.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

BLOCK_BYTES = 8 << 20  # ~2M tokens of English per block: parallel grain, and at most seq_len tokens lost per block
BLOCK_DIR = "block-{:05d}"


@dataclass
class CorpusScan:
    """What one pass over the corpus (without encoding) learned."""

    documents: int = 0
    bytes: int = 0
    block_starts: list[int] = field(default_factory=list)  # first document index of each block
    sample: list[tuple[int, str]] = field(default_factory=list)  # (document index, line) for the tokenizer
    token_documents: int = 0  # pre-tokenized documents (token id arrays)


def scan_corpus(documents: Iterable[str], *, max_lines: int, seed: int, block_bytes: int = BLOCK_BYTES) -> CorpusScan:
    """Count documents, place block boundaries and reservoir-sample up to max_lines non-empty lines."""
    rng = random.Random(seed)
    out = CorpusScan()
    in_block = block_bytes  # start a block at the first document
    seen = 0
    for index, document in enumerate(documents):
        size = document_bytes(document)
        if in_block >= block_bytes:
            out.block_starts.append(index)
            in_block = 0
        in_block += size
        out.bytes += size
        out.documents += 1
        if not isinstance(document, str):
            out.token_documents += 1
            continue
        if not max_lines:  # a given tokenizer needs no sample
            continue
        for line in document.split("\n"):
            if not line:
                continue
            seen += 1
            if len(out.sample) < max_lines:
                out.sample.append((index, line))
            else:
                slot = rng.randrange(seen)
                if slot < max_lines:
                    out.sample[slot] = (index, line)
    return out


def document_bytes(document) -> int:
    """Text bytes of a document; 4 per id for a pre-tokenized one."""
    if isinstance(document, str):
        return len(document.encode("utf-8", "surrogatepass"))
    return 4 * len(document)


@dataclass
class BlockResult:
    block: int
    bytes: int = 0
    splits: dict[str, dict] = field(default_factory=dict)  # name -> SplitStats-like dict


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_path: str
    seq_len: int
    dtype: str
    columns: dict
    shard_size_limit: int
    out: str  # the directory holding SPLIT/block-NNNNN/


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    from looptrain.data.tokenizer import load_tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def encode_block(settings: EncodeSettings, block: int, texts: Sequence[str], is_val: np.ndarray) -> BlockResult:
    """Encode, pack and write one block (runs in a worker process, or in the caller for one worker)."""
    from looptrain.data.errors import DataError
    from looptrain.data.prepare import TOKENS_COLUMN, SequencePacker
    from looptrain.data.streaming_import import import_streaming

    tokenizer = _tokenizer(settings.tokenizer_path)
    text_at = [i for i, t in enumerate(texts) if isinstance(t, str)]
    encoded: list = list(texts)  # pre-tokenized documents are used as they are
    for i, ids in zip(text_at, tokenizer.encode_batch([texts[i] for i in text_at], num_threads=1) if text_at else []):
        encoded[i] = ids
    for i, ids in enumerate(encoded):
        if i not in text_at and len(ids) and (int(np.max(ids)) >= tokenizer.vocab_size or int(np.min(ids)) < 0):
            raise DataError(f"a pre-tokenized document (block {block}) holds id {int(np.max(ids))}, outside the "
                            f"tokenizer's {tokenizer.vocab_size} ids; pass the tokenizer it was made with")
    eos = np.array([tokenizer.eos_id], dtype=settings.dtype)
    result = BlockResult(block=block, bytes=sum(document_bytes(t) for t in texts))
    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    documents = {"train": 0, "val": 0}
    for ids, val in zip(encoded, is_val):
        name = "val" if val else "train"
        streams[name].append(np.asarray(ids, dtype=settings.dtype))
        streams[name].append(eos)
        documents[name] += 1
    streaming = import_streaming()
    for name, parts in streams.items():
        if not documents[name]:
            continue
        tokens = np.concatenate(parts)
        rows = SequencePacker(settings.seq_len, settings.dtype).add(tokens)
        if len(rows):
            writer = streaming.MDSWriter(out=os.path.join(settings.out, name, BLOCK_DIR.format(block)),
                                         columns=settings.columns, size_limit=settings.shard_size_limit)
            try:
                for row in rows:
                    writer.write({TOKENS_COLUMN: row})
            finally:
                writer.finish()
        sequences = len(rows)
        result.splits[name] = {
            "documents": documents[name],
            "tokens": int(len(tokens)),
            "sequences": sequences,
            "dropped_tokens": int(len(tokens) - (sequences * settings.seq_len + 1 if sequences else 0)),
        }
    return result


def blocks_of(documents: Iterable[str], block_starts: Sequence[int]) -> Iterator[tuple[int, int, list[str]]]:
    """(block number, index of its first document, its documents) in corpus order."""
    bounds = list(block_starts[1:])
    block, start, texts = 0, 0, []
    for index, document in enumerate(documents):
        if bounds and index == bounds[0]:
            yield block, start, texts
            bounds.pop(0)
            block, start, texts = block + 1, index, []
        texts.append(document)
    if texts:
        yield block, start, texts


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def encode_blocks(
    settings: EncodeSettings,
    documents: Iterable[str],
    scan: CorpusScan,
    is_val: np.ndarray,
    *,
    workers: int = 1,
    mine: Callable[[int], bool] = lambda block: True,
    on_block: Optional[Callable[[BlockResult], None]] = None,
) -> list[BlockResult]:
    """Encode the blocks `mine` selects with `workers` processes; results in block order.

    The main process reads the documents and keeps at most 2 x workers
    blocks in flight, so memory stays bounded whatever the corpus size.
    """
    results: list[BlockResult] = []

    def done(result: BlockResult) -> None:
        results.append(result)
        if on_block is not None:
            on_block(result)

    tasks = (
        (block, texts, is_val[start:start + len(texts)])
        for block, start, texts in blocks_of(documents, scan.block_starts)
        if mine(block)
    )
    if workers <= 1:
        for block, texts, val in tasks:
            done(encode_block(settings, block, texts, val))
        return results
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["looptrain.data.encode_preload"])
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        pending: deque = deque()
        for block, texts, val in tasks:
            pending.append(pool.apply_async(encode_block, (settings, block, texts, val)))
            while len(pending) >= 2 * workers:
                done(pending.popleft().get())
        while pending:
            done(pending.popleft().get())
    return results


def merge_block_indexes(split_dir: Path, blocks: Sequence[int]) -> int:
    """Write SPLIT/index.json from the blocks' indexes (streaming's merge_index); return the shard count."""
    from looptrain.data.streaming_import import import_streaming

    import_streaming()
    from streaming.base.util import merge_index

    indexes = [str(split_dir / BLOCK_DIR.format(b) / "index.json") for b in blocks
               if (split_dir / BLOCK_DIR.format(b) / "index.json").is_file()]
    if not indexes:
        return 0
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # merge_index logs its temp folder as a warning
    try:
        merge_index(indexes, str(split_dir))
    finally:
        logging.disable(previous)
    import json

    return len(json.loads((split_dir / "index.json").read_text())["shards"])


class Throughput:
    """MB/s and tokens/s for the progress bar."""

    def __init__(self):
        self.start = time.perf_counter()
        self.bytes = 0
        self.tokens = 0

    def add(self, result: BlockResult) -> None:
        self.bytes += result.bytes
        self.tokens += sum(s["tokens"] for s in result.splits.values())

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.bytes / elapsed / 1e6, self.tokens / elapsed


def as_dict(result: BlockResult) -> dict:
    return asdict(result)
