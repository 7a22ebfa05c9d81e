"""What the Slurm launcher writes into run and sweep directories, and reads back.

    <run_dir>/launch.json            the job id, the submitted recipe, the profile, log places
    <run_dir>/slurm/                 submitit's folder: sbatch script, pickles, per-rank logs
                                     <job>_<rank>_log.out / <job>_<rank>_log.err
    <run_dir>/slurm/attempts.jsonl   one line when an attempt starts and one when it ends
                                     (rank 0 writes them; the plain sbatch script too)
    <run_dir>/slurm/cancel.json      `looptrain cancel` was asked: never requeue this run again
    <sweep_dir>/sweep.json           the sweep's runs, their run dirs and array job ids
    <sweep_dir>/slurm/               the job array's submitit folder and logs

The attempt records are how a requeued job knows how often it was requeued,
and how `looptrain status` tells a halt from a failure from a requeue without
asking Slurm. Everything here is plain JSON and imports nothing heavy, so
`looptrain status` answers at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from looptrain.fileio import read_jsonl, write_text_atomic
from looptrain.redact import redact

LAUNCH_FILE = "launch.json"
SWEEP_FILE = "sweep.json"
SLURM_DIR = "slurm"
ATTEMPTS_FILE = "attempts.jsonl"
CANCEL_FILE = "cancel.json"

# How an attempt ended (the `outcome` of an end record).
FINISHED = "finished"  # exit 0
HALTED = "halted"  # exit 17: the norm monitor stopped the run
FAILED = "failed"  # an error (exit 1 or 2, or a crash)
REQUEUED = "requeued"  # exit 18 and the job was put back in the queue
STOPPED = "stopped"  # exit 18 but not requeued (requeue cap reached, job ending)
CANCELLED = "cancelled"  # exit 18 after `looptrain cancel` / scancel

# Why a job was requeued: at its time limit (capped by max_requeues) or preempted (not capped).
TIMEOUT = "timeout"
PREEMPTION = "preemption"


def slurm_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SLURM_DIR


def attempts_path(run_dir: str | os.PathLike) -> Path:
    return slurm_dir(run_dir) / ATTEMPTS_FILE


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write a JSON file atomically (temp file + rename): a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(redact(data), indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------ attempts


@dataclass(frozen=True)
class Attempt:
    """One line of attempts.jsonl."""

    event: str  # "start" or "end"
    job_id: str  # as sacct names it: 1234 or 1234_5 for an array task
    restart: int  # SLURM_RESTART_COUNT: 0 for the first attempt
    time: float
    outcome: Optional[str] = None  # end records: FINISHED, HALTED, ...
    exit_code: Optional[int] = None
    requeue_kind: Optional[str] = None  # TIMEOUT or PREEMPTION for requeued/stopped attempts
    reason: Optional[str] = None  # why an attempt was not requeued
    launcher: str = "submitit"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Attempt":
        return cls(
            event=str(data.get("event", "")),
            job_id=str(data.get("job_id", "")),
            restart=int(data.get("restart") or 0),
            time=float(data.get("time") or 0.0),
            outcome=data.get("outcome"),
            exit_code=None if data.get("exit_code") is None else int(data["exit_code"]),
            requeue_kind=data.get("requeue_kind"),
            reason=data.get("reason"),
            launcher=str(data.get("launcher", "submitit")),
        )


def append_attempt(run_dir: str | os.PathLike, **fields: Any) -> Attempt:
    """Append one record (one `write` of one line, so concurrent appends do not interleave)."""
    record = Attempt(time=time.time(), **fields)
    data = {k: v for k, v in record.__dict__.items() if v is not None}
    data["host"] = socket.gethostname()
    path = attempts_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(data) + "\n")
    return record


def read_attempts(run_dir: str | os.PathLike, job_id: Optional[str] = None) -> list[Attempt]:
    """The attempt records of a run, oldest first (of one job when job_id is given)."""
    try:
        lines = read_jsonl(attempts_path(run_dir))  # skips a line cut by a killed writer
    except FileNotFoundError:
        return []
    records = [Attempt.from_dict(data) for data in lines]
    return [r for r in records if job_id is None or r.job_id == str(job_id)]


def count_requeues(attempts: Iterable[Attempt], kind: Optional[str] = None) -> int:
    """How many attempts ended in a requeue (of one kind when given)."""
    return sum(
        1 for a in attempts
        if a.event == "end" and a.outcome == REQUEUED and (kind is None or a.requeue_kind == kind)
    )


# -------------------------------------------------------------------- cancel


def request_cancel(run_dir: str | os.PathLike, job_ids: Iterable[str]) -> Path:
    """Mark a run as cancelled on purpose, before scancel: its job must not requeue itself."""
    return write_json(
        slurm_dir(run_dir) / CANCEL_FILE,
        {"job_ids": [str(j) for j in job_ids], "time": time.time(), "host": socket.gethostname()},
    )


def cancel_requested(run_dir: str | os.PathLike, job_id: str) -> bool:
    record = read_json(slurm_dir(run_dir) / CANCEL_FILE)
    if record is None:
        return False
    ids = {str(j) for j in record.get("job_ids", [])}
    base = str(job_id).split("_")[0]
    return str(job_id) in ids or base in ids


# ---------------------------------------------------------------------- logs


def rank_log_paths(log_dir: str | os.PathLike, job_id: str, tasks: int) -> list[tuple[Path, Path]]:
    """(stdout, stderr) of each rank of a job, named as submitit names them: <job>_<rank>_log.{out,err}.

    The plain sbatch script (looptrain/launch/sbatch.template.sh) uses the same names.
    """
    log_dir = Path(log_dir)
    return [(log_dir / f"{job_id}_{t}_log.out", log_dir / f"{job_id}_{t}_log.err") for t in range(tasks)]
