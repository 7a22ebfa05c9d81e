"""The report's figures (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import math
from typing import Sequence

from repro.collect import ConditionSummary, Spread, loop_norm, policy_order
from repro.grid import PLOT_DPI, TOLERANCE

def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _band(ax, xs, spreads, color, label) -> None:
    pts = [(x, s) for x, s in zip(xs, spreads) if s is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    ax.plot(x, [p[1].mean for p in pts], marker="o", markersize=3, color=color, label=label)
    if any(p[1].n > 1 for p in pts):
        ax.fill_between(x, [p[1].low for p in pts], [p[1].high for p in pts], color=color, alpha=0.2)


def plot_norms(summaries: Sequence[ConditionSummary], loops: int, path: str) -> str:
    """Left: mean token L2 norm after every loop 1..2K. Right: final-loop norm over training."""
    fig, (ax, ax2) = _figure(12.0, 4.2, 1, 2)
    for s, color in zip(summaries, _colors(len(summaries))):
        per_loop = [Spread.of([loop_norm(r, k) for r in s.evaluated]) for k in range(1, 2 * loops + 1)]
        _band(ax, range(1, 2 * loops + 1), per_loop, color, s.condition.label)
        curves = [r.curve for r in s.runs if r.curve.get("step")]
        if curves:
            steps = curves[0]["step"]
            common = [i for i, st in enumerate(steps) if all(i < len(c["step"]) and c["step"][i] == st
                                                          for c in curves)]
            xs = [steps[i] for i in common]
            spreads = [Spread.of([c["norm"][i] for c in curves]) for i in common]
            pts = [(x, sp) for x, sp in zip(xs, spreads) if sp is not None]
            ax2.plot([p[0] for p in pts], [p[1].mean for p in pts], color=color, label=s.condition.label)
            if len(curves) > 1:
                ax2.fill_between([p[0] for p in pts], [p[1].low for p in pts], [p[1].high for p in pts],
                                 color=color, alpha=0.2)
    ax.axvline(loops, color="gray", linestyle=":", linewidth=1)
    _integer_ticks(ax)
    for a in (ax, ax2):
        a.set_yscale("log")
        a.grid(True, alpha=0.3)
    ax.set_xlabel("loop k (dotted: trained depth K)")
    ax.set_ylabel("mean token L2 norm ||h_k|| (validation)")
    ax.set_title("hidden-state norm per loop (mean over seeds, band: min-max)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4,
               fontsize="small")
    ax2.set_xlabel("training step")
    ax2.set_ylabel(f"mean ||h_{loops}|| (training batches)")
    ax2.set_title("final-loop norm during training")
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_ppl(summaries: Sequence[ConditionSummary], loops: int, path: str) -> str:
    """Validation perplexity at inference depths 1..2K, one line per condition.

    Left: the whole range (log scale when it is wide: a terminal-loss model's
    untrained early exits can be off by orders of magnitude). Right: the same
    curves zoomed on the best perplexities, where the conditions differ.
    """
    fig, (ax, zoom) = _figure(12.0, 4.4, 1, 2)
    depths = list(range(1, 2 * loops + 1))
    values = []
    for s, color in zip(summaries, _colors(len(summaries))):
        for a in (ax, zoom):
            _band(a, depths, [s.ppl.get(k) for k in depths], color, s.condition.label)
        values += [s.ppl[k].mean for k in depths if s.ppl.get(k) is not None]
    good = [v for v in values if math.isfinite(v) and v > 0]
    if good and max(good) / min(good) > 4:
        ax.set_yscale("log")
    if good:
        zoom.set_ylim(0.95 * min(good), 2.0 * min(good))
    for a, title in ((ax, "perplexity vs inference depth (mean over seeds, band: min-max)"),
                     (zoom, "zoom: up to 2x the best perplexity")):
        a.axvline(loops, color="gray", linestyle=":", linewidth=1)
        _integer_ticks(a)
        a.set_xlabel("inference depth (loops; dotted: trained depth K)")
        a.set_ylabel("validation perplexity")
        a.set_title(title)
        a.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4,
               fontsize="small")
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_pareto(summaries: Sequence[ConditionSummary], path: str) -> str:
    """Per condition (first seed): mean loops vs perplexity over each policy's threshold sweep."""
    shown = [s for s in summaries if s.evaluated]
    cols = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = _figure(3.4 * cols + 0.4, 3.0 * rows + 0.3, rows, cols)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax, s in zip(axes, shown):
        result = s.evaluated[0]
        e = result["exits"]
        policies = sorted(e["policies"], key=policy_order)
        for policy, color in zip(policies, _colors(len(policies))):
            p = e["policies"][policy]
            curve = sorted(p["curve"], key=lambda q: q["mean_loops"])
            ax.plot([q["mean_loops"] for q in curve], [q["ppl"] for q in curve], marker=".", markersize=3,
                    color=color, label=policy)
            ax.plot([p["pick"]["mean_loops"]], [p["pick"]["ppl"]], marker="*", markersize=9, color=color)
        ax.axhline(e["full_ppl"] * (1 + e["tolerance"]), color="gray", linestyle=":", linewidth=1)
        lowest = min([e["full_ppl"]] + [q["ppl"] for p in e["policies"].values() for q in p["curve"]])
        ax.set_ylim(lowest * 0.97, e["full_ppl"] * 1.5)
        ax.set_title(f"{s.condition.label}\n({result['name']})", fontsize="small")
        ax.set_xlabel("mean loops used")
        ax.set_ylabel("perplexity")
        ax.grid(True, alpha=0.3)
    if shown:
        axes[0].legend(fontsize="x-small")
    fig.suptitle(f"early exit: threshold sweeps (star: fewest loops within {100 * TOLERANCE:.0f}% of full depth, "
                 "dotted line)", fontsize="small")
    fig.savefig(path, dpi=PLOT_DPI)
    return path

