"""Evaluation of looped LMs: perplexity at every inference depth (extrapolation
included), per-token early-exit policies, and the scale diagnostics of the
readout blind spot (radial gradient share, radial clamp, norm histograms).

    from looptrain.eval import evaluate_run
    result = evaluate_run("runs/quickstart/rmsnorm", depths=range(1, 9), batches=20)

Names are imported on first use, so that `looptrain --help` (which imports
`looptrain.eval.cli`) does not pay for torch, data loading or plotting.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExitData": "collect", "collect_exit_data": "collect",
    "DepthResult": "depth", "LoopNorms": "depth", "depth_result": "depth", "evaluate_depths": "depth",
    "POLICIES": "exits", "ExitPoint": "exits", "ExitReport": "exits", "evaluate_exits": "exits",
    "evaluate_threshold": "exits",
    "EvalError": "load", "LoadedModel": "load", "load_model_for_eval": "load",
    "evaluate_model": "run", "evaluate_run": "run", "load_eval_batches": "run",
    "radial_clamp_effect": "diagnostics", "radial_gradient_shares": "diagnostics", "run_loops": "diagnostics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"looptrain.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'looptrain.eval' has no attribute {name!r}")
