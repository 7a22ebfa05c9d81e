"""Shared test set-up: keep W&B, streaming and DeepSpeed state inside temp dirs."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/looptrain/torch_extensions"))


@pytest.fixture
def repo_root() -> str:
    return ROOT


@pytest.fixture(scope="session")
def bible_data(tmp_path_factory) -> str:
    """The King James Bible as a 512-token BPE dataset of 64-token sequences.

    Prepared once per session and shared by the training, parallel, halt and
    launch tests, which only read it.
    """
    from looptrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "bible"
    prepare_dataset("bible", out, vocab_size=512, seq_len=64, progress=False)
    return str(out)


# The session-wide local Slurm cluster (tests/slurm_fixtures.py). Imported by
# module name from this directory: a top-level `tests` package installed by a
# third-party distribution would shadow `tests.slurm_fixtures`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from slurm_fixtures import slurm_cluster  # noqa: E402,F401
