"""Activation checkpointing and compilation, applied to the model from outside.

Granularity:
  block -- recompute each transformer block (prelude, core, coda) in backward;
           memory still grows with the loop count (one saved input per block call).
  loop  -- recompute one whole loop iteration: only the carried state at each
           loop boundary is kept, so activation memory grows with K by one
           (B, T, D) tensor per loop instead of a full loop's activations.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def _blocks(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(container, index) of every block the model has."""
    out = []
    for container in (model.prelude, model.core.layers, model.coda):
        out.extend((container, i) for i in range(len(container)))
    return out


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return model
    if mode == "block":
        for container, i in _blocks(model):
            container[i] = checkpoint_wrapper(container[i], preserve_rng_state=True)
    elif mode == "loop":
        model.core = checkpoint_wrapper(model.core, preserve_rng_state=True)
        for container in (model.prelude, model.coda):
            for i in range(len(container)):
                container[i] = checkpoint_wrapper(container[i], preserve_rng_state=True)
    else:
        raise ValueError(f"parallel.activation_checkpointing: unknown mode {mode!r}")
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block (shared by all loops, so it compiles once) in place."""
    for container, i in _blocks(model):
        container[i].compile()
    return model
