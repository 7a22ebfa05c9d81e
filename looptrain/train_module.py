"""The model and its objective in one forward call.

Parallel wrappers (FSDP2, DeepSpeed) gather sharded parameters only inside a
module's forward. The loss needs the LM head weight, so the loss is computed
inside this module's forward rather than outside the model -- the model itself
still knows nothing of losses, and the objective nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from looptrain.config.schema import ObjectiveConfig
from looptrain.objectives import ObjectiveResult, compute_objective


@dataclass
class StepOutput:
    loss: Tensor  # the scalar to backpropagate
    result: ObjectiveResult  # detached parts for logging
    states: list[Tensor]  # detached raw per-loop states, for the norm monitor


class LoopedLMTrainModule(nn.Module):
    def __init__(self, model: nn.Module, objective: ObjectiveConfig):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor,
        depth: Optional[int] = None,
        backprop_loops: Optional[int] = None,
        measure_all_exits: bool = False,
    ) -> StepOutput:
        out = self.model(tokens, depth=depth, backprop_loops=backprop_loops)
        result = compute_objective(
            out.states,
            out.features,
            self.model.head_weight,
            targets,
            self.objective,
            gate_logits=out.gate_logits,
            measure_all_exits=measure_all_exits,
        )
        return StepOutput(loss=result.loss, result=result, states=[h.detach() for h in out.states])


def split_batch(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T+1) packed token rows -> inputs (B, T) and next-token targets (B, T)."""
    batch = batch.long()
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def count_tokens(targets: Tensor) -> int:
    return targets.numel()
