"""Which checkpoints are good: saved while every monitor rule passed.

A run the norm monitor halts leaves checkpoints of a state that is already
going wrong: the halt checkpoint itself, and interval checkpoints saved while a
rule was over its halt threshold but inside its patience. Each manifest says
whether its state passed every rule (`healthy`, with `reason: halt` for a halt
checkpoint). The newest good checkpoint is never deleted by retention, and it
is where `resume: auto` starts when the recipe changed after a halt.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.layout import committed
from looptrain.checkpoint.manifest import read_manifest

# The newer checkpoints of a halted run, moved aside when a changed recipe resumes from an older one.
SUPERSEDED_PREFIX = "superseded-"


def is_good(path: Path) -> bool:
    """Whether a committed checkpoint's state passed every monitor rule (checkpoints written
    before manifests recorded it count as good unless they were halt checkpoints)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    return bool(manifest.get("healthy", manifest.get("reason") != "halt"))


def last_good_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest committed checkpoint whose state passed every monitor rule, or None."""
    for path in reversed(committed(ckpt_root)):
        if is_good(path):
            return path
    return None


def without_patience(monitor_state: dict[str, Any]) -> dict[str, Any]:
    """A monitor state with every rule's patience counters at zero (histories kept)."""
    state = copy.deepcopy(monitor_state)
    for counters in (state.get("rules") or {}).values():
        counters["warn_streak"] = 0
        counters["halt_streak"] = 0
    return state
