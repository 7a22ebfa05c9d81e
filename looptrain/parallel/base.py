"""One interface for every way of running the training step.

The trainer calls only these methods, so its loop is the same on one CPU
process, on FSDP2 over many GPUs, and under DeepSpeed ZeRO:

    for micro in range(grad_accum):
        out = backend.forward_backward(tokens, targets, ...)
    grad_norm = backend.optimizer_step(lr)
"""

from __future__ import annotations

import abc
import contextlib
from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from looptrain.config.schema import Recipe, RecipeError
from looptrain.parallel.env import DistEnv
from looptrain.train_module import StepOutput


def reject_fsdp2_options(recipe: Recipe) -> None:
    """FSDP2-only keys set for another backend would silently do nothing: say so instead."""
    p = recipe.parallel
    if p.replicate != 1:
        raise RecipeError(f"parallel.replicate={p.replicate} (HSDP) needs parallel.backend=fsdp2, "
                          f"not {p.backend}; remove it or switch the backend")
    if p.param_dtype != "fp32" or p.reduce_dtype != "fp32":
        raise RecipeError(f"parallel.param_dtype/reduce_dtype are FSDP2 mixed-precision settings; with "
                          f"parallel.backend={p.backend} use train.precision=bf16")


class Backend(abc.ABC):
    name: str = "base"

    def __init__(self, recipe: Recipe, env: DistEnv):
        self.recipe = recipe
        self.env = env
        self.device = env.device
        self.grad_accum = recipe.train.grad_accum

    # ---------------------------------------------------------------- set-up
    @abc.abstractmethod
    def setup(self, train_module: nn.Module) -> None:
        """Wrap the (CPU, fp32) train module, move it to the device, build the optimizer."""

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The module to call (wrapped)."""

    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The bare LoopedLM inside the wrappers (for evaluation and export)."""

    @property
    def data_parallel_size(self) -> int:
        return self.env.world_size

    # ------------------------------------------------------------ the step
    def autocast(self):
        if self.recipe.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abc.abstractmethod
    def forward_backward(
        self,
        tokens: Tensor,
        targets: Tensor,
        *,
        depth: int,
        backprop_loops: Optional[int],
        measure_all_exits: bool,
        last_micro_step: bool,
    ) -> StepOutput:
        """Forward and backward of one micro-batch (loss scaled for accumulation)."""

    @abc.abstractmethod
    def optimizer_step(self, lr: float) -> Tensor:
        """Clip, step, zero grads; returns the pre-clip global grad norm (a device tensor)."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state a checkpoint saves (set by `setup`)."""
        return self._optimizer

    @torch.no_grad()
    def evaluate(self, tokens: Tensor, targets: Tensor, *, measure_all_exits: bool = True) -> StepOutput:
        module = self.module
        was_training = module.training
        module.eval()
        try:
            with self.autocast():
                return module(tokens, targets, measure_all_exits=measure_all_exits)
        finally:
            module.train(was_training)

    # ------------------------------------------------------ shared helpers
    def _clip_and_step(self, optimizer: torch.optim.Optimizer, lr: float) -> Tensor:
        """Set the lr, clip to the global norm, step -- or skip the step when the norm is not finite.

        The norm is taken over every rank's gradients: with sharded (DTensor)
        gradients each rank holds only a shard, so the per-shard norms are
        combined into the true global norm (`full_tensor`) before clipping.
        A non-finite norm means some gradient is inf/NaN: stepping would write
        NaN into every weight and the optimizer moments, so the step is skipped
        and the gradients are dropped; the trainer sees the non-finite norm and
        halts with the weights of the last good step. Deciding to skip costs
        one host sync per step.
        """
        for group in optimizer.param_groups:
            group["lr"] = lr
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
        else:
            grad_norm = torch.zeros((), device=self.device)
        if bool(torch.isfinite(grad_norm)):
            clip = self.recipe.optim.clip_grad_norm
            if clip:
                torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm, foreach=True)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()
