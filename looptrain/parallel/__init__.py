"""Backends that run the training step: single process, FSDP2, DeepSpeed ZeRO."""

from __future__ import annotations

from looptrain.config.schema import Recipe
from looptrain.parallel.base import Backend
from looptrain.parallel.env import DistEnv, init_distributed, shutdown_distributed


def build_backend(recipe: Recipe, env: DistEnv) -> Backend:
    name = recipe.parallel.backend
    if name == "single":
        from looptrain.parallel.single import SingleBackend

        return SingleBackend(recipe, env)
    if name == "fsdp2":
        from looptrain.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(recipe, env)
    if name == "deepspeed":
        from looptrain.parallel.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(recipe, env)
    raise ValueError(f"parallel.backend: unknown backend {name!r}")


__all__ = ["Backend", "DistEnv", "build_backend", "init_distributed", "shutdown_distributed"]
