"""A real single-process training run on real (Bible) text, and bad-input handling."""

import json
import math
import os

import pytest

from looptrain import exit_codes
from looptrain.config import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, data_dir, *extra):
    return load_recipe(
        os.path.join(ROOT, "recipes/quickstart.yaml"),
        [
            f"data.dir={data_dir}", f"out_dir={tmp_path}", "name=tiny",
            "model.vocab_size=512", "model.max_seq_len=64", "model.d_model=64", "model.n_heads=4",
            "model.core_layers=1", "train.micro_batch_size=8", "train.steps=40", "train.log_every=10",
            "train.val_every=20", "train.val_batches=2", "optim.schedule.warmup_steps=5", *extra,
        ],
    )


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_short_run_learns_and_records_everything(tmp_path, bible_data):
    from looptrain.train import main_worker

    recipe = tiny(tmp_path, bible_data, "train.grad_accum=2")
    assert main_worker(recipe) == exit_codes.OK
    run_dir = recipe.run_dir
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.5
    for k in range(1, 5):  # per-exit losses and raw-state norms for every loop
        assert f"train/loss_exit/{k}" in train_rows[-1] and f"norm/mean/{k}" in train_rows[-1]
        assert train_rows[-1][f"norm/max/{k}"] >= train_rows[-1][f"norm/mean/{k}"] > 0
    val_rows = [r for r in rows if "val/loss/4" in r]
    assert [r["step"] for r in val_rows] == [20, 40]
    assert val_rows[-1]["val/ppl/4"] < 512
    assert load_recipe(os.path.join(run_dir, "recipe.yaml")) == recipe


@pytest.mark.slow
def test_terminal_supervision_still_measures_every_exit(tmp_path, bible_data):
    from looptrain.train import main_worker

    recipe = tiny(tmp_path, bible_data, "objective.supervision=terminal", "train.steps=10", "train.val_every=0")
    assert main_worker(recipe) == exit_codes.OK
    last = read_metrics(recipe.run_dir)[-1]
    assert all(f"train/loss_exit/{k}" in last for k in range(1, 5))


def test_missing_data_dir_fails_fast_with_one_line(tmp_path, capsys):
    from looptrain.cli import main

    code = main(["train", os.path.join(ROOT, "recipes/quickstart.yaml"), f"data.dir={tmp_path}/nope",
                 f"out_dir={tmp_path}"])
    assert code == exit_codes.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_vocab_mismatch_names_both_sizes(tmp_path, bible_data, capsys):
    from looptrain.cli import main

    code = main(["train", os.path.join(ROOT, "recipes/quickstart.yaml"), f"data.dir={bible_data}",
                 "model.vocab_size=100", "model.max_seq_len=64", f"out_dir={tmp_path}"])
    assert code == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert "512" in err and "100" in err
    assert not os.path.exists(os.path.join(tmp_path, "quickstart-blind-spot", "metrics.jsonl"))


@pytest.mark.slow
def test_quickstart_prepares_trains_both_runs_and_prints_the_table(tmp_path, capsys):
    """The main job end to end at a few steps: real corpus preparation, two real runs, the table."""
    from looptrain.cli import main

    code = main(["quickstart", "--steps", "4", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"),
                 "train.micro_batch_size=4", "train.val_batches=2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| quickstart-")}
    assert set(rows) == {"quickstart-blind-spot", "quickstart-final-only"}
    for line in rows.values():
        cells = [float(c) for c in line.strip().strip("|").split("|")[1:]]
        assert len(cells) == 8 and all(math.isfinite(c) and c > 0 for c in cells), line
    assert "final-loop RMS, blind spot / controlled:" in out
    assert (tmp_path / "data" / "dataset.json").is_file()
    phases = [line.split(" elapsed]: ")[1].split(" ")[:2] for line in out.splitlines() if "looptrain quickstart [" in line]
    assert phases == [["preparing", "the"], ["training", "quickstart-blind-spot"], ["training", "quickstart-final-only"]]


@pytest.mark.slow
def test_mfu_counts_the_flops_of_the_depths_and_exits_run(tmp_path, bible_data):
    """Terminal supervision at depths sampled from 1..4: MFU x peak / tokens/s is the model's FLOPs
    per token at the window's mean depth with one head read per step (FLOPs are affine in depth)."""
    import torch

    from looptrain.model import build_model
    from looptrain.train import main_worker

    recipe = tiny(tmp_path, bible_data, "objective.supervision=terminal", "objective.depth.mode=uniform",
                  "objective.depth.min=1", "objective.depth.max=4", "train.steps=10", "train.val_every=0",
                  "train.peak_tflops=1")
    assert main_worker(recipe) == exit_codes.OK
    last = read_metrics(recipe.run_dir)[-1]
    with torch.device("meta"):
        model = build_model(recipe.model)
    per_depth = {d: model.flops_per_token(depth=d, exits=1) for d in (1, 2)}
    mean_depth = last["train/depth"]
    assert 1 <= mean_depth <= 4 and mean_depth != 4  # the depth really was sampled
    expected = per_depth[1] + (mean_depth - 1) * (per_depth[2] - per_depth[1])
    assert last["perf/mfu"] * 1e12 == pytest.approx(expected * last["perf/tokens_per_s"], rel=1e-6)
    assert last["perf/peak_mem_gb"] > 0
