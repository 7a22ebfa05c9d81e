"""`looptrain plot RUN_DIR... -o out.png`: the scale of each loop and its loss over training.

One column per run. Top: mean token norm ||h_k|| of every loop (log scale),
the picture of the readout blind spot (a norm that keeps climbing while the
loss looks fine). Bottom: cross-entropy at every exit. Reads only the run
directories' metrics.jsonl, so it works for runs with W&B disabled.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from looptrain.exit_codes import BAD_INPUT
from looptrain.tracking.metrics_file import per_loop_series, read_metrics

PANELS = (
    ("norm/mean", "mean ||h_k|| (raw state)", True),
    ("train/loss_exit", "train CE per exit", False),
)


def plot_runs(run_dirs: list[str], out_png: str) -> str:
    """Draw the runs side by side into `out_png` (PNG, Agg backend); returns the path."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    # The object-oriented API with the Agg canvas: no pyplot, no global backend change.
    # matplotlib is imported here, not at the top: it is slow to import and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(d, read_metrics(d)) for d in run_dirs]
    n = len(runs)
    fig = Figure(figsize=(4.5 * n + 1.0, 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), n, squeeze=False, sharex="col", sharey="row")
    for col, (run_dir, records) in enumerate(runs):
        title = os.path.basename(os.path.normpath(run_dir)) or run_dir
        for row, (family, ylabel, log_y) in enumerate(PANELS):
            ax = axes[row][col]
            _draw_family(ax, records, family, log_y)
            if row == 0:
                ax.set_title(title)
            if row == len(PANELS) - 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(ylabel)
    out_dir = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def _draw_family(ax: Any, records: list[dict[str, Any]], family: str, log_y: bool) -> None:
    from matplotlib import colormaps

    series = per_loop_series(records, family)
    if not series:
        ax.text(0.5, 0.5, f"no {family}/k in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        return
    cmap = colormaps["viridis"]
    ks = list(series)
    for i, k in enumerate(ks):
        steps, values = series[k]
        color = cmap(i / max(1, len(ks) - 1) * 0.9)
        ax.plot(steps, values, color=color, label=f"k={k}", linewidth=1.4)
    if log_y and any(v > 0 for _, vals in series.values() for v in vals):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(ks) > 4 else 1)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("-o", "--out", default="loops.png", help="output PNG (default: loops.png)")


def run_plot(args: argparse.Namespace) -> int:
    """`looptrain plot`: exit status 0, or BAD_INPUT naming a directory without metrics."""
    missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if missing:
        print(
            f"looptrain plot: error: no metrics.jsonl in {', '.join(missing)}; "
            "pass run directories written by `looptrain train`",
            file=sys.stderr,
        )
        return BAD_INPUT
    path = plot_runs(args.run_dirs, args.out)
    print(f"wrote {path}")
    return 0
