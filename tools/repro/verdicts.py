"""Agreement with the paper: each claim's verdict, computed from the numbers by stated rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from repro.collect import ConditionSummary, Spread, fmt
from repro.grid import BASELINE_OF, RunOutcome

@dataclass
class Verdict:
    claim: str
    outcome: str  # agrees | partly agrees | disagrees | inconclusive | not run
    evidence: list[str]


def compare(a: Spread, b: Spread) -> str:
    """'lower' / 'higher' when every seed of a lies below / above every seed of b, else 'overlap'."""
    if a.high < b.low:
        return "lower"
    if a.low > b.high:
        return "higher"
    return "overlap"


def scale_verdict(summaries: dict[str, ConditionSummary], loops: int, d_model: int) -> Verdict:
    """Claim 1: per-loop + RMSNorm ends with a final-loop norm far above the scale-controlled runs."""
    claim = ("Per-loop supervision through an RMSNorm readout lets the final hidden-state norm grow far beyond "
             "the scale-controlled conditions (paper: thousands vs tens, L2 at d=512).")
    blind = summaries.get("perloop_rmsnorm")
    controlled = [s for s in summaries.values() if s.condition.scale_controlled and s.final_norm is not None]
    if blind is None or blind.final_norm is None or not controlled:
        return Verdict(claim, "not run", ["needs perloop_rmsnorm and at least one scale-controlled condition"])
    evidence = []
    higher = []  # (ratio, separated) per scale-controlled condition
    for s in controlled:
        ratio = blind.final_norm.mean / s.final_norm.mean
        side = compare(blind.final_norm, s.final_norm)
        higher.append((ratio, side == "higher"))
        evidence.append(
            f"{blind.condition.label} {fmt(blind.final_norm.mean)} vs {s.condition.label} "
            f"{fmt(s.final_norm.mean)}: {ratio:.3g}x"
            + ("" if side == "higher" else " (seed ranges overlap or reversed)")
        )
    lows = [s.final_norm.low for s in controlled]
    highs = [s.final_norm.high for s in controlled]
    evidence.append(
        f"scale-controlled conditions: final-loop L2 norms {fmt(min(lows))} to {fmt(max(highs))}; "
        f"blind spot: {blind.final_norm.text()}"
    )
    trend = norm_trajectory(blind.runs)
    if trend:
        evidence.append(trend)
    terminal = summaries.get("terminal_rmsnorm")
    if terminal is not None and terminal.final_norm is not None:
        evidence.append(f"for reference, {terminal.condition.label} (scale-invariant readout, last exit only): "
                        f"{terminal.final_norm.text()}")
    width = math.sqrt(512 / d_model)
    evidence.append(
        f"at d={d_model} a state with the same per-coordinate RMS has an L2 norm {width:.2g}x smaller than at "
        f"d=512; the blind-spot run's final-loop RMS is {fmt(blind.final_rms.mean)} "
        f"(an L2 norm of {fmt(blind.final_rms.mean * math.sqrt(512))} at d=512)"
    )
    half = len(higher) / 2
    if all(sep and r >= 10 for r, sep in higher):
        outcome = "agrees"
    elif all(sep and r >= 2 for r, sep in higher) or sum(sep and r >= 10 for r, sep in higher) >= half:
        outcome = "partly agrees"
    elif sum(sep and r > 1 for r, sep in higher) < half:
        outcome = "disagrees"
    else:
        outcome = "inconclusive"
    return Verdict(claim, outcome, evidence)


def ppl_verdict(summaries: dict[str, ConditionSummary], loops: int) -> Verdict:
    """Claim 2: each scale-controlled condition has lower perplexity than its baseline at depth K."""
    claim = ("Scale-controlled variants reach lower validation perplexity than the RMSNorm-readout baseline with "
             f"the same supervision, at a matched inference depth (here the trained depth K={loops}).")
    evidence, sides = [], []
    for key, base_key in BASELINE_OF.items():
        s, b = summaries.get(key), summaries.get(base_key)
        if s is None or b is None or s.ppl.get(loops) is None or b.ppl.get(loops) is None:
            continue
        side = compare(s.ppl[loops], b.ppl[loops])
        sides.append(side)
        per_depth = [compare(s.ppl[k], b.ppl[k]) for k in range(1, loops + 1)
                     if s.ppl.get(k) is not None and b.ppl.get(k) is not None]
        evidence.append(
            f"{s.condition.label} {fmt(s.ppl[loops].mean)} vs {b.condition.label} {fmt(b.ppl[loops].mean)} "
            f"at depth {loops}: {side}"
            f" (lower at {per_depth.count('lower')} of depths 1..{loops}, higher at {per_depth.count('higher')})"
            + _trend(s, b)
        )
    if not sides:
        return Verdict(claim, "not run", ["needs a scale-controlled condition and its baseline"])
    if all(x == "lower" for x in sides):
        outcome = "agrees"
    elif all(x == "higher" for x in sides):
        outcome = "disagrees"
    elif sides.count("lower") > sides.count("higher"):
        outcome = "partly agrees"
    elif sides.count("higher") > sides.count("lower"):
        outcome = "mostly disagrees"
    else:
        outcome = "inconclusive"
    return Verdict(claim, outcome, evidence)


def norm_trajectory(runs: Sequence[RunOutcome]) -> str:
    """Where the final-loop training norm peaked and where it ended (mean over runs): still growing or not."""
    curves = [r.curve for r in runs if len(r.curve.get("norm") or []) >= 2]
    if not curves:
        return ""
    peaks = [max(range(len(c["norm"])), key=lambda i: c["norm"][i]) for c in curves]
    peak = sum(c["norm"][i] for c, i in zip(curves, peaks)) / len(curves)
    peak_step = sum(c["step"][i] for c, i in zip(curves, peaks)) / len(curves)
    last = sum(c["norm"][-1] for c in curves) / len(curves)
    quarter = [next(v for st, v in zip(c["step"], c["norm"]) if st >= 0.75 * c["step"][-1]) for c in curves]
    direction = "still growing" if last > sum(quarter) / len(quarter) else "not growing"
    return (f"during training the blind-spot runs' final-loop norm (training batches) peaked at {fmt(peak)} "
            f"around step {peak_step:.0f} and ended at {fmt(last)}, {direction} over the last quarter of training")


def _trend(s: ConditionSummary, b: ConditionSummary) -> str:
    if s.train_ce_drop is None or b.train_ce_drop is None:
        return ""
    return (f"; training CE at exit K fell {s.train_ce_drop.mean:.3g} nats over the last quarter of training "
            f"vs {b.train_ce_drop.mean:.3g} for the baseline")


def extrapolation_notes(summaries: Sequence[ConditionSummary], loops: int) -> list[str]:
    """How each condition behaves when run past its trained depth: ppl and norm at 2K relative to K."""
    notes = []
    for s in summaries:
        at_k, at_2k = s.ppl.get(loops), s.ppl.get(2 * loops)
        if at_k is None or at_2k is None or s.final_norm is None or s.deep_norm is None:
            continue
        change = at_2k.mean / at_k.mean - 1
        at_1 = s.ppl.get(1)
        notes.append(
            f"{s.condition.label}: perplexity {fmt(at_1.mean) if at_1 else '-'} at k=1, {fmt(at_k.mean)} at "
            f"k={loops}, {fmt(at_2k.mean)} at k={2 * loops} ({100 * change:+.1f}% past K); "
            f"norm x{s.deep_norm.mean / s.final_norm.mean:.2f} from k={loops} to k={2 * loops}"
        )
    return notes


VERDICT_RULES = (
    "Comparisons use the seed ranges: *lower*/*higher* means every seed of one condition lies below/above every "
    "seed of the other; otherwise the ranges *overlap*. Claim 1 *agrees* when the blind-spot run's final-loop norm "
    "is higher than every scale-controlled condition's with separated seed ranges and at least 10x (ratio of "
    "means), *partly agrees* when it is separated and at least 2x above every one, or 10x above at least half of "
    "them, *disagrees* when it is separated above fewer than half of them, else *inconclusive*. Claim 2 *agrees* "
    "when every scale-controlled condition is lower than its baseline at depth K, *disagrees* when every one is "
    "higher, and *partly agrees* / *mostly disagrees* / *inconclusive* in between by majority. With 1 seed the "
    "ranges are single points and any difference counts."
)

