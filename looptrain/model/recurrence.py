"""Scale control in the recurrence: what is carried from one loop to the next.

residual:    carry h_k unchanged (the paper's baseline: ||h|| drifts upward).
rmsnorm:     carry RMSNorm(h_k) with its own gain (see `build_carry_norm`); the
             exit still reads, and `states` still records, the raw h_k.
contractive: the loop's skip path decays, h_k = a * x + u_k, where x is the loop
             input, u_k = core_layers(x) - x the loop's update and
             a = exp(-softplus(p)) in (0, 1) per channel (`SkipDecay`). Pre-norm
             updates are bounded (|u| <= U), so ||h|| <= U / (1 - max a) forever.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.choices import choose
from looptrain.model.norms import RMSNorm


class SkipDecay(nn.Module):
    """Per-channel decay a = exp(-softplus(p)) in (0, 1), initialised to 0.9."""

    INIT = 0.9

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.param.fill_(math.log(math.expm1(-math.log(self.INIT))))  # softplus^-1(-ln 0.9)

    def forward(self) -> torch.Tensor:
        return torch.exp(-F.softplus(self.param))


def _none(cfg: ModelConfig) -> None:
    return None


# model.recurrence -> the decay of the loop's skip path (LoopCore), if any.
SKIP_DECAYS: dict[str, Callable[[ModelConfig], Optional[SkipDecay]]] = {
    "residual": _none,
    "rmsnorm": _none,
    "contractive": lambda cfg: SkipDecay(cfg.d_model),
}
# model.recurrence -> the norm applied to the state carried into the next loop (LoopedLM), if any.
CARRY_NORMS: dict[str, Callable[[ModelConfig], Optional[RMSNorm]]] = {
    "residual": _none,
    "rmsnorm": lambda cfg: RMSNorm(cfg.d_model, cfg.norm_eps),
    "contractive": _none,
}


def build_skip_decay(cfg: ModelConfig) -> Optional[SkipDecay]:
    return choose(SKIP_DECAYS, cfg, "recurrence")(cfg)


def build_carry_norm(cfg: ModelConfig) -> Optional[RMSNorm]:
    return choose(CARRY_NORMS, cfg, "recurrence")(cfg)
