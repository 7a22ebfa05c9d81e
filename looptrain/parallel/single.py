"""One process, one device: plain autograd, AdamW, optional checkpointing/compile."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from looptrain.config.schema import RecipeError
from looptrain.optim import build_adamw
from looptrain.parallel.activation import apply_activation_checkpointing, apply_compile
from looptrain.parallel.base import Backend, reject_fsdp2_options
from looptrain.train_module import StepOutput


class SingleBackend(Backend):
    name = "single"

    def setup(self, train_module: nn.Module) -> None:
        if self.env.world_size > 1:
            raise RecipeError(
                f"parallel.backend=single runs one process, but WORLD_SIZE={self.env.world_size}; "
                "use parallel.backend=fsdp2 or deepspeed for multi-process runs"
            )
        reject_fsdp2_options(self.recipe)
        pcfg = self.recipe.parallel
        apply_activation_checkpointing(train_module.model, pcfg.activation_checkpointing)
        if pcfg.compile:
            apply_compile(train_module.model)
        self._module = train_module.to(self.device)
        self._optimizer = build_adamw(self._module, self.recipe.optim, fused=self.device.type == "cuda" or None)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def model(self) -> nn.Module:
        return self._module.model

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
        with self.autocast():
            out = self._module(tokens, targets, depth=depth, backprop_loops=backprop_loops,
                               measure_all_exits=measure_all_exits)
        (out.loss / self.grad_accum).backward()
        return out

    def optimizer_step(self, lr: float) -> Tensor:
        return self._clip_and_step(self._optimizer, lr)
