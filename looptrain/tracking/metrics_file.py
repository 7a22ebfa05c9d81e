"""The run directory's metrics.jsonl: one JSON object per log call.

Written by the tracker on rank 0 whatever the W&B mode, so that plots,
reports and tests never depend on W&B. A resumed run may log a step again
(it restarts from its last checkpoint); readers keep the latest record of
each step.
"""

from __future__ import annotations

import os
import re
from typing import Any

from looptrain.fileio import read_jsonl

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` sorted by step; for a step
    logged twice, the fields of the later record win. Values are floats
    ("NaN"/"Infinity" strings are converted back)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir!r} a looptrain run directory?")
    by_step: dict[int, dict[str, Any]] = {}
    for record in read_jsonl(path):  # a run killed mid-write leaves a partial last line: skipped
        if "step" not in record:
            continue
        step = int(record["step"])
        merged = by_step.setdefault(step, {"step": step})
        for key, value in record.items():
            if key != "step":
                merged[key] = _to_float(value)
    return [by_step[s] for s in sorted(by_step)]


def _to_float(value: Any) -> Any:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def per_loop_series(records: list[dict[str, Any]], family: str) -> dict[int, tuple[list[int], list[float]]]:
    """{k: (steps, values)} of the metrics `family/k` (e.g. family="norm/mean")."""
    pattern = re.compile(re.escape(family) + r"/(\d+)$")
    series: dict[int, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            m = pattern.match(key)
            if m and isinstance(value, float):
                steps, values = series.setdefault(int(m.group(1)), ([], []))
                steps.append(int(record["step"]))
                values.append(value)
    return dict(sorted(series.items()))
