"""Per-token early exit, evaluated offline from every exit's numbers.

A looped model can stop early on tokens it is already sure of. Whether that
saves loops without costing perplexity depends on the exit rule, so each rule
is swept over its threshold and reported as a curve of mean loops used against
perplexity, and the cheapest threshold that stays within a tolerance of the
full-depth perplexity is picked.

Threshold semantics (the same for every policy)
    Each policy gives every token a confidence c_k in [0, 1] at every exit k,
    larger meaning "ready to stop". A token exits at the FIRST exit k with
    c_k >= threshold; a token that never reaches it exits at the last exit E.
    Hence, for every policy:
      threshold 0              -> every token exits at depth 1;
      threshold > 1 (or inf)   -> no token exits early: all E loops are used.

    fixed     c_k = k / E: exit at depth ceil(threshold * E) for every token.
    max_prob  c_k = p_top1 of exit k.
    margin    c_k = p_top1 - p_top2 (the margin in probability).
    logit_margin
              c_k = 1 - exp(-(z_top1 - z_top2)): exits when the logit margin
              z_top1 - z_top2 >= -ln(1 - threshold).
    entropy   c_k = 1 - H(p_k) / ln V; exits when H(p_k) <= (1 - threshold) ln V.
    kl        c_k = exp(-KL(p_k || p_{k-1})), c_1 = 0; exits when successive exits
              agree: KL <= -ln(threshold).
    gate      c_k = sum_{j<=k} p_j of the learned exit gate (its cumulative exit
              probability over E exits); only for models with an exit gate.

The loss of a token is its CE at the exit it chose (the intermediate readout of
that exit, or the final readout at exit E). Picking the threshold on the data
it is reported on is optimistic; use separate batches to calibrate when the
number matters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from looptrain.eval.collect import ExitData
from looptrain.eval.depth import perplexity
from looptrain.objectives import exit_distribution

POLICIES = ("fixed", "max_prob", "margin", "logit_margin", "entropy", "kl", "gate")
DEFAULT_TOLERANCE = 0.01
SWEEP_POINTS = 48


@dataclass
class ExitPoint:
    """One threshold of one policy: how many loops it used and what it cost."""

    policy: str
    threshold: float
    mean_loops: float
    loss: float
    ppl: float


@dataclass
class PolicyResult:
    policy: str
    curve: list[ExitPoint]
    pick: ExitPoint  # fewest mean loops with ppl within tolerance of full depth
    loops_saved: float  # E - pick.mean_loops
    saved_fraction: float  # loops_saved / E


@dataclass
class ExitReport:
    depth: int  # E: the exits considered are 1..E
    full_loss: float
    full_ppl: float
    tolerance: float
    policies: dict[str, PolicyResult] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def available_policies(data: ExitData) -> list[str]:
    return [p for p in POLICIES if p != "gate" or data.gate_logits is not None]


def confidences(data: ExitData, policy: str, depth: Optional[int] = None) -> Tensor:
    """(E, N) confidence of `policy` at exits 1..E (module docstring)."""
    depth = _check_depth(data, depth)
    n = data.tokens
    if policy == "fixed":
        levels = torch.arange(1, depth + 1, dtype=torch.float64) / depth
        return levels[:, None].expand(depth, n)
    if policy == "gate":
        if data.gate_logits is None:
            raise ValueError("the gate policy needs a model with a learned exit gate (model.exit_gate=true)")
        probs = exit_distribution(list(data.gate_logits[:depth]))
        return probs.cumsum(dim=0).clamp(0.0, 1.0)
    if policy not in data.scores:
        known = ", ".join(available_policies(data))
        raise ValueError(f"unknown exit policy {policy!r}; use one of {known}")
    return data.scores[policy][:depth]


def exit_indices(conf: Tensor, threshold: float) -> Tensor:
    """0-based exit of every token: the first k with conf[k] >= threshold, else the last."""
    ready = conf >= threshold
    ready[-1] = True  # the last exit always stops
    return ready.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum


def chosen_ce(data: ExitData, exits: Tensor, depth: int) -> Tensor:
    """CE of every token at its chosen exit: intermediate readout before E, final readout at E."""
    ce = data.ce_exit[:depth].gather(0, exits[None]).squeeze(0)
    at_last = exits == depth - 1
    return torch.where(at_last, data.ce_final[depth - 1], ce)


def evaluate_threshold(data: ExitData, policy: str, threshold: float, depth: Optional[int] = None) -> ExitPoint:
    depth = _check_depth(data, depth)
    exits = exit_indices(confidences(data, policy, depth), threshold)
    loss = float(chosen_ce(data, exits, depth).double().mean())
    return ExitPoint(policy, float(threshold), float(exits.double().mean() + 1.0), loss, perplexity(loss))


def sweep_thresholds(
    data: ExitData, policy: str, depth: Optional[int] = None, points: int = SWEEP_POINTS
) -> list[float]:
    """Thresholds that trace the policy's whole curve: 0, quantiles of its confidences, inf."""
    depth = _check_depth(data, depth)
    if policy == "fixed":
        return [0.0] + [k / depth for k in range(1, depth + 1)] + [math.inf]
    conf = confidences(data, policy, depth)[: depth - 1].reshape(-1)
    inner: list[float] = []
    if conf.numel():
        ordered = conf.float().sort().values
        idx = torch.linspace(0, ordered.numel() - 1, points).round().long()
        inner = sorted({float(v) for v in ordered[idx]})
    return [0.0] + [t for t in inner if t > 0.0] + [math.inf]


def evaluate_policy(
    data: ExitData,
    policy: str,
    depth: Optional[int] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    thresholds: Optional[Sequence[float]] = None,
) -> PolicyResult:
    depth = _check_depth(data, depth)
    thresholds = list(thresholds) if thresholds is not None else sweep_thresholds(data, policy, depth)
    curve = [evaluate_threshold(data, policy, t, depth) for t in thresholds]
    full_ppl = perplexity(float(data.ce_final[depth - 1].double().mean()))
    pick = pick_threshold(curve, full_ppl, tolerance)
    saved = depth - pick.mean_loops
    return PolicyResult(policy, curve, pick, saved, saved / depth)


def pick_threshold(curve: Sequence[ExitPoint], full_ppl: float, tolerance: float) -> ExitPoint:
    """The point with the fewest mean loops whose ppl <= full_ppl * (1 + tolerance).

    A sweep that includes an unreachable threshold always has one (it is the
    full-depth model itself); ties go to the lower perplexity.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a fraction, 0.01 = 1%), got {tolerance}")
    limit = full_ppl * (1.0 + tolerance) * (1.0 + 1e-9)
    ok = [p for p in curve if p.ppl <= limit]
    if not ok:
        raise ValueError("no threshold keeps the perplexity within tolerance; include math.inf in the sweep")
    return min(ok, key=lambda p: (p.mean_loops, p.ppl))


def evaluate_exits(
    data: ExitData,
    depth: Optional[int] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    policies: Optional[Sequence[str]] = None,
    progress: str | bool = False,
) -> ExitReport:
    """Sweep every available policy over exits 1..E (default E = the trained depth, capped at D).

    progress: a label for a progress bar over the policies (stderr), or False."""
    from looptrain.eval.progress import progress_bar

    depth = _check_depth(data, depth)
    full_loss = float(data.ce_final[depth - 1].double().mean())
    report = ExitReport(depth, full_loss, perplexity(full_loss), tolerance)
    chosen = list(policies or available_policies(data))
    for policy in progress_bar(chosen, str(progress), "policy", bool(progress)):
        report.policies[policy] = evaluate_policy(data, policy, depth, tolerance)
    return report


def _check_depth(data: ExitData, depth: Optional[int]) -> int:
    if depth is None:
        return min(data.trained_depth, data.depth)
    if not 1 <= depth <= data.depth:
        raise ValueError(f"exit depth {depth} must lie in 1..{data.depth}, the depth of the collected pass")
    return int(depth)
