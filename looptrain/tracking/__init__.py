"""Run tracking: metrics.jsonl/events.jsonl, console lines, W&B."""

from looptrain.tracking.metrics_file import EVENTS_FILE, METRICS_FILE, per_loop_series, read_metrics
from looptrain.tracking.tracker import Tracker

__all__ = ["EVENTS_FILE", "METRICS_FILE", "Tracker", "per_loop_series", "read_metrics"]
