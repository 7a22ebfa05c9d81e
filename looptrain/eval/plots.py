"""PNG figures of evaluation results (matplotlib's Agg canvas, no pyplot state).

    depth.png      perplexity vs inference depth, one line per run
    exits.png      early-exit Pareto curves: mean loops vs perplexity, one line per policy
    norms.png      token norm ||h_k|| per loop of every run on one axis: median, 25-75 % band, max
    norm_hist.png  histogram of token norms per loop (when diagnostics ran)

Every function takes the result dicts of `looptrain.eval.run` and a path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def _log_if_wide(ax, values: Sequence[float], ratio: float = 4.0) -> None:
    """Log y axis when the positive finite values span more than `ratio` (a narrow range reads better linear)."""
    good = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    if good and max(good) / min(good) > ratio:
        ax.set_yscale("log")


def plot_depth_curves(results: Sequence[dict], path: str | os.PathLike) -> str:
    """Perplexity at every evaluated depth; a hollow marker at each run's trained depth."""
    fig, (ax,) = _figure(6.5, 4.2)
    for r, color in zip(results, _colors(len(results))):
        d = r["depth"]
        ax.plot(d["depths"], d["ppl"], marker="o", markersize=3, color=color, label=r["name"])
        k = r["trained_depth"]
        if k in d["depths"]:
            ax.plot([k], [d["ppl"][d["depths"].index(k)]], marker="o", markersize=9, markerfacecolor="none",
                    color=color)
    _log_if_wide(ax, [v for r in results for v in r["depth"]["ppl"]])
    ax.set_xlabel("inference depth (loops)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity vs depth (circle: trained depth)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_exit_pareto(results: Sequence[dict], path: str | os.PathLike) -> str:
    """Mean loops used vs perplexity for each policy's threshold sweep; stars at the picks."""
    n = len(results)
    fig, axes = _figure(5.0 * n + 0.5, 4.2, ncols=n)
    for ax, r in zip(axes, results):
        e = r["exits"]
        policies = list(e["policies"])
        for policy, color in zip(policies, _colors(len(policies))):
            p = e["policies"][policy]
            curve = sorted(p["curve"], key=lambda q: q["mean_loops"])
            ax.plot([q["mean_loops"] for q in curve], [q["ppl"] for q in curve], marker=".", color=color,
                    label=policy)
            ax.plot([p["pick"]["mean_loops"]], [p["pick"]["ppl"]], marker="*", markersize=12, color=color)
        limit = e["full_ppl"] * (1 + e["tolerance"])
        ax.axhline(limit, color="gray", linestyle=":", linewidth=1, label=f"full depth +{100 * e['tolerance']:.3g}%")
        ax.set_xlabel("mean loops used")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{r['name']}: early exit (E={e['depth']})")
        _log_if_wide(ax, [q["ppl"] for p in e["policies"].values() for q in p["curve"]])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_norms(results: Sequence[dict], path: str | os.PathLike) -> str:
    """Token norm per loop of every run on one shared axis: median line, 25-75 % band, max dashed."""
    fig, (ax,) = _figure(7.0, 4.5)
    values: list[float] = []
    for r, color in zip(results, _colors(len(results))):
        norms = r["depth"]["norms"]
        loops = [x["loop"] for x in norms]
        q = {key: [x["quantiles"][key] for x in norms] for key in ("p25", "p50", "p75")}
        peak = [x["max"] for x in norms]
        ax.fill_between(loops, q["p25"], q["p75"], alpha=0.25, color=color, linewidth=0)
        ax.plot(loops, q["p50"], color=color, marker="o", markersize=3, label=f"{r['name']} (K={r['trained_depth']})")
        ax.plot(loops, peak, color=color, linestyle="--", linewidth=0.9)
        values += q["p25"] + peak
    for k in sorted({r["trained_depth"] for r in results}):
        ax.axvline(k, color="gray", linestyle=":", linewidth=1)
    _log_if_wide(ax, values)
    if ax.get_yscale() == "log":
        _plain_log_ticks(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel("loop k (dotted: trained depth K)")
    ax.set_ylabel("token norm ||h_k|| (raw state)")
    ax.set_title("token norm per loop: median, 25-75 % band, max (dashed)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plain_log_ticks(axis, low: float, high: float) -> None:
    """Log-axis ticks labelled as plain numbers, as many as fit: evenly spaced values within a
    decade, 1-2-5 steps over a few decades, powers of ten beyond; minor ticks unlabelled (matplotlib's
    default labels them on a narrow range, and they collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    decades = math.log10(high / low) if high > low > 0 else 0.0
    if decades < 1.0:
        locator = MaxNLocator(nbins=5)
    elif decades <= 2.5:
        locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    else:
        locator = LogLocator(base=10, subs=(1.0,), numticks=7)
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_norm_histograms(results: Sequence[dict], path: str | os.PathLike) -> str:
    """Step histograms of the token norms of every loop, one panel per run."""
    from matplotlib import colormaps

    with_hist = [r for r in results if (r.get("diagnostics") or {}).get("histogram")]
    if not with_hist:
        raise ValueError("no norm histograms in these results; evaluate with diagnostics=True (--diagnostics)")
    n = len(with_hist)
    fig, axes = _figure(5.0 * n + 0.5, 4.0, ncols=n)
    cmap = colormaps["viridis"]
    for ax, r in zip(axes, with_hist):
        hist = r["diagnostics"]["histogram"]
        edges, counts = hist["edges"], hist["counts"]
        for k, row in enumerate(counts):
            ax.stairs(row, edges, color=cmap(k / max(1, len(counts) - 1) * 0.9), label=f"k={k + 1}")
        if edges[0] > 0:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, edges[0], edges[-1])
        ax.set_xlabel("token norm ||h_k||")
        ax.set_ylabel("tokens")
        ax.set_title(r["name"])
        ax.legend(fontsize="small", ncol=2 if len(counts) > 6 else 1)
    return _save(fig, path)


def write_plots(results: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, str]:
    """Every figure that the results support; returns name -> path."""
    paths = {
        "depth": plot_depth_curves(results, os.path.join(out_dir, "depth.png")),
        "exits": plot_exit_pareto(results, os.path.join(out_dir, "exits.png")),
        "norms": plot_norms(results, os.path.join(out_dir, "norms.png")),
    }
    if any((r.get("diagnostics") or {}).get("histogram") for r in results):
        paths["norm_hist"] = plot_norm_histograms(results, os.path.join(out_dir, "norm_hist.png"))
    return paths
