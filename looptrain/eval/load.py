"""Find the model, its recipe and its data from whatever path the user has.

Accepted paths
    an exported model:   DIR/model.safetensors + DIR/model_config.json
                         (`looptrain export`); a recipe.yaml beside them is used
                         when present.
    a checkpoint:        .../checkpoints/step_XXXXXXXX/
    a run directory:     <out_dir>/<name>/ holding recipe.yaml and checkpoints/
                         (its latest checkpoint).

Checkpoints are sharded training state; they are consolidated through
`looptrain.checkpoint.tools.export_checkpoint` into a temporary export and
loaded from there with `looptrain.checkpoint.exported.load_exported`, so
evaluation reads exactly what `looptrain export` writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

from looptrain.config.schema import Recipe

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
RECIPE_YAML = "recipe.yaml"


class EvalError(ValueError):
    """An evaluation input is unusable; the message names it and the fix."""


class LoadedModel(NamedTuple):
    model: "object"  # looptrain.model.LoopedLM, in eval mode on the CPU
    recipe: Optional[Recipe]
    data_dir: Optional[str]


def is_exported(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file()


def source_name(path: str | os.PathLike) -> str:
    """A short label for tables and plots: the run name (plus step for a checkpoint)."""
    p = Path(path).resolve()
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}@{p.name[len('step_'):].lstrip('0') or '0'}"
    return p.name or str(p)


def run_dir_of(path: str | os.PathLike) -> Optional[Path]:
    """The run directory a path belongs to (itself, or the owner of its checkpoints), if any."""
    p = Path(path).resolve()
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / RECIPE_YAML).is_file():
            return candidate
    return None


def _read_recipe(path: Path) -> Optional[Recipe]:
    from looptrain.config import load_recipe

    if (path / RECIPE_YAML).is_file():
        return load_recipe(str(path / RECIPE_YAML))
    return None


def _load_exported_model(path: Path):
    from looptrain.checkpoint.exported import load_exported

    try:
        return load_exported(path)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from None


def _load_checkpoint_model(path: Path):
    from looptrain.checkpoint.tools import export_checkpoint  # DCP / DeepSpeed: imported only when needed

    with tempfile.TemporaryDirectory(prefix="looptrain-eval-") as tmp:
        export_checkpoint(path, tmp)
        return _load_exported_model(Path(tmp))


def _checkpoint_recipe(path: Path) -> Optional[Recipe]:
    """The recipe saved inside the checkpoint (recipe.json), else the run directory's recipe.yaml."""
    from looptrain.checkpoint.layout import resolve_checkpoint
    from looptrain.config import recipe_from_dict

    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError:
        ckpt = None
    if ckpt is not None and (ckpt / "recipe.json").is_file():
        return recipe_from_dict(json.loads((ckpt / "recipe.json").read_text()))
    run_dir = run_dir_of(path)
    return _read_recipe(run_dir) if run_dir is not None else None


def load_model_for_eval(path: str | os.PathLike) -> LoadedModel:
    """(model, recipe or None, data_dir or None) for an export, a checkpoint or a run directory."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"{p}: no such file or directory; pass an export, a checkpoint or a run directory")
    if not p.is_dir():
        raise EvalError(f"{p}: is a file; pass the directory that holds {WEIGHTS_FILE}, or a run directory")
    if is_exported(p):
        model = _load_exported_model(p)
        recipe = _read_recipe(p)
    elif (p / "checkpoints").is_dir() or (p / "manifest.json").is_file() or p.name.startswith("step_") \
            or (p / "latest").is_file():
        model = _load_checkpoint_model(p)
        recipe = _checkpoint_recipe(p)
    else:
        raise EvalError(
            f"{p}: neither an export ({WEIGHTS_FILE} + {CONFIG_FILE}) nor a run/checkpoint directory "
            "(recipe.yaml + checkpoints/); point at one of those"
        )
    data_dir = None
    if recipe is not None:  # with data.streams: the first stream's (pass --data for another)
        data_dir = recipe.data.streams[0].path if recipe.data.streams else recipe.data.dir
    return LoadedModel(model.eval(), recipe, data_dir)
