"""May a checkpoint continue under the current recipe?

Some recipe changes are a normal part of continuing a run (a longer schedule,
a lower learning rate, more logging, another world size); others change
what the saved weights mean or their shapes, so loading would fail deep in a
loader or, worse, succeed and train a different model. The second kind is
refused naming the key and both values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from looptrain.checkpoint.errors import CheckpointError
from looptrain.config.loader import diff_recipes

# Model keys that change the parameter set, its shapes, or what a parameter
# means (heads split d_model differently; a norm with or without a mean; a
# learned position table vs RoPE). Keys not listed (loops, dropout, init,
# eps, the noise std of the initial state) leave every weight meaningful.
ARCHITECTURE_KEYS = frozenset(
    f"model.{k}"
    for k in (
        "vocab_size", "d_model", "n_heads", "prelude_layers", "core_layers", "coda_layers", "max_seq_len",
        "mlp_ratio", "norm", "block_style", "positions", "tied_embeddings", "bias", "injection", "readout",
        "recurrence", "exit_gate",
    )
)


@dataclass
class Compatibility:
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # all differing keys

    def note(self) -> str | None:
        if not self.changes:
            return None
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in self.changes[:8])
        more = f" (+{len(self.changes) - 8} more)" if len(self.changes) > 8 else ""
        return f"recipe changed since the checkpoint (allowed): {shown}{more}"


def _parameter_shapes(model_cfg: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes of a model config, built on the meta device (no memory)."""
    import torch

    from looptrain.config.loader import build_dataclass
    from looptrain.config.schema import ModelConfig
    from looptrain.model import build_model

    try:
        cfg = build_dataclass(ModelConfig, model_cfg, "model")
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception:  # an old/unknown config: the key comparison still applies
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> Compatibility:
    """Compare the checkpoint's resolved recipe with the current one; raise on a breaking change."""
    changes = diff_recipes(saved, current)
    fix = (
        "restore the old value to continue this run, or start a new run (another `name`, or "
        "checkpoint.resume=none)"
    )
    for key, old, new in changes:
        if key in ARCHITECTURE_KEYS:
            raise CheckpointError(
                f"{checkpoint}: saved with {key}={old!r} but the recipe has {key}={new!r}; the weights do not "
                f"fit that model; {fix}"
            )
    model_changes = [c for c in changes if c[0].startswith("model.")]
    if model_changes:
        old_shapes = _parameter_shapes(saved.get("model", {}))
        new_shapes = _parameter_shapes(current.get("model", {}))
        if old_shapes is not None and new_shapes is not None and old_shapes != new_shapes:
            keys = ", ".join(f"{k}={a!r} -> {b!r}" for k, a, b in model_changes)
            raise CheckpointError(
                f"{checkpoint}: the model's parameter shapes differ from the checkpoint's after changing {keys}; {fix}"
            )
    return Compatibility(changes)
