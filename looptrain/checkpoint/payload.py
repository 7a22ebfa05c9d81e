"""Non-tensor training state on disk: trainer state, per-rank RNG, recipe.

Everything here is written with `torch.save` (or JSON) in a form that
`torch.load(weights_only=True)` reads back: dicts, lists, numbers, strings
and tensors only. Loading a checkpoint therefore never unpickles arbitrary
objects, so a checkpoint from elsewhere cannot run code.

    trainer_state.pt     TrainerState fields (step, tokens, data position,
                         depth-sampler generator, monitor state, tracker run id,
                         recipe hash, metrics at save time)
    rng/rank_00003.pt    RNG streams of rank 3 (python, numpy, torch, cuda)
    recipe.json          the resolved recipe that made the checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.safe_load import safe_torch_load
from looptrain.redact import redact
from looptrain.state import TrainerState

TRAINER_STATE_FILE = "trainer_state.pt"
RECIPE_FILE = "recipe.json"
RNG_DIR = "rng"
TRAINER_STATE_VERSION = 1


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, resume from another one")
    try:
        return safe_torch_load(path, map_location="cpu", extra_globals=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as plain tensors and values ({first}); it is damaged or not written by "
            "looptrain, resume from another checkpoint"
        ) from None


# ---------------------------------------------------------------------- RNG


def rng_to_safe(state: dict[str, Any]) -> dict[str, Any]:
    """`looptrain.state.capture_rng_state()` -> tensors, lists and numbers only."""
    version, mt, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in mt], "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": state["torch"].clone(),
    }
    if "cuda" in state:
        out["cuda"] = [s.clone() for s in state["cuda"]]
    return out


def rng_from_safe(safe: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `rng_to_safe`, in the form `looptrain.state.restore_rng_state` takes."""
    py, npy = safe["python"], safe["numpy"]
    state: dict[str, Any] = {
        "python": (py["version"], tuple(py["state"]), py["gauss"]),
        "numpy": (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        ),
        "torch": safe["torch"],
    }
    if "cuda" in safe:
        state["cuda"] = safe["cuda"]
    return state


def save_rng(directory: Path, rank: int, state: dict[str, Any]) -> None:
    _save(rng_to_safe(state), directory / rng_file(rank))


def load_rng(directory: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state, or None when the checkpoint had fewer ranks."""
    path = directory / rng_file(rank)
    if not path.is_file():
        return None
    return rng_from_safe(_load(path))


# ------------------------------------------------------------- trainer state


def save_trainer_state(directory: Path, state: TrainerState) -> None:
    payload = {"version": TRAINER_STATE_VERSION, **dataclasses.asdict(state)}
    _save(payload, directory / TRAINER_STATE_FILE)


def load_trainer_state(directory: Path) -> TrainerState:
    path = directory / TRAINER_STATE_FILE
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("version") != TRAINER_STATE_VERSION:
        raise CheckpointError(
            f"{path}: trainer state version {payload.get('version') if isinstance(payload, dict) else None!r}, "
            f"expected {TRAINER_STATE_VERSION}; use the looptrain version that wrote it"
        )
    names = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in payload.items() if k in names})


# -------------------------------------------------------------------- recipe


def save_recipe(directory: Path, recipe_dict: dict[str, Any]) -> None:
    path = directory / RECIPE_FILE
    with open(path, "w") as f:
        json.dump(redact(recipe_dict), f, indent=1)  # no credential in a checkpoint
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def load_recipe_dict(directory: Path) -> dict[str, Any]:
    path = directory / RECIPE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, resume from another one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is damaged") from None
