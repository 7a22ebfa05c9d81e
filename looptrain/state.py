"""Everything besides model and optimizer that a resumed run needs to be
indistinguishable from one that never stopped."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (all ranks)
    data: dict[str, Any] = field(default_factory=dict)  # the streaming loader's state_dict
    depth_sampler: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: Optional[str] = None
    recipe_hash: str = ""
    last_metrics: dict[str, float] = field(default_factory=dict)  # per-loop norms etc. at save time
    log_window: dict[str, Any] = field(default_factory=dict)  # the partly filled log window (see Trainer)


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU and (if present) CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
