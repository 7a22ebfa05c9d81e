"""Halting a diverging run: the reason goes into the run directory.

A halt is final: the launcher must not requeue the job and `resume: auto`
must not silently continue it. `HALTED.json` in the run directory records
which rule fired, its values and the step, so that both the launcher and a
person reading the directory see why the run stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from looptrain.exit_codes import HALTED
from looptrain.fileio import write_text_atomic
from looptrain.monitor.jsonsafe import json_safe
from looptrain.monitor.rules import MonitorEvent

HALT_FILE = "HALTED.json"


class RunHalted(Exception):
    """Raised by the training loop when a monitor rule halts the run."""

    exit_code = HALTED

    def __init__(self, event: MonitorEvent):
        super().__init__(f"run halted at step {event.step} by monitor rule {event.rule}: {event.message}")
        self.event = event


def write_halt_record(run_dir: str, event: MonitorEvent, step: int, extra: Optional[dict[str, Any]] = None) -> str:
    """Write `run_dir/HALTED.json` atomically (temp file + rename) and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    now = time.time()
    record = {
        "rule": event.rule,
        "level": event.level,
        "action": event.action,
        "message": event.message,
        "values": event.values,
        "step": int(step),
        "event_step": int(event.step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "unix_time": now,
        "exit_status": HALTED,
        "extra": extra or {},
    }
    path = os.path.join(run_dir, HALT_FILE)
    write_text_atomic(path, json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    return path


def read_halt_record(run_dir: str) -> Optional[dict[str, Any]]:
    """The halt record of a run directory, or None when the run was not halted."""
    path = os.path.join(run_dir, HALT_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
