"""The run's metrics and events: JSONL files, console lines, W&B.

Only rank 0 does any work; on other ranks every method returns at once and
wandb is never imported. The JSONL files in the run directory are written in
every mode, W&B disabled included, so that a run can always be inspected
and plotted from its directory alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Optional

from looptrain.config.schema import TrackingConfig
from looptrain.monitor.jsonsafe import json_safe
from looptrain.monitor.rules import MonitorEvent
from looptrain.tracking.console import format_lines
from looptrain.tracking.metrics_file import EVENTS_FILE, METRICS_FILE, read_metrics

STOP_FILE = "STOP"  # `touch RUN_DIR/STOP`: checkpoint and stop at the next log interval
STOP_TAG = "stop"  # the same, from the W&B UI (online runs)
STOP_POLL_S = 30.0
CHARTS_EVERY_S = 300.0  # how often the per-loop W&B charts are redrawn during a run


class Tracker:
    """Logs metrics and monitor events of one run (rank 0 only)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str,
        config_dict: dict[str, Any],
        *,
        is_main: bool,
        resume_id: Optional[str] = None,
        total_steps: Optional[int] = None,
    ):
        self.cfg = cfg
        self.run_dir = run_dir
        self.is_main = is_main
        self.total_steps = total_steps
        self.mode = "disabled"
        self._wandb = None
        self._metrics_file: Optional[IO[str]] = None
        self._events_file: Optional[IO[str]] = None
        self._last_step: Optional[int] = None
        self._finished = False
        self.stop_reason: Optional[str] = None  # "STOP file" or "W&B" once a stop was asked for from outside
        self._next_stop_poll = 0.0
        self._next_charts = 0.0
        if not is_main:
            return
        from looptrain.tracking.wandb_backend import resolve_mode

        self.mode, note = resolve_mode(cfg.mode)
        os.makedirs(run_dir, exist_ok=True)
        self._metrics_file = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)
        self._events_file = open(os.path.join(run_dir, EVENTS_FILE), "a", buffering=1)
        if note:
            print(note, flush=True)
        if self.mode != "disabled":
            from looptrain.tracking.wandb_backend import WandbRun

            self._wandb = WandbRun(cfg, self.mode, run_dir, config_dict, resume_id)

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (store it in checkpoints to resume the same run); None when disabled."""
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics: metrics.jsonl, a console line, W&B."""
        if not self.is_main or self._finished:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self._last_step = step
        self._write(self._metrics_file, {"step": step, **metrics})
        for line in format_lines(step, self.total_steps, metrics):
            print(line, flush=True)
        self._to_wandb("log", lambda run: run.log(step, metrics))
        if self._wandb is not None and time.monotonic() >= self._next_charts:
            # The per-loop charts (one chart, one line per loop) from the first log on, then
            # every CHARTS_EVERY_S, so the live dashboard has them (after a requeue too: the
            # history comes from metrics.jsonl), not only once the attempt ends.
            self._next_charts = time.monotonic() + CHARTS_EVERY_S
            self._metrics_file.flush()
            records = read_metrics(self.run_dir)
            self._to_wandb("per-loop charts", lambda run: run.log_per_loop_charts(step, records))

    def stop_requested(self) -> Optional[str]:
        """Why the user asked this run to stop from outside, or None (rank 0; called at log intervals).

        Two ways, both ending in a checkpoint on every rank and status 19 (cancelled): a file
        named STOP in the run directory (any mode), or the tag `stop` added to the W&B run in the
        web UI (online mode; the run's tags are read at most every STOP_POLL_S). Either is taken
        away once honoured, so that the resumed run does not stop again at once.
        """
        if not self.is_main or self._finished:
            return None
        stop_file = os.path.join(self.run_dir, STOP_FILE)
        if os.path.exists(stop_file):
            os.replace(stop_file, stop_file + ".honoured")
            self.stop_reason = "STOP file"
            return self.stop_reason
        if self._wandb is not None and self.mode == "online" and time.monotonic() >= self._next_stop_poll:
            self._next_stop_poll = time.monotonic() + STOP_POLL_S
            found: list[bool] = []
            self._to_wandb("tag check", lambda run: found.append(run.take_stop_tag()))
            if found and found[0]:
                self.stop_reason = "W&B"
                return self.stop_reason
        return None

    def event(self, ev: MonitorEvent) -> None:
        """Record a monitor event: events.jsonl (always), the console, and a
        W&B alert when its action is alert or halt."""
        if not self.is_main or self._finished:
            return
        self._write(self._events_file, {**ev.to_dict(), "time": time.time()})
        print(f"[monitor {ev.level} {ev.action}] step {ev.step} {ev.rule}: {ev.message}", flush=True)
        if ev.action in ("alert", "halt"):
            self._to_wandb("alert", lambda run: run.alert(
                f"{run.run.name}: {ev.rule} {ev.level}", f"step {ev.step}: {ev.message}", ev.level))
        if ev.action == "halt":
            self._to_wandb("halt record", lambda run: run.mark_halted(ev.rule, ev.message, ev.step))

    def finish(self, exit_code: int = 0) -> None:
        """Draw the per-loop W&B charts, close W&B with the exit status and close the files."""
        if not self.is_main or self._finished:
            return
        self._finished = True
        try:
            if self._last_step is not None and self._metrics_file is not None:
                self._metrics_file.flush()
                records = read_metrics(self.run_dir)
                self._to_wandb("per-loop charts", lambda run: run.log_per_loop_charts(self._last_step, records))
            outcome = f"cancelled ({self.stop_reason})" if self.stop_reason else None
            self._to_wandb("finish", lambda run: run.finish(exit_code, outcome))
        finally:
            for f in (self._metrics_file, self._events_file):
                if f is not None:
                    f.close()

    def _to_wandb(self, what: str, call) -> None:
        """Pass one call to W&B. Tracking never decides a run's fate: when W&B fails (its service
        died with a signal, the network went away), say so once and carry on without it; the
        JSONL files keep everything."""
        if self._wandb is None:
            return
        try:
            call(self._wandb)
        except Exception as err:  # noqa: BLE001 - any tracker error, by design
            broken, self._wandb = self._wandb, None
            broken.abandon()
            print(f"looptrain: W&B {what} failed ({type(err).__name__}: {err}); continuing without W&B "
                  f"(metrics.jsonl and events.jsonl in {self.run_dir} keep everything)", file=sys.stderr, flush=True)

    @staticmethod
    def _write(f: Optional[IO[str]], record: dict[str, Any]) -> None:
        if f is not None:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
