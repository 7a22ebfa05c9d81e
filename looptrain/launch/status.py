"""`looptrain status DIR`: what each run of a launch or sweep is doing, and how it is going.

The state comes from the run directory first (the attempt records that rank 0
writes when an attempt ends, HALTED.json) and from Slurm's accounting for
what files cannot say (pending, running, killed from outside). Progress comes
from metrics.jsonl: the last step, the final loop's hidden-state norm (the
quantity the norm monitor guards) and the validation loss at the final exit.
Reading stays light (no torch import), so the command answers at once.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from looptrain.fileio import read_jsonl
from looptrain.launch import records
from looptrain.launch.profile import LaunchError

METRICS_FILE = "metrics.jsonl"  # looptrain.tracking.metrics_file.METRICS_FILE
HALT_FILE = "HALTED.json"  # looptrain.monitor.halt.HALT_FILE

PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
_TERMINAL_OUTCOMES = {records.FINISHED, records.HALTED, records.FAILED, records.STOPPED, records.CANCELLED}
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


@dataclass(frozen=True)
class RunRef:
    """One run of a launch or sweep directory, as its record names it."""

    name: str
    run_dir: Path
    job_id: str
    log_dir: Path
    steps: Optional[int]


@dataclass
class RunStatus:
    name: str
    job_id: str
    state: str  # pending, running, finished, halted, failed, stopped, cancelled, unknown
    requeues: int
    step: Optional[int]
    total_steps: Optional[int]
    loop: Optional[int]  # K: the final loop the norms and loss are read at
    rms: Optional[float]
    mean: Optional[float]
    val_loss: Optional[float]
    note: str = ""


# ------------------------------------------------------------------ reading


def runs_of(directory: str | os.PathLike) -> tuple[str, list[RunRef], dict[str, Any]]:
    """("launch" | "sweep" | "sbatch", its runs, its record) for a directory written by launch, sweep,
    or the plain sbatch script (which leaves only its attempt records)."""
    directory = Path(directory)
    sweep = records.read_json(directory / records.SWEEP_FILE)
    if sweep is not None:
        log_dir = Path(sweep.get("log_dir") or records.slurm_dir(directory))
        runs = [
            RunRef(r["name"], Path(r["run_dir"]), str(r["job_id"]), log_dir, r.get("steps"))
            for r in sweep.get("runs", [])
        ]
        return "sweep", runs, sweep
    launch = records.read_json(directory / records.LAUNCH_FILE)
    if launch is not None:
        run = RunRef(
            launch.get("run_name") or directory.name, directory, str(launch["job_id"]),
            Path(launch.get("log_dir") or records.slurm_dir(directory)), launch.get("steps"),
        )
        return "launch", [run], launch
    attempts = records.read_attempts(directory)
    if attempts:  # a run submitted with the plain sbatch script (--emit-sbatch): no launch.json
        run = RunRef(directory.name, directory, attempts[-1].job_id, records.slurm_dir(directory), None)
        return "sbatch", [run], {}
    if not directory.is_dir():
        raise LaunchError(f"{directory}: no such directory")
    raise LaunchError(
        f"{directory}: neither {records.LAUNCH_FILE} nor {records.SWEEP_FILE} here; pass a run directory made by "
        "`looptrain launch` or a sweep directory made by `looptrain sweep`"
    )


def _expand_job_ids(text: str) -> list[str]:
    """sacct/squeue job ids, with pending array ranges like 12_[0-3%2] spelled out."""
    match = _ARRAY_RANGE.match(text)
    if not match:
        return [text]
    base, spec = match.groups()
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1))
    return out


def slurm_states(job_ids: Sequence[str]) -> Optional[dict[str, str]]:
    """{job id: accounting state} from sacct (squeue when sacct fails); None when Slurm cannot be asked."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    for command in (
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(bases)],
        ["squeue", "-h", "-o", "%i|%T", "-j", ",".join(bases)],
    ):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode != 0:
            continue
        states: dict[str, str] = {}
        for line in out.stdout.splitlines():
            if "|" not in line:
                continue
            job, state = line.split("|", 1)
            for one in _expand_job_ids(job.strip()):
                states[one] = state.split()[0] if state.strip() else ""
        return states
    return None


@dataclass
class MetricsSummary:
    step: Optional[int] = None
    loop: Optional[int] = None
    rms: Optional[float] = None
    mean: Optional[float] = None
    val_loss: Optional[float] = None


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _final_loop(record: dict[str, Any], family: str) -> Optional[int]:
    loops = [int(k.rsplit("/", 1)[1]) for k in record if k.startswith(family + "/") and k.rsplit("/", 1)[1].isdigit()]
    return max(loops) if loops else None


def summarize_metrics(run_dir: str | os.PathLike) -> MetricsSummary:
    """The last step, the final loop's norm/rms and norm/mean, the last val/loss at the final exit."""
    summary = MetricsSummary()
    try:
        records = read_jsonl(Path(run_dir) / METRICS_FILE)  # skips a line cut short by a killed writer
    except FileNotFoundError:
        return summary
    for record in records:
        if "step" not in record:
            continue
        summary.step = max(summary.step or 0, int(record["step"]))
        k = _final_loop(record, "norm/rms")
        if k is not None:
            summary.loop = k
            summary.rms = _number(record.get(f"norm/rms/{k}"))
            summary.mean = _number(record.get(f"norm/mean/{k}"))
        k = _final_loop(record, "val/loss")
        if k is not None:
            summary.val_loss = _number(record.get(f"val/loss/{k}"))
            summary.loop = summary.loop or k
    return summary


def last_error_line(paths: Iterable[Path], max_chars: int = 200) -> str:
    """The most telling error line of some log files: a `looptrain: error:` line, else the last exception line."""
    best_looptrain, best_exception, best_other = "", "", ""
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                lines = f.readlines()[-400:]
        except FileNotFoundError:
            continue
        for raw in lines:
            line = raw.strip()
            if not line or "RunStopped" in line or "UncompletedJobError" in line:
                continue  # the launcher's own wrap-up, not the cause
            if line.startswith("looptrain: error:"):
                best_looptrain = line
            elif _EXCEPTION_LINE.match(line):
                best_exception = line
            elif "error" in line.lower() and "submitit" not in line.lower():
                best_other = line
    line = best_looptrain or best_exception or best_other
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


def _log_files(run: RunRef) -> list[Path]:
    return sorted(run.log_dir.glob(f"{run.job_id}_*_log.err")) + sorted(run.log_dir.glob(f"{run.job_id}_batch.err"))


# ------------------------------------------------------------------ deciding


def run_status(run: RunRef, slurm_state: Optional[str]) -> RunStatus:
    attempts = records.read_attempts(run.run_dir, run.job_id)
    starts = sum(1 for a in attempts if a.event == "start")
    requeues = max(records.count_requeues(attempts), starts - 1, 0)
    last = attempts[-1] if attempts else None
    halt = records.read_json(run.run_dir / HALT_FILE)
    metrics = summarize_metrics(run.run_dir)
    note = ""
    if last is not None and last.event == "end" and last.outcome in _TERMINAL_OUTCOMES:
        state = last.outcome
    elif slurm_state in PENDING_STATES:
        state = "pending"
    elif slurm_state in RUNNING_STATES:
        state = "running"
    elif last is not None and last.event == "end" and last.outcome == records.REQUEUED:
        state = "pending"
    elif halt is not None:
        state = records.HALTED
    elif slurm_state == "COMPLETED":
        state = records.FINISHED
    elif slurm_state == "CANCELLED":
        state = records.CANCELLED
    elif slurm_state:
        state = records.FAILED
        note = f"Slurm: {slurm_state}"
    elif last is not None and last.event == "start":
        state = "running"
        note = "Slurm gave no state"
    else:
        state = "unknown"
        note = "no Slurm record and no attempt yet" if slurm_state is None else ""

    if state == records.HALTED and halt is not None:
        note = f"rule {halt.get('rule')} at step {halt.get('step')}: {halt.get('message', '')}"
    elif state == records.FAILED:
        error = last_error_line(_log_files(run))
        note = "; ".join(x for x in (note, error) if x) or f"see {run.log_dir}"
    elif state in (records.STOPPED, records.CANCELLED) and last is not None and last.reason:
        note = last.reason
    return RunStatus(
        name=run.name, job_id=run.job_id, state=state, requeues=requeues, step=metrics.step,
        total_steps=run.steps, loop=metrics.loop, rms=metrics.rms, mean=metrics.mean,
        val_loss=metrics.val_loss, note=note,
    )


def collect_status(directory: str | os.PathLike) -> tuple[str, list[RunStatus]]:
    kind, runs, _record = runs_of(directory)
    states = slurm_states([r.job_id for r in runs])
    return kind, [run_status(r, None if states is None else states.get(r.job_id, "")) for r in runs]


# ------------------------------------------------------------------ printing


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def format_status(rows: Sequence[RunStatus]) -> str:
    header = ("RUN", "JOB", "STATE", "REQUEUES", "STEP", "K", "NORM RMS", "NORM MEAN", "VAL LOSS", "NOTE")
    table = [header]
    for r in rows:
        step = "-" if r.step is None else (f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step))
        table.append((
            r.name, r.job_id, r.state, str(r.requeues), step, "-" if r.loop is None else str(r.loop),
            _fmt(r.rms), _fmt(r.mean), _fmt(r.val_loss), r.note,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} run(s): " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(line.rstrip() for line in lines)
