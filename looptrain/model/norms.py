"""Normalisation layers used by blocks, readouts and the inter-loop carry."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.choices import choose


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight`.

    Scale-invariant in `x` (up to eps): this is exactly why an RMSNorm readout
    cannot see, and so cannot shrink, the magnitude of the state it reads.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# model.norm -> the block norm of width d_model.
NORMS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "rmsnorm": lambda cfg: RMSNorm(cfg.d_model, cfg.norm_eps),
    "layernorm": lambda cfg: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias),
}


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The block norm named by `model.norm`."""
    return choose(NORMS, cfg, "norm")(cfg)
