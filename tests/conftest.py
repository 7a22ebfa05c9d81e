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


# The session-wide local Slurm cluster (tests/slurm_fixtures.py). Imported by
# module name from this directory: a top-level `tests` package installed by a
# third-party distribution would shadow `tests.slurm_fixtures`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from slurm_fixtures import slurm_cluster  # noqa: E402,F401
