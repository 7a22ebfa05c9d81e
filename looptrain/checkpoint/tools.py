"""`looptrain inspect` and `looptrain export`: looking into and out of checkpoints.

Neither needs a process group, the training stack or the machine that wrote
the checkpoint: they read the manifest, the saved recipe and trainer state,
and (for export) the model shards with DCP in single-process mode or
DeepSpeed's zero_to_fp32 consolidation.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from looptrain import exit_codes
from looptrain.checkpoint import payload
from looptrain.checkpoint.errors import CheckpointError
from looptrain.fileio import human_size
from looptrain.checkpoint.layout import resolve_checkpoint
from looptrain.checkpoint.manifest import read_manifest, validate
from looptrain.checkpoint.safe_load import UnsafeCheckpointError

TRAIN_MODULE_PREFIX = "model."  # the train module holds the LoopedLM as `.model`
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _resolve(path: str | Path) -> Path:
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


# ------------------------------------------------------------------- inspect


def _recipe_lines(saved: dict, current: Any, path: Path) -> list[str]:
    from looptrain.checkpoint.compat import ARCHITECTURE_KEYS, check_compatible
    from looptrain.config.loader import diff_recipes, recipe_to_dict

    current_dict = current if isinstance(current, dict) else recipe_to_dict(current)
    changes = diff_recipes(saved, current_dict)
    if not changes:
        return ["recipe diff: none (the current recipe equals the checkpoint's)"]
    try:
        check_compatible(saved, current_dict, str(path))
        verdict = "resumable"
    except CheckpointError as err:
        verdict = f"NOT resumable: {err}"
    lines = [f"recipe diff vs the current recipe ({len(changes)} keys, {verdict}):"]
    width = max(len(k) for k, _, _ in changes)
    for key, old, new in changes:
        flag = "  (changes the model)" if key in ARCHITECTURE_KEYS else ""
        lines.append(f"  {key:<{width}}  {old!r} -> {new!r}{flag}")
    return lines


def _norm_lines(metrics: dict[str, float], step: int) -> list[str]:
    suffixes = (k.rsplit("/", 1)[1] for k in metrics if k.startswith("norm/"))
    loops = sorted({int(s) for s in suffixes if s.isdigit()})
    if not loops:
        return ["per-loop norms at save: none recorded"]
    cols = [("rms", "norm/rms/"), ("mean", "norm/mean/"), ("p99", "norm/p99/"), ("max", "norm/max/"),
            ("ratio", "norm/ratio/"), ("loss", "train/loss_exit/")]
    lines = [f"per-loop norms of the raw state at the last log before the save (step {step}):"]
    lines.append("  loop" + "".join(f"{name:>12}" for name, _ in cols))
    for k in loops:
        lines.append(f"  {k:>4}" + "".join(f"{_fmt(metrics.get(prefix + str(k))):>12}" for _, prefix in cols))
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        if key in metrics:
            lines.append(f"  {key} = {_fmt(metrics[key])}")
    return lines


def inspect_checkpoint(path: str | Path, current_recipe: Any = None) -> str:
    """A human-readable summary of a checkpoint (a checkpoint, checkpoints or run directory)."""
    ckpt = _resolve(path)
    manifest = read_manifest(ckpt)
    try:
        validate(ckpt)
        status = f"valid ({len(manifest['files'])} files, sizes and sha256 match the manifest)"
    except CheckpointError as err:
        status = f"INVALID: {err}"
    saved_at = manifest.get("saved_unix_time")
    when = datetime.datetime.fromtimestamp(saved_at).isoformat(timespec="seconds") if saved_at else "-"
    backend = f"{manifest.get('backend')} ({manifest.get('store')} format)"
    if manifest.get("zero_stage") is not None:
        backend += f", ZeRO-{manifest['zero_stage']}"
    lines = [
        f"checkpoint   {ckpt}",
        f"status       {status}",
        f"step         {manifest.get('step')}",
        f"tokens       {manifest.get('tokens', 0):,}",
        f"reason       {manifest.get('reason')}",
        f"saved        {when}",
        f"run          {manifest.get('run')}  (recipe hash {manifest.get('recipe_hash')})",
        f"backend      {backend}",
        f"world size   {manifest.get('world_size')}",
        "",
    ]
    if current_recipe is not None:
        try:
            lines.extend(_recipe_lines(payload.load_recipe_dict(ckpt), current_recipe, ckpt))
        except CheckpointError as err:
            lines.append(f"recipe diff: unavailable ({err})")
        lines.append("")
    files = manifest["files"]
    groups: dict[str, list[tuple[str, int]]] = {}
    for rel, entry in files.items():
        groups.setdefault(rel.split("/")[0] if "/" in rel else ".", []).append((rel, entry["bytes"]))
    total = sum(e["bytes"] for e in files.values())
    lines.append(f"files ({len(files)}, {human_size(total)}):")
    for group in sorted(groups):
        items = sorted(groups[group])
        if len(items) > 8:
            size = sum(b for _, b in items)
            largest = human_size(max(b for _, b in items))
            lines.append(f"  {group + '/':<44}{human_size(size):>12}  ({len(items)} files, largest {largest})")
        else:
            lines.extend(f"  {rel:<44}{human_size(b):>12}" for rel, b in items)
    lines.append("")
    try:
        state = payload.load_trainer_state(ckpt)
        lines.extend(_norm_lines(state.last_metrics, state.step))
        if state.wandb_run_id:
            lines.append(f"  W&B run id {state.wandb_run_id}")
    except UnsafeCheckpointError:
        raise  # a crafted file is refused outright, not summarised
    except CheckpointError as err:
        lines.append(f"trainer state: unreadable ({err})")
    return "\n".join(lines)


# -------------------------------------------------------------------- export


def clean_name(name: str) -> str:
    """A train-module parameter name -> the bare LoopedLM name."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith(TRAIN_MODULE_PREFIX):
        name = name[len(TRAIN_MODULE_PREFIX):]
    return name


def _model_config(ckpt: Path):
    from looptrain.config.loader import build_dataclass
    from looptrain.config.schema import ModelConfig, RecipeError

    saved = payload.load_recipe_dict(ckpt)
    try:
        return build_dataclass(ModelConfig, saved.get("model", {}), "model")
    except RecipeError as err:
        raise CheckpointError(f"{ckpt / payload.RECIPE_FILE}: its model section does not load ({err})") from None


def _dcp_weights(ckpt: Path, names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.api import CheckpointException

    from looptrain.checkpoint.dcp_store import DCP_DIR, MODEL_KEY
    from looptrain.checkpoint.safe_load import dcp_load

    request = {MODEL_KEY: {TRAIN_MODULE_PREFIX + n: torch.empty_like(t) for n, t in names.items()}}
    try:
        dcp_load(request, ckpt / DCP_DIR, no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt / DCP_DIR}: the model weights do not load ({first})") from err
    return {clean_name(k): v for k, v in request[MODEL_KEY].items()}


def _deepspeed_weights(ckpt: Path, manifest: dict) -> dict[str, torch.Tensor]:
    from looptrain.checkpoint.deepspeed_store import DS_DIR, TAG

    from looptrain.checkpoint.safe_load import check_torch_files, restricted_torch_load, safe_torch_load

    check_torch_files(ckpt / DS_DIR / TAG)  # a crafted file is refused before DeepSpeed reads it
    if int(manifest.get("zero_stage") or 0) == 0:
        # No ZeRO partitions: the model-states file holds the full module.
        blob = safe_torch_load(ckpt / DS_DIR / TAG / "mp_rank_00_model_states.pt", map_location="cpu")
        state = blob["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with restricted_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / DS_DIR), tag=TAG)
    return {clean_name(k): v.float() if v.is_floating_point() else v for k, v in state.items()}


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write model.safetensors + model_config.json for the checkpoint's model; returns out_dir."""
    from looptrain.checkpoint.exported import save_exported
    from looptrain.model import LoopedLM

    ckpt = _resolve(path)
    manifest = validate(ckpt)
    cfg = _model_config(ckpt)
    with torch.device("meta"):
        reference = LoopedLM(cfg).state_dict()
    if manifest.get("store") == "deepspeed":
        weights = _deepspeed_weights(ckpt, manifest)
    else:
        weights = _dcp_weights(ckpt, {n: torch.empty(t.shape, dtype=t.dtype) for n, t in reference.items()})
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        raise CheckpointError(
            f"{ckpt}: the saved weights do not match the model of its recipe (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); the checkpoint was written by another model version"
        )
    for name, ref in reference.items():
        if tuple(weights[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{ckpt}: {name} has shape {tuple(weights[name].shape)}, the model expects {tuple(ref.shape)}"
            )
    ordered = {name: weights[name].to(ref.dtype) for name, ref in reference.items()}
    return save_exported(ordered, cfg, out_dir)


# ----------------------------------------------------------------------- CLI


def run_inspect(args) -> int:
    current: Optional[Any] = None
    if args.recipe:
        from looptrain.config import load_recipe

        current = load_recipe(args.recipe, args.overrides)
    try:
        print(inspect_checkpoint(args.checkpoint, current))
    except CheckpointError as err:
        print(f"looptrain: error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return exit_codes.OK


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run / checkpoints directory (its latest)")
    parser.add_argument("out", help="output directory for model.safetensors and model_config.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")


def run_export(args) -> int:
    from looptrain.checkpoint.exported import CONFIG_FILE, WEIGHTS_FILE

    out = Path(args.out)
    if not args.overwrite and ((out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists()):
        print(f"looptrain: error: {out}: already holds an export; pass --overwrite or choose another OUT",
              file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        export_checkpoint(args.checkpoint, out)
    except CheckpointError as err:
        print(f"looptrain: error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(f"exported {args.checkpoint} -> {out / WEIGHTS_FILE}, {out / CONFIG_FILE}")
    return exit_codes.OK
