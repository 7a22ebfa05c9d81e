"""Dense per-loop supervision and the norm penalty.

The objective turns a model's per-exit features into one scalar:

  terminal:    CE at the last executed exit
  per_loop:    sum_k w_k CE_k / sum_k w_k        (uniform w by default)
  exit_gated:  sum_k p_k CE_k - beta * H(p)      per token, p from a learned gate
  + norm penalty on the raw state of every loop (scale control 2)

Exits that the objective does not supervise (terminal) are still measured when
`measure_all_exits` is set -- the trainer asks for that at log intervals only,
so per-exit losses are visible without paying for K heads every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from looptrain.config.schema import NormPenaltyConfig, ObjectiveConfig
from looptrain.objectives.chunked_ce import IGNORE_INDEX, chunked_cross_entropy, weighted_exits_cross_entropy


@dataclass
class ObjectiveResult:
    loss: Tensor  # scalar to backpropagate
    ce: Tensor  # the supervised cross-entropy part (detached)
    ce_per_exit: Tensor  # (depth,) mean CE per exit, detached; NaN where not measured
    norm_penalty: Tensor  # detached penalty term (already weighted)
    exit_probs: Optional[Tensor] = None  # (depth,) mean gate exit distribution (exit_gated)


def mean_token_ce(features: Tensor, head_weight: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """Mean cross-entropy over the positions that have a target."""
    per_token = chunked_cross_entropy(features, head_weight, targets, chunk_tokens)
    count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return per_token.sum() / count


def head_exits(cfg: ObjectiveConfig) -> Optional[int]:
    """How many of the last exits the training loss reads through the LM head (None: every exit).

    For FLOP accounting: terminal supervision pays the head once per step.
    """
    return 1 if cfg.supervision == "terminal" else None


def _mean_sq(h32: Tensor, cfg: NormPenaltyConfig) -> Tensor:
    return h32.pow(2).mean()


def _anchor(h32: Tensor, cfg: NormPenaltyConfig) -> Tensor:
    rms = h32.pow(2).mean(dim=-1).add(1e-12).sqrt()
    return (rms - cfg.target).pow(2).mean()


# objective.norm_penalty.form -> the penalty term of one loop's fp32 state.
PENALTY_FORMS: dict[str, Callable[[Tensor, NormPenaltyConfig], Tensor]] = {"mean_sq": _mean_sq, "anchor": _anchor}


def norm_penalty(states: Sequence[Tensor], cfg: NormPenaltyConfig) -> Tensor:
    """weight * mean_k mean(h_k^2)  or  weight * mean_k mean_tokens (RMS(h_k) - target)^2.

    Computed on the raw pre-norm state of every loop, in fp32, differentiable
    through all loops (the gradient reaches every earlier loop's update).
    """
    term = PENALTY_FORMS[cfg.form]
    return cfg.weight * torch.stack([term(h.float(), cfg) for h in states]).mean()


def exit_distribution(gate_logits: Sequence[Tensor]) -> Tensor:
    """Per-token exit probabilities from per-exit stop logits, shape (depth, B, T).

    p_k = lambda_k * prod_{j<k} (1 - lambda_j) with lambda = sigmoid(gate), and
    the last exit takes all remaining mass, so p sums to one over exits.
    """
    lam = torch.sigmoid(torch.stack([g.float() for g in gate_logits]))
    lam = torch.cat([lam[:-1], torch.ones_like(lam[-1:])], dim=0)
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]], dim=0), dim=0)
    return lam * survive


# What a supervision returns: the loss to backpropagate, the mean CE of each exit
# (NaN where not measured) and the mean exit distribution (exit_gated only).
Supervised = tuple[Tensor, list[Tensor], Optional[Tensor]]


def _terminal(features: Sequence[Tensor], head_weight: Tensor, targets: Tensor, cfg: ObjectiveConfig,
              gate_logits: Optional[Sequence[Tensor]], measure_all_exits: bool) -> Supervised:
    depth, chunk = len(features), cfg.ce_chunk_tokens
    nan = torch.tensor(float("nan"), device=targets.device)
    ce_exits: list[Tensor] = [nan] * depth
    ce, ce_final = weighted_exits_cross_entropy([features[-1]], head_weight, targets, [1.0], chunk)
    ce_exits[-1] = ce_final[0]
    if measure_all_exits:
        with torch.no_grad():
            for k in range(depth - 1):
                ce_exits[k] = mean_token_ce(features[k], head_weight, targets, chunk)
    return ce, ce_exits, None


def _per_loop(features: Sequence[Tensor], head_weight: Tensor, targets: Tensor, cfg: ObjectiveConfig,
              gate_logits: Optional[Sequence[Tensor]], measure_all_exits: bool) -> Supervised:
    weights = cfg.loop_weights or [1.0] * len(features)
    total = sum(weights)
    supervised, ce_all = weighted_exits_cross_entropy(
        features, head_weight, targets, [w / total for w in weights], cfg.ce_chunk_tokens
    )
    return supervised, list(ce_all.unbind()), None


def _exit_gated(features: Sequence[Tensor], head_weight: Tensor, targets: Tensor, cfg: ObjectiveConfig,
                gate_logits: Optional[Sequence[Tensor]], measure_all_exits: bool) -> Supervised:
    if gate_logits is None:
        raise ValueError("exit_gated supervision needs a model with an exit gate (model.exit_gate=true)")
    p = exit_distribution(gate_logits)  # (depth, B, T)
    valid = (targets != IGNORE_INDEX).float()
    count = valid.sum().clamp_min(1)
    ce_exits: list[Tensor] = []
    expected = 0.0
    for k in range(len(features)):
        ce_tok = chunked_cross_entropy(features[k], head_weight, targets, cfg.ce_chunk_tokens)
        ce_exits.append((ce_tok.sum() / count).detach())
        expected = expected + (p[k] * ce_tok * valid).sum() / count
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=0)
    entropy = (entropy * valid).sum() / count
    return expected - cfg.gate_entropy_beta * entropy, ce_exits, p.detach().mean(dim=(1, 2))


# objective.supervision -> how the exits' cross-entropies make the loss.
SUPERVISIONS: dict[str, Callable[..., Supervised]] = {
    "terminal": _terminal, "per_loop": _per_loop, "exit_gated": _exit_gated,
}


def compute_objective(
    states: Sequence[Tensor],
    features: Sequence[Tensor],
    head_weight: Tensor,
    targets: Tensor,
    cfg: ObjectiveConfig,
    *,
    gate_logits: Optional[Sequence[Tensor]] = None,
    measure_all_exits: bool = False,
) -> ObjectiveResult:
    if cfg.supervision not in SUPERVISIONS:  # the schema's Literal makes this unreachable from a recipe
        raise ValueError(f"unknown supervision {cfg.supervision!r}")
    supervised, ce_exits, exit_probs = SUPERVISIONS[cfg.supervision](
        features, head_weight, targets, cfg, gate_logits, measure_all_exits
    )
    loss = supervised
    penalty = torch.zeros((), device=targets.device)
    if cfg.norm_penalty.weight > 0:
        penalty = norm_penalty(states, cfg.norm_penalty)
        loss = loss + penalty
    return ObjectiveResult(
        loss=loss,
        ce=supervised.detach(),
        ce_per_exit=torch.stack([c.reshape(()) for c in ce_exits]),
        norm_penalty=penalty.detach(),
        exit_probs=exit_probs,
    )
