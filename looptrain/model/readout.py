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
from typing import Callable

import torch
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.choices import choose
from looptrain.model.norms import RMSNorm


class NormReadout(nn.Module):
    # Whether the last exit reads the state differently from the others (evaluation
    # at depth k must then run exactly k loops rather than read exit k of a deeper pass).
    depends_on_last_exit = False

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)

    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        return self.norm(h)


class RawReadout(nn.Module):
    depends_on_last_exit = False

    def forward(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        return h


class FinalOnlyReadout(nn.Module):
    depends_on_last_exit = True

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

    depends_on_last_exit = False

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


# model.readout -> the readout module.
READOUTS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "rmsnorm": lambda cfg: NormReadout(cfg.d_model, cfg.norm_eps),
    "raw": lambda cfg: RawReadout(),
    "final_only": lambda cfg: FinalOnlyReadout(cfg.d_model, cfg.norm_eps),
    "alpha": lambda cfg: AlphaReadout(cfg.alpha_init, cfg.alpha_ref_rms, cfg.norm_eps),
}


def build_readout(cfg: ModelConfig) -> nn.Module:
    return choose(READOUTS, cfg, "readout")(cfg)
