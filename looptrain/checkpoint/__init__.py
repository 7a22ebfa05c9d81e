"""Sharded checkpoints: atomic commit, validation, retention, resharding, export.

    from looptrain.checkpoint import Checkpointer, CheckpointError

`Checkpointer` (torch.distributed and DeepSpeed behind it) is imported on
first use, so that `CheckpointError` and `load_exported` stay cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from looptrain.checkpoint.errors import CheckpointError

if TYPE_CHECKING:
    from looptrain.checkpoint.checkpointer import Checkpointer
    from looptrain.checkpoint.exported import load_exported


def __getattr__(name: str):
    if name == "Checkpointer":
        from looptrain.checkpoint.checkpointer import Checkpointer

        return Checkpointer
    if name == "load_exported":
        from looptrain.checkpoint.exported import load_exported

        return load_exported
    raise AttributeError(f"module 'looptrain.checkpoint' has no attribute {name!r}")


__all__ = ["CheckpointError", "Checkpointer", "load_exported"]
