"""How the input embedding e enters each loop, applied to the carried state
before the core layers run.

none:        h                                  (the AR-LoopLM paper, Ouro)
add:         h + e
concat:      W [h, e],  W: 2d -> d              (Huginn's adapter)
contractive: exp(-delta*A) * h + delta * (B e)  (Parcae) with A = exp(a_log) > 0 and
             delta = softplus(dt) > 0 per channel, so the map h -> h' is a diagonal
             contraction (every factor in (0, 1)): the carried state cannot blow up
             through the injection however many loops run.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.choices import choose


class NoInjection(nn.Module):
    def forward(self, h: torch.Tensor, e: Optional[torch.Tensor]) -> torch.Tensor:
        return h


class AddInjection(nn.Module):
    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e


class ConcatInjection(nn.Module):
    def __init__(self, d_model: int, bias: bool) -> None:
        super().__init__()
        self.adapter = nn.Linear(2 * d_model, d_model, bias=bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.cat((h, e), dim=-1))


class ContractiveInjection(nn.Module):
    """Diagonal, discretised linear update with a decay strictly inside (0, 1).

    Initialised with A = 1 and delta = 0.5, so the carried state keeps
    exp(-0.5) ~ 0.61 of itself per loop at the start of training.
    """

    DELTA_INIT = 0.5

    def __init__(self, d_model: int, bias: bool) -> None:
        super().__init__()
        self.a_log = nn.Parameter(torch.empty(d_model))
        self.dt = nn.Parameter(torch.empty(d_model))
        self.input_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.a_log.zero_()
        self.dt.fill_(math.log(math.expm1(self.DELTA_INIT)))  # softplus^-1(DELTA_INIT)

    def decay(self) -> torch.Tensor:
        """exp(-delta * A) per channel, in (0, 1)."""
        return torch.exp(-F.softplus(self.dt) * torch.exp(self.a_log))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.decay().to(h.dtype) * h + F.softplus(self.dt).to(h.dtype) * self.input_proj(e)


# model.injection -> the injection module.
INJECTIONS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "none": lambda cfg: NoInjection(),
    "add": lambda cfg: AddInjection(),
    "concat": lambda cfg: ConcatInjection(cfg.d_model, cfg.bias),
    "contractive": lambda cfg: ContractiveInjection(cfg.d_model, cfg.bias),
}


def build_injection(cfg: ModelConfig) -> nn.Module:
    return choose(INJECTIONS, cfg, "injection")(cfg)
