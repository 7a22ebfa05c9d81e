"""Normalisation layers used by blocks, readouts and the inter-loop carry."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """The block norm named by `model.norm` (rmsnorm | layernorm)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"model.norm: unknown norm {kind!r}; use 'rmsnorm' or 'layernorm'")
