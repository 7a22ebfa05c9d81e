"""The numbers: training curves, per-run results and their spread over seeds, per condition."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from repro.grid import Condition, RunOutcome

def training_ce(curve: dict[str, list]) -> Optional[tuple[float, float, float]]:
    """(first logged exit-K training CE, last one, its fall over the last quarter of the logged steps), or None.

    Says whether a run was still improving when it stopped: a condition that
    trails but falls faster might catch up with more steps.
    """
    steps, ce = curve.get("step") or [], curve.get("ce") or []
    pts = [(st, v) for st, v in zip(steps, ce) if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(pts) < 2:
        return None
    last_step, last = pts[-1]
    start = next(v for st, v in pts if st >= 0.75 * last_step)
    return pts[0][1], last, start - last



# ------------------------------------------------------------------ numbers


@dataclass
class Spread:
    """A quantity over seeds: mean, min and max (n values)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Spread"]:
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not values:
            return None
        return cls(sum(values) / len(values), min(values), max(values), len(values))

    def text(self, digits: int = 3) -> str:
        if self.n == 1:
            return fmt(self.mean, digits)
        return f"{fmt(self.mean, digits)} [{fmt(self.low, digits)}, {fmt(self.high, digits)}]"


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1e7:
        return f"{value:.{max(1, digits - 1)}e}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def cell(spread: Optional[Spread], digits: int = 3) -> str:
    return spread.text(digits) if spread is not None else "-"


def loop_norm(result: dict, loop: int, key: str = "mean") -> Optional[float]:
    for n in result["depth"]["norms"]:
        if n["loop"] == loop:
            return n[key]
    return None


def ppl_at(result: dict, depth: int) -> Optional[float]:
    d = result["depth"]
    return d["ppl"][d["depths"].index(depth)] if depth in d["depths"] else None


@dataclass
class ConditionSummary:
    condition: Condition
    runs: list[RunOutcome]
    final_norm: Optional[Spread]  # mean token L2 norm after loop K
    final_rms: Optional[Spread]  # per-coordinate RMS after loop K
    deep_norm: Optional[Spread]  # mean token L2 norm after loop 2K
    ppl: dict[int, Optional[Spread]]  # depth -> validation perplexity
    saved: dict[str, Optional[Spread]]  # exit policy -> fraction of loops saved at 1 % tolerance
    train_ce_first: Optional[Spread] = None  # exit-K training CE at the first log
    train_ce: Optional[Spread] = None  # exit-K training CE at the last log
    train_ce_drop: Optional[Spread] = None  # its fall over the last quarter of training

    @property
    def evaluated(self) -> list[dict]:
        return [r.eval for r in self.runs if r.eval is not None]


def summarise(condition: Condition, runs: list[RunOutcome], loops: int) -> ConditionSummary:
    results = [r.eval for r in runs if r.eval is not None]
    drops = [d for d in (training_ce(r.curve) for r in runs) if d is not None]
    policies = sorted({p for r in results for p in r["exits"]["policies"]}, key=policy_order)
    return ConditionSummary(
        condition=condition,
        runs=runs,
        final_norm=Spread.of([loop_norm(r, loops) for r in results]),
        final_rms=Spread.of([loop_norm(r, loops, "rms") for r in results]),
        deep_norm=Spread.of([loop_norm(r, 2 * loops) for r in results]),
        ppl={k: Spread.of([ppl_at(r, k) for r in results]) for k in range(1, 2 * loops + 1)},
        saved={p: Spread.of([r["exits"]["policies"][p]["saved_fraction"] for r in results
                             if p in r["exits"]["policies"]]) for p in policies},
        train_ce_first=Spread.of([d[0] for d in drops]),
        train_ce=Spread.of([d[1] for d in drops]),
        train_ce_drop=Spread.of([d[2] for d in drops]),
    )


def policy_order(policy: str) -> int:
    order = ("fixed", "max_prob", "margin", "logit_margin", "entropy", "kl", "gate")
    return order.index(policy) if policy in order else len(order)

