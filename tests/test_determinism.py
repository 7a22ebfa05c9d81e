"""train.deterministic: the recipe switch is applied, and two runs of one recipe log bit-identical losses."""

import os

import pytest
import torch

from looptrain import exit_codes
from looptrain.config import load_recipe
from looptrain.determinism import CUBLAS_WORKSPACE, configure_determinism
from looptrain.tracking.metrics_file import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_torch_determinism():
    """The switch is process-wide: put torch back as it was for the tests that follow."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


def tiny(tmp_path, data_dir, name):
    """A few steps of a small model with dropout and sampled depths, so that every RNG stream matters."""
    return load_recipe(
        os.path.join(ROOT, "recipes/quickstart.yaml"),
        [
            f"data.dir={data_dir}", f"out_dir={tmp_path}", f"name={name}", "model.vocab_size=512",
            "model.max_seq_len=64", "model.d_model=32", "model.n_heads=2", "model.core_layers=1",
            "model.dropout=0.1", "objective.depth.mode=uniform", "objective.depth.min=1", "objective.depth.max=4",
            "train.micro_batch_size=4", "train.steps=6", "train.log_every=1", "train.val_every=0",
            "train.deterministic=true", "checkpoint.save_final=false", "train.device=cpu",
        ],
    )


def test_two_deterministic_runs_log_bit_identical_losses(tmp_path, bible_data, restore_torch_determinism):
    """In one process, the harder case: nothing the first run leaves behind (the cached CPU
    peak-FLOP probe, streaming's shared memory) may shift the second run's data or dropout."""
    from looptrain.train import main_worker

    logged = []
    for name in ("first", "second"):
        recipe = tiny(tmp_path, bible_data, name)
        assert main_worker(recipe) == exit_codes.OK
        assert torch.are_deterministic_algorithms_enabled()  # the recipe's switch reached torch
        rows = [r for r in read_metrics(recipe.run_dir) if "train/loss" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        logged.append([{k: v for k, v in r.items() if k.startswith(("train/", "norm/"))} for r in rows])
    assert logged[0] == logged[1]
    assert len({r["train/depth"] for r in logged[0]}) > 1  # the sampled depths really varied


def test_the_switch_sets_torch_cudnn_and_cublas_and_off_leaves_them_alone(restore_torch_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ

    torch.backends.cudnn.benchmark = True
    configure_determinism(True)
    pass  #
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own choice is kept
    configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
