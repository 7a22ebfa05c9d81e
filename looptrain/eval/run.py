"""Evaluate one model end to end: batches -> one deep pass -> depth curve, exits, diagnostics.

`evaluate_run(path, data_dir, depths, batches)` is the entry point for scripts
(reports over many runs); `evaluate_model` does the same for a model already
in memory and a list of batches, without touching the disk.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from looptrain.eval.collect import DEFAULT_CHUNK_TOKENS, collect_exit_data, resolve_device
from looptrain.eval.depth import depth_result
from looptrain.eval.exits import DEFAULT_TOLERANCE, evaluate_exits
from looptrain.eval.load import EvalError, load_model_for_eval, source_name
from looptrain.eval.progress import progress_bar

DEFAULT_BATCHES = 20
DEFAULT_BATCH_SIZE = 8
MODEL_FIELDS = ("d_model", "core_layers", "loops", "readout", "recurrence", "injection", "exit_gate", "vocab_size",
                "max_seq_len")


def default_depths(trained_depth: int) -> list[int]:
    """1..2K: the trained range and as far again, to show extrapolation."""
    return list(range(1, 2 * trained_depth + 1))


def load_eval_batches(
    data_dir: str | os.PathLike,
    model_cfg,
    batches: int = DEFAULT_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[torch.Tensor]:
    """The first `batches` validation batches (B, T+1), in the validation loader's fixed order."""
    from looptrain.config.schema import DataConfig
    from looptrain.data.loader import build_val_loader

    if batches < 1:
        raise EvalError(f"--batches must be >= 1, got {batches}")
    loader = build_val_loader(
        DataConfig(dir=str(data_dir), shuffle=False),
        seq_len=model_cfg.max_seq_len,
        vocab_size=model_cfg.vocab_size,
        micro_batch_size=batch_size,
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= batches:
            break
    if not out:
        raise EvalError(f"{data_dir}: the validation split yields no batch; re-prepare with --val-fraction 0.05")
    return out


def evaluate_model(
    model,
    batches: Sequence[torch.Tensor],
    depths: Optional[Sequence[int]] = None,
    *,
    name: str = "model",
    exit_depth: Optional[int] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    diagnostics: bool = False,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = False,
) -> dict:
    """Depth curve, loop norms, early-exit sweep (and diagnostics) of one model as a JSON-ready dict.

    With `progress`, a bar on stderr per phase (the deep pass over the batches,
    the policy sweeps, each diagnostic) with its rate and ETA."""
    cfg = model.cfg
    depths = sorted(set(depths)) if depths else default_depths(cfg.loops)
    if depths[0] < 1:
        raise EvalError(f"depths must be >= 1, got {depths}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    deepest = depths[-1]
    if exit_depth is not None and not 1 <= exit_depth <= deepest:
        raise EvalError(f"exit depth {exit_depth} must lie in 1..{deepest} (the deepest evaluated depth)")
    passes = progress_bar(batches, f"{name}: depths 1..{deepest}", "batch", progress)
    data = collect_exit_data(model, passes, deepest, chunk_tokens=chunk_tokens, device=dev, precision=precision)
    result = {
        "name": name,
        "trained_depth": cfg.loops,
        "model": {key: getattr(cfg, key) for key in MODEL_FIELDS},
        "batches": len(batches),
        "tokens": data.tokens,
        "depth": depth_result(data, depths).to_dict(),
        "exits": evaluate_exits(data, exit_depth, tolerance,
                                progress=progress and f"{name}: early-exit policies").to_dict(),
        "diagnostics": None,
    }
    if diagnostics:
        from looptrain.eval.diagnostics import run_diagnostics

        result["diagnostics"] = run_diagnostics(
            model, list(batches), deepest, token_norms=data.token_norms, chunk_tokens=chunk_tokens, device=dev,
            precision=precision, progress=progress and name,
        ).to_dict()
    return result


def evaluate_run(
    path: str | os.PathLike,
    data_dir: Optional[str | os.PathLike] = None,
    depths: Optional[Sequence[int]] = None,
    batches: Optional[int] = None,
    *,
    batch_size: Optional[int] = None,
    name: Optional[str] = None,
    **options,
) -> dict:
    """Load an export / checkpoint / run directory and evaluate it on its validation data.

    data_dir defaults to the recipe's data.dir; batches to the recipe's
    train.val_batches and batch_size to its train.micro_batch_size (the
    trainer's validation batches; 20 x 8 without a recipe). Other keyword options go to
    `evaluate_model` (exit_depth, tolerance, diagnostics, device, precision,
    chunk_tokens).
    """
    model, recipe, recipe_data = load_model_for_eval(path)
    data = data_dir or recipe_data
    if data is None:
        raise EvalError(f"{path}: no recipe says which data it was trained on; pass --data DIR (a prepared dataset)")
    if batch_size is None:
        batch_size = recipe.train.micro_batch_size if recipe is not None else DEFAULT_BATCH_SIZE
    if batches is None:
        batches = recipe.train.val_batches if recipe is not None else DEFAULT_BATCHES
    eval_batches = load_eval_batches(data, model.cfg, batches, batch_size)
    result = evaluate_model(model, eval_batches, depths, name=name or source_name(path), **options)
    result.update({"path": str(path), "data_dir": str(data), "batch_size": batch_size})
    if recipe is not None:
        result["recipe"] = {
            "name": recipe.name,
            "supervision": recipe.objective.supervision,
            "norm_penalty": recipe.objective.norm_penalty.weight,
        }
    return result

