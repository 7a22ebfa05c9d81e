"""Datasets in a real S3-compatible object store: a `moto` server on a free localhost port.

The endpoint and credentials reach looptrain the way a user sets them for their
own S3-compatible store (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY);
nothing in streaming or boto is mocked. The secret key is a marker that must
never appear in anything a run writes or prints.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from looptrain import exit_codes

pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="install the s3 test extra: pip install -e .[dev]")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 512, 32
SECRET = f"secret-{uuid.uuid4().hex}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server in its own process; yields the environment a user would export."""
    home = tmp_path_factory.mktemp("s3")
    log = open(home / "moto.log", "w")
    for _ in range(5):  # a port found free can be taken before the server binds it
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"moto server did not start: {(home / 'moto.log').read_text()[-2000:]}")
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "looptrain-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
    }
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    from looptrain.data.loader import SINGLE_PROCESS_ENV

    for key, value in {**s3_server, **SINGLE_PROCESS_ENV}.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _bucket(env: dict[str, str]) -> str:
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from looptrain.data.corpus import corpus_text

    path = tmp_path_factory.mktemp("s3corpus") / "genesis.txt"
    path.write_text("\n\n".join(itertools.islice(corpus_text("bible"), 50)), encoding="utf-8")
    return path


def _cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env)
    full.update({"TMPDIR": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(key, None)
    return subprocess.run([sys.executable, "-m", "looptrain.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


def _recipe(data: dict, tmp_path: Path, name: str) -> dict:
    return {
        "name": name,
        "out_dir": str(tmp_path / "runs"),
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_heads": 2, "core_layers": 1, "loops": 2,
                  "max_seq_len": SEQ_LEN, "dropout": 0.1},
        "data": data,
        "optim": {"lr": 3e-3},
        "train": {"steps": 4, "micro_batch_size": 4, "log_every": 1, "val_every": 2, "val_batches": 2,
                  "device": "cpu", "seed": 3},
        "checkpoint": {"every": 2},
        "tracking": {"mode": "disabled"},
    }


def _write(recipe: dict, tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _assert_secret_nowhere(*places: Path, texts: tuple[str, ...] = ()) -> None:
    for text in texts:
        assert SECRET not in text
    for place in places:
        for path in [place] if place.is_file() else place.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_prepare_to_s3_then_train_from_s3(s3_env, corpus, tmp_path):
    """prepare --out s3://... uploads a dataset equal to a local one; training reads it
    through the cache; no credential reaches any file or output."""
    from looptrain.config.schema import DataConfig
    from looptrain.data.loader import build_train_loader
    from looptrain.data.prepare import prepare_dataset

    uri = f"s3://{_bucket(s3_env)}/datasets/genesis"
    args = ["prepare", str(corpus), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN), "--no-progress"]
    run = _cli([*args, "--out", uri], s3_env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"data.dir={uri}" in run.stdout
    again = _cli([*args, "--out", uri], s3_env, tmp_path)
    assert again.returncode == exit_codes.BAD_INPUT and "already holds a dataset; pass --overwrite" in again.stderr

    local = tmp_path / "local"
    prepare_dataset([corpus], local, vocab_size=VOCAB, seq_len=SEQ_LEN, progress=False)
    kw = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=8)
    from_s3 = build_train_loader(DataConfig(dir=uri, cache_dir=str(tmp_path / "cache")), **kw)
    from_disk = build_train_loader(DataConfig(dir=str(local)), **kw)
    pairs = list(zip(from_s3, from_disk))
    assert len(pairs) > 5 and all(torch.equal(a, b) for a, b in pairs)

    recipe = _recipe({"dir": uri}, tmp_path, "s3run")
    run = _cli(["train", str(_write(recipe, tmp_path))], s3_env, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "runs" / "s3run"
    assert (run_dir / "checkpoints").is_dir() and "val/loss" in (run_dir / "metrics.jsonl").read_text()
    _assert_secret_nowhere(run_dir, texts=(run.stdout, run.stderr, again.stderr))
    assert not list(tmp_path.glob("looptrain-data-pid*")), "a single process removes its own cache at exit"


def test_remote_problems_are_one_line_and_exit_2(s3_env, corpus, tmp_path, monkeypatch, capsys):
    import argparse

    from looptrain.config.schema import DataConfig
    from looptrain.data.cli import add_prepare_arguments, run_prepare
    from looptrain.data.errors import DataError
    from looptrain.data.streams import resolve_streams

    bucket = _bucket(s3_env)
    dead = f"http://127.0.0.1:{_free_port()}"
    cases = [
        ({}, f"s3://{bucket}/nothing/here", "dataset.json: not found at "),  # a bucket without a dataset
        ({}, f"s3://nobucket-{uuid.uuid4().hex[:8]}/ds", "does not exist"),
        ({"S3_ENDPOINT_URL": dead}, f"s3://{bucket}/ds", f"cannot reach the object store at {dead}"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, f"s3://{bucket}/ds",
         "no credentials for the object store"),
    ]
    for env, uri, message in cases:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value) if value else patch.delenv(key)
            with pytest.raises(DataError) as caught:
                resolve_streams(DataConfig(dir=uri, cache_dir=str(tmp_path / "cache")), seq_len=SEQ_LEN,
                                vocab_size=VOCAB)
        text = str(caught.value)
        assert message in text and "\n" not in text and SECRET not in text, (message, text)

    # A prepare into an unreachable store fails the same way, before any work.
    parser = add_prepare_arguments(argparse.ArgumentParser())
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    assert run_prepare(parser.parse_args([str(corpus), "--out", f"s3://{bucket}/x", "--no-progress"])) == 2
    assert "cannot reach the object store" in capsys.readouterr().err
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env["S3_ENDPOINT_URL"])
    assert run_prepare(parser.parse_args([str(corpus), "--out", "s3://no-such-bucket-x/ds", "--no-progress"])) == 2
    assert "bucket 'no-such-bucket-x' does not exist" in capsys.readouterr().err

    # From the command line: exit 2, one line, nothing written into the run directory.
    run = _cli(["train", str(_write(_recipe({"dir": f"s3://{bucket}/none"}, tmp_path, "bad"), tmp_path))],
               s3_env, tmp_path)
    assert run.returncode == exit_codes.BAD_INPUT, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and "dataset.json: not found" in run.stderr
    assert not (tmp_path / "runs" / "bad" / "recipe.yaml").exists()


@pytest.mark.slow
def test_two_rank_fsdp2_from_s3_killed_and_resumed_identically(s3_env, corpus, tmp_path, monkeypatch):
    """prepare -> s3:// -> 2-rank FSDP2 training from the bucket -> kill -9 -> restart: the
    losses continue exactly as in an uninterrupted run; no credential in any file."""
    import test_checkpoint
    from test_checkpoint import Job, assert_continues, step_losses

    uri = f"s3://{_bucket(s3_env)}/genesis"
    run = _cli(["prepare", str(corpus), "--out", uri, "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
                "--no-progress"], s3_env, tmp_path)
    assert run.returncode == 0, run.stderr
    # Job starts its ranks with this process's environment: the user's S3 settings.
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)

    def recipe(name: str) -> dict:
        data = _recipe({"dir": uri, "num_canonical_nodes": 2, "predownload": 8}, tmp_path, name)
        data["train"].update({"steps": 12, "global_batch_size": 8, "val_every": 6})
        data["checkpoint"].update({"every": 4, "keep_last": 10})
        data["parallel"] = {"backend": "fsdp2"}
        return data

    straight = Job(recipe("straight"), 2, tmp_path).wait()
    killed = recipe("killed")
    Job(killed, 2, tmp_path).kill_after_commit(4)
    resumed = Job(killed, 2, tmp_path).wait()
    assert_continues(resumed, step_losses(straight.run_dir), exact=True)
    _assert_secret_nowhere(resumed.run_dir, straight.run_dir, *resumed.logs, *straight.logs)
    assert test_checkpoint  # the Job helper is shared with the checkpoint tests
