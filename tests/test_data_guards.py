"""Data that must not be lost or misread: `prepare --overwrite` deletes only datasets,
and a truncated shard is named when a dataset is opened (not mid-epoch)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from looptrain import exit_codes
from looptrain.data.corpus import corpus_text
from looptrain.data.errors import DataError
from looptrain.data.loader import check_dataset
from looptrain.data.prepare import prepare_dataset, read_dataset_json

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 400, 32


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """40 chapters of the KJV as text files (one paragraph per verse block)."""
    folder = tmp_path_factory.mktemp("guards") / "corpus"
    folder.mkdir()
    for i, chapter in enumerate(itertools.islice(corpus_text("bible"), 40)):
        (folder / f"{i:03}.txt").write_text(chapter.replace("\n", "\n\n"), encoding="utf-8")
    return folder


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _prepare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "looptrain.cli", "prepare", *args, "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_overwrite_refuses_a_directory_that_is_not_a_dataset(corpus_dir, tmp_path):
    """Regression: --overwrite deleted a directory of other files and exited 0."""
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / "train").mkdir()  # a name a dataset also uses does not make it one
    before = _tree(precious)
    run = _prepare_cli(str(corpus_dir), "--out", str(precious), "--vocab-size", str(VOCAB), "--seq-len",
                       str(SEQ_LEN), "--overwrite")
    assert run.returncode == exit_codes.BAD_INPUT, run.stderr
    assert "not a prepared dataset (holds thesis.tex)" in run.stderr and "will not delete it" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert _tree(precious) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"], "no temporary directory is left"


def test_overwrite_refuses_the_input_corpus_directory(corpus_dir, tmp_path):
    """Regression: `prepare CORPUS --out CORPUS --overwrite` deleted the corpus."""
    corpus = tmp_path / "mine"
    shutil.copytree(corpus_dir, corpus)
    before = _tree(corpus)
    run = _prepare_cli(str(corpus), "--out", str(corpus), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
                       "--overwrite")
    assert run.returncode == exit_codes.BAD_INPUT, run.stderr
    assert "holds the input" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert _tree(corpus) == before

    # An input file inside a prepared dataset directory is protected too.
    dataset = tmp_path / "ds"
    prepare_dataset([corpus], dataset, vocab_size=VOCAB, seq_len=SEQ_LEN, progress=False)
    inside = dataset / "train" / "extra.txt"
    shutil.copy(corpus / "000.txt", inside)
    with pytest.raises(DataError, match="holds the input"):
        prepare_dataset([corpus, inside], dataset, vocab_size=VOCAB, seq_len=SEQ_LEN, overwrite=True,
                        progress=False)
    assert inside.is_file()


def test_overwrite_replaces_a_dataset_or_an_empty_directory_only(corpus_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = prepare_dataset([corpus_dir], empty, vocab_size=VOCAB, seq_len=SEQ_LEN, overwrite=True, progress=False)
    second = prepare_dataset([corpus_dir], empty, vocab_size=VOCAB, seq_len=SEQ_LEN, seed=5, overwrite=True,
                             progress=False)
    assert read_dataset_json(empty) == second and second["seed"] == 5 != first["seed"]

    # A dataset with a file the user put there, or a directory that only looks like one, is kept.
    (empty / "README.md").write_text("my notes about this dataset")
    with pytest.raises(DataError, match=r"not a prepared dataset \(holds README.md\)"):
        prepare_dataset([corpus_dir], empty, vocab_size=VOCAB, seq_len=SEQ_LEN, overwrite=True, progress=False)
    assert (empty / "README.md").is_file() and read_dataset_json(empty) == second
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "dataset.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a looptrain dataset's, so --overwrite will not delete it"):
        prepare_dataset([corpus_dir], fake, vocab_size=VOCAB, seq_len=SEQ_LEN, overwrite=True, progress=False)
    assert (fake / "dataset.json").read_text() == '{"format": "something-else"}'


def test_truncated_shard_is_named_when_the_dataset_is_opened(corpus_dir, tmp_path):
    """Regression: a truncated shard passed the checks and failed mid-epoch with
    `IndexError: Relative sample index ... is not present in the shard`."""
    dataset = tmp_path / "ds"
    prepare_dataset([corpus_dir], dataset, vocab_size=VOCAB, seq_len=SEQ_LEN, progress=False)
    check_dataset(dataset, SEQ_LEN, VOCAB, splits=("train", "val"))
    shard = sorted((dataset / "train").rglob("shard.*.mds"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(DataError) as caught:
        check_dataset(dataset, SEQ_LEN, VOCAB)
    message = str(caught.value)
    assert f"{shard}: {size - 1000} bytes but index.json says {size}" in message and "\n" not in message

    # The trainer reports it as bad input, exit 2, before any run directory is written.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: t\nout_dir: {tmp_path / 'runs'}\ndata: {{dir: {dataset}}}\n"
        f"model: {{vocab_size: {VOCAB}, d_model: 16, n_heads: 2, core_layers: 1, loops: 2, max_seq_len: {SEQ_LEN}}}\n"
        "train: {steps: 2, micro_batch_size: 2, val_every: 0, device: cpu}\ntracking: {mode: disabled}\n"
    )
    run = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", str(recipe)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == exit_codes.BAD_INPUT, run.stderr
    assert "index.json says" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "runs" / "t" / "recipe.yaml").exists()
