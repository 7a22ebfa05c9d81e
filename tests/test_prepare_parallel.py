"""Parallel preparation: the same dataset whatever the number of workers or array tasks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptrain import exit_codes
from looptrain.data.corpus import corpus_text
from looptrain.data.loader import check_dataset
from looptrain.data.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 512, 32
BLOCK = 48 << 10  # small blocks, so that this corpus has many


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("par") / "kjv.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for chapter in itertools.islice(corpus_text("bible"), 120):
            f.write(json.dumps({"text": chapter}) + "\n")
    return path


def _files(root: Path) -> dict[str, bytes]:
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    meta = json.loads(out.pop("dataset.json"))
    meta.pop("created")
    out["dataset.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def test_workers_do_not_change_the_dataset(corpus, tmp_path):
    one = prepare_dataset([corpus], tmp_path / "one", vocab_size=VOCAB, seq_len=SEQ_LEN, block_bytes=BLOCK,
                          workers=1, progress=False)
    two = prepare_dataset([corpus], tmp_path / "two", vocab_size=VOCAB, seq_len=SEQ_LEN, block_bytes=BLOCK,
                          workers=2, progress=False)
    assert one["blocks"] == two["blocks"] >= 8
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    check_dataset(tmp_path / "two", SEQ_LEN, VOCAB, splits=("train", "val"))
    # Every document is in exactly one split; each block loses less than one row per split.
    splits = one["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == one["documents"] == 120
    assert splits["train"]["dropped_tokens"] < one["blocks"] * SEQ_LEN


def _cli(*args: str, tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "looptrain.cli", "prepare", *args, "--no-progress"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_one_line_job_array_scripts_prepare_the_same_dataset(corpus, tmp_path):
    """`--num-shards 2 --cluster PROFILE --emit-sbatch` writes the array and merge scripts; run
    here with bash (the #SBATCH lines are comments), task by task as Slurm would, they give the
    dataset a single process makes. (Submission itself needs a cluster: not run here.)"""
    profile = tmp_path / "cpu.yaml"
    profile.write_text("partition: cpu\ncpus_per_task: 1\ntime_limit_min: 30\nsetup: ['export FROM_PROFILE=1']\n")
    out = tmp_path / "arr"
    emit = _cli(str(corpus), "--out", str(out), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
                "--block-mb", str(BLOCK / (1 << 20)), "--num-shards", "2", "--cluster", str(profile),
                "--emit-sbatch", tmp_path=tmp_path)
    stdout, err = emit.communicate(timeout=300)
    assert emit.returncode == 0, err
    folder = tmp_path / "arr.slurm"
    array = (folder / "array.sbatch").read_text()
    assert "#SBATCH --array=0-1" in array and "#SBATCH --partition=cpu" in array and "export FROM_PROFILE=1" in array
    assert "--dependency=afterok" in stdout
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TMPDIR=str(tmp_path), SLURM_CPUS_PER_TASK="1")
    def task(index: str) -> None:
        run = subprocess.run(["bash", str(folder / "array.sbatch")], env=dict(env, SLURM_ARRAY_TASK_ID=index),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr

    def merge() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(folder / "merge.sbatch")], env=env, capture_output=True, text=True,
                              timeout=600)

    task("1")
    early = merge()  # a task still missing: refused, nothing merged
    assert early.returncode == exit_codes.BAD_INPUT and "missing or unfinished (1 of 2 parts)" in early.stderr
    assert not out.exists()
    task("0")
    run = merge()
    assert run.returncode == 0, run.stderr
    assert f"train with: data.dir={out}" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("arr")) == ["arr", "arr.slurm"]
    reference = tmp_path / "ref"
    prepare_dataset([corpus], reference, vocab_size=VOCAB, seq_len=SEQ_LEN, block_bytes=BLOCK, progress=False)
    assert _files(out) == _files(reference)


def test_bad_parallel_arguments_are_one_line_and_exit_2(corpus, tmp_path, capsys):
    import argparse

    from looptrain.data.cli import add_prepare_arguments, run_prepare

    parser = add_prepare_arguments(argparse.ArgumentParser())
    cases = [
        (["--workers", "0"], "--workers 0: must be >= 1"),
        (["--num-shards", "2", "--shard-index", "2"], "need 0 <= index < num-shards"),
        (["--emit-sbatch"], "add --cluster PROFILE"),
        (["--num-shards", "2", "--out", "s3://bucket/x"], "the parts of --num-shards tasks go to a shared local"),
    ]
    for extra, message in cases:
        args = parser.parse_args([str(corpus), "--out", str(tmp_path / "x"), "--no-progress", *extra])
        assert run_prepare(args) == exit_codes.BAD_INPUT, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "x").exists()
