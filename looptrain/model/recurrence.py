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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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


def build_skip_decay(recurrence: str, d_model: int) -> Optional[SkipDecay]:
    return SkipDecay(d_model) if recurrence == "contractive" else None


def build_carry_norm(recurrence: str, d_model: int, eps: float) -> Optional[RMSNorm]:
    return RMSNorm(d_model, eps) if recurrence == "rmsnorm" else None
