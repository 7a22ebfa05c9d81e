"""`looptrain plot RUN_DIR... -o out.png`: the scale of each loop and its loss over training.

One column per run, one row per quantity, rows sharing their y axis:
  1. mean token norm ||h_k|| of every loop (log scale), the picture of the
     readout blind spot (a norm that keeps climbing while the loss looks fine);
  2. the RMS the norm monitor watches (`monitor.final_rms`: the final loop's
     per-coordinate RMS, norm/rms/K) with the rule's warn and halt thresholds
     from the run's recipe.yaml, and the run's alert and halt events
     (events.jsonl) marked where they fired;
  3. training cross-entropy at every exit;
  4. validation loss at every exit.
Reads only the run directories' files, so it works for runs with W&B disabled.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from looptrain.exit_codes import BAD_INPUT
from looptrain.tracking.metrics_file import EVENTS_FILE, per_loop_series, read_metrics

PANELS = (
    ("norm/mean", "mean ||h_k|| (raw state)", True),
    ("monitor", "monitored RMS (final loop)", True),
    ("train/loss_exit", "train CE per exit", False),
    ("val/loss", "val loss per exit", False),
)
EVENT_STYLE = {"alert": ("^", "tab:orange"), "halt": ("X", "tab:red")}


@dataclass
class MonitorView:
    """What the monitor watched in one run: thresholds of `final_rms` and the events to mark."""

    warn: Optional[float] = None
    halt: Optional[float] = None
    events: list[dict[str, Any]] = field(default_factory=list)  # action alert|halt, from events.jsonl


def monitor_view(run_dir: str) -> MonitorView:
    """final_rms thresholds from RUN_DIR/recipe.yaml (the schema's defaults when the file or key is
    missing; none when the monitor or the rule is off) and the alert/halt events of events.jsonl."""
    import yaml

    from looptrain.config.schema import MonitorConfig
    from looptrain.fileio import read_jsonl

    default = MonitorConfig().final_rms
    view = MonitorView(warn=default.warn, halt=default.halt)
    path = os.path.join(run_dir, "recipe.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            monitor = (yaml.safe_load(f) or {}).get("monitor") or {}
        rule = monitor.get("final_rms") or {}
        view.warn, view.halt = rule.get("warn", default.warn), rule.get("halt", default.halt)
        if not monitor.get("enabled", True) or not rule.get("enabled", True):
            view.warn = view.halt = None
    events_path = os.path.join(run_dir, EVENTS_FILE)
    if os.path.isfile(events_path):
        view.events = [e for e in read_jsonl(events_path) if e.get("action") in EVENT_STYLE and "step" in e]
    return view


def build_figure(run_dirs: list[str]):
    """The figure (matplotlib Figure on an Agg canvas) that `plot_runs` saves."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    # The object-oriented API with the Agg canvas: no pyplot, no global backend change.
    # matplotlib is imported here, not at the top: it is slow to import and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(d, read_metrics(d)) for d in run_dirs]
    n = len(runs)
    fig = Figure(figsize=(4.5 * n + 1.0, 2.9 * len(PANELS) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), n, squeeze=False, sharex="col", sharey="row")
    for col, (run_dir, records) in enumerate(runs):
        title = os.path.basename(os.path.normpath(run_dir)) or run_dir
        for row, (family, ylabel, log_y) in enumerate(PANELS):
            ax = axes[row][col]
            if family == "monitor":
                _draw_monitor(ax, records, monitor_view(run_dir))
            else:
                _draw_family(ax, records, family, log_y)
            if row == 0:
                ax.set_title(title)
            if row == len(PANELS) - 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(ylabel)
    return fig


def plot_runs(run_dirs: list[str], out_png: str) -> str:
    """Draw the runs side by side into `out_png` (PNG, Agg backend); returns the path."""
    fig = build_figure(run_dirs)
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
    sparse = max(len(steps) for steps, _ in series.values()) <= 20  # e.g. validation: a few points
    for i, k in enumerate(ks):
        steps, values = series[k]
        color = cmap(i / max(1, len(ks) - 1) * 0.9)
        ax.plot(steps, values, color=color, label=f"k={k}", linewidth=1.4, marker="o" if sparse else None,
                markersize=3)
    if log_y and any(v > 0 for _, vals in series.values() for v in vals):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(ks) > 4 else 1)


def _draw_monitor(ax: Any, records: list[dict[str, Any]], view: MonitorView) -> None:
    """norm/rms/K of the deepest loop, the warn/halt lines, and a marker per alert/halt event."""
    series = per_loop_series(records, "norm/rms")
    if not series:
        ax.text(0.5, 0.5, "no norm/rms/k in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        return
    k = max(series)
    steps, values = series[k]
    ax.plot(steps, values, color="black", linewidth=1.4, label=f"RMS h{k}")
    if view.warn is not None:
        ax.axhline(view.warn, color="tab:orange", linestyle="--", linewidth=1, label=f"warn {view.warn:g}")
    if view.halt is not None:
        ax.axhline(view.halt, color="tab:red", linestyle="--", linewidth=1, label=f"halt {view.halt:g}")
    rules: dict[str, list[str]] = {}  # action -> the rules that fired it, for the legend
    for event in view.events:
        names = rules.setdefault(event["action"], [])
        if event.get("rule", "?") not in names:
            names.append(event.get("rule", "?"))
    labelled: set[str] = set()
    for event in view.events:
        action = event["action"]
        marker, color = EVENT_STYLE[action]
        step = int(event["step"])
        ax.axvline(step, color=color, linewidth=0.8, alpha=0.35)
        label = None if action in labelled else f"{action} ({', '.join(rules[action])})"
        labelled.add(action)
        ax.plot([step], [_value_at(steps, values, step)], linestyle="none", marker=marker, markersize=9,
                color=color, label=label)
    if any(v > 0 for v in values):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _value_at(steps: list[int], values: list[float], step: int) -> float:
    """The logged value at `step`, or the last one logged before it."""
    before = [v for s, v in zip(steps, values) if s <= step]
    return before[-1] if before else values[0]


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
