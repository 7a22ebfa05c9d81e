"""Scale control at the exits: how exit k turns the state into LM-head features.

rmsnorm:    RMSNorm(h) with a gain. Scale-invariant, so <grad_h L, h> = 0: the
            loss is blind to ||h|| (the readout blind spot).
raw:        h itself: the state's scale reaches the logits and the loss.
final_only: raw at exits 1..K-1, RMSNorm at the last executed exit.
alpha:      h / s * s_ref^(1-alpha) * s^alpha, s = RMS(h) per token, alpha in [0, 1]
            learnable. alpha = 0 is a gain-free RMSNorm scaled to s_ref, alpha = 1
            is exactly raw; in between the loss sees a damped power of the scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from looptrain.model.norms import RMSNorm


class NormReadout(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)

    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        return self.norm(h)


class RawReadout(nn.Module):
    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        return h


class FinalOnlyReadout(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)

    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        return self.norm(h) if last_exit else h


class AlphaReadout(nn.Module):
    """out = h * (s_ref / s)^(1 - alpha), alpha = sigmoid(alpha_logit).

    Computed as one per-token factor in float32 so that large states do not
    overflow low-precision activations before the factor shrinks them.
    """

    def __init__(self, alpha_init: float, ref_rms: float, eps: float) -> None:
        super().__init__()
        if not 0.0 <= alpha_init <= 1.0:
            raise ValueError(f"model.alpha_init: must be in [0, 1], got {alpha_init}")
        if ref_rms <= 0:
            raise ValueError(f"model.alpha_ref_rms: must be > 0, got {ref_rms}")
        self.alpha_init = alpha_init
        self.log_ref = math.log(ref_rms)
        self.eps = eps
        self.alpha_logit = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Keep the logit finite for alpha_init at the ends of [0, 1].
        p = min(max(self.alpha_init, 1e-4), 1.0 - 1e-4)
        self.alpha_logit.fill_(math.log(p / (1.0 - p)))

    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        log_s = 0.5 * torch.log(h.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        factor = torch.exp((1.0 - self.alpha()) * (self.log_ref - log_s))
        return h * factor.to(h.dtype)


def build_readout(kind: str, d_model: int, eps: float, alpha_init: float, alpha_ref_rms: float) -> nn.Module:
    if kind == "rmsnorm":
        return NormReadout(d_model, eps)
    if kind == "raw":
        return RawReadout()
    if kind == "final_only":
        return FinalOnlyReadout(d_model, eps)
    if kind == "alpha":
        return AlphaReadout(alpha_init, alpha_ref_rms, eps)
    raise ValueError(f"model.readout: unknown readout {kind!r}; use rmsnorm, raw, final_only or alpha")
