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
