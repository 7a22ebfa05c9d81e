"""What runs inside every task of a Slurm job that `looptrain launch` or `looptrain sweep` submitted.

submitit starts one Python process per task (one rank: one GPU, or one CPU
worker slot) and calls a `SlurmTrainJob` in each. The job sets the
rendezvous from the Slurm environment, gives itself a private temp dir and
runs the trainer (`looptrain.train.main_worker`).

Requeue, and how it sits with submitit's own signal handling
    Slurm sends USR2 to every task `signal_delay_s` before the time limit (and
    on preemption). submitit's handler calls `checkpoint()` on rank 0 only and
    requeues at once, in the middle of whatever the process was doing, while
    the other ranks carry on. That cannot checkpoint a sharded model: every
    rank has to take part, at the same step. So the trainer installs its own
    USR2/SIGTERM handler when the training loop starts (it replaces
    submitit's); each rank only records the signal, the ranks all-reduce the
    flag every step, all stop after the same step, write one sharded
    checkpoint together and return PREEMPTED (18). Then rank 0 decides here
    whether to requeue (`scontrol requeue`), and every task exits without a
    result so that submitit's client keeps waiting for the requeued attempt.
    The new attempt resumes from that checkpoint (`checkpoint.resume: auto`),
    with the W&B run id stored in it.

    Before the loop starts (imports, data, model, resume) submitit's handler is
    still in place; a signal then reaches `checkpoint()` on rank 0. Nothing
    has been trained since the last checkpoint, so requeueing at once loses
    nothing.

    Never requeued: exit 17 (the norm monitor halted the run), errors, a job
    that `looptrain cancel` or scancel is ending (its tasks get SIGTERM, which
    the trainer also answers with a checkpoint and 18), and time-limit
    requeues beyond `max_requeues` (counted in <run_dir>/slurm/attempts.jsonl).
    A preemption (a signal with plenty of time left) is requeued without
    counting: it is the cluster's doing, not the run's.

    Rank 0 writes the attempt records. The other ranks, on a decision that
    all ranks reached together (halt, preemption), wait for rank 0's record
    before they exit: with `srun --kill-on-bad-exit=1` an early non-zero exit
    of rank 1 would kill rank 0 before it has written it.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import submitit

from looptrain import exit_codes
from looptrain.config import Recipe
from looptrain.launch import records

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_MARGIN_S = 90  # Slurm checks limits every 30 s and may signal up to ~60 s earlier than asked
PEER_WAIT_S = 120.0  # how long a non-zero rank waits for rank 0's end record
LIVE_JOB_STATES = {"RUNNING", "SIGNALING", "CONFIGURING"}  # states in which a job may requeue itself


class RunStopped(Exception):
    """The run ended without finishing (halted, failed, or preempted and not requeued).

    Raised so that submitit records the job as failed and Slurm's accounting
    says FAILED; the message carries the reason.
    """


@dataclass(frozen=True)
class TaskInfo:
    """This task's place in the Slurm job."""

    job_id: str  # as sacct names it: 1234, or 1234_5 for an array task
    raw_job_id: str  # SLURM_JOB_ID: what scontrol/squeue take
    restart: int
    rank: int
    node: int

    @classmethod
    def from_env(cls) -> "TaskInfo":
        env = os.environ
        raw = env.get("SLURM_JOB_ID", "0")
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return cls(
            job_id=f"{array}_{task}" if array and task else raw,
            raw_job_id=raw,
            restart=int(env.get("SLURM_RESTART_COUNT") or 0),
            rank=int(env.get("SLURM_PROCID", "0")),
            node=int(env.get("SLURM_NODEID", "0")),
        )


def nodes_share_one_host() -> bool:
    """Whether every node of this job is the same machine (several slurmd on one host, as in a test cluster).

    Such nodes share /dev/shm and /tmp, so for mosaicml-streaming, whose
    local leaders register shared memory per machine, they are one node: two
    "local leaders" on one host would register the same segment and fail.
    """
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) < 2:
        return False
    if os.environ.get("SLURMD_NODENAME") == socket.gethostname().split(".")[0]:
        return False  # a real node named after its machine: no need to ask slurmctld
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    machines = set()
    lines = [line for line in out.stdout.splitlines() if "NodeName=" in line]
    for line in lines:
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        machines.add((fields.get("NodeHostName"), fields.get("NodeAddr")))
    return out.returncode == 0 and len(lines) > 1 and len(machines) == 1


def prepare_task_environment(task: TaskInfo) -> str:
    """Rendezvous from SLURM_*, a private TMPDIR, threads = allocated CPUs; return the TMPDIR.

    Variables inherited from the submitting shell (a RANK or MASTER_PORT
    exported there) would override Slurm's, so they are dropped first.
    """
    from looptrain.parallel.env import export_slurm_rendezvous

    for name in RENDEZVOUS_VARS:
        os.environ.pop(name, None)
    export_slurm_rendezvous()
    if nodes_share_one_host():
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["WORLD_SIZE"]
        os.environ["LOCAL_RANK"] = os.environ["RANK"]
    # mosaicml-streaming keeps file locks in the temp dir, shared by the ranks of
    # a machine; leftovers of a killed attempt or another job must not be seen.
    name = f"looptrain-{task.raw_job_id}-r{task.restart}"
    tmp = os.path.join(os.environ.get("TMPDIR") or "/tmp", name)
    try:
        os.makedirs(tmp, exist_ok=True)
    except OSError:  # a TMPDIR of the submitting machine that this node lacks
        tmp = os.path.join("/tmp", name)
        os.makedirs(tmp, exist_ok=True)
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = None  # forget the cached default
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
    return tmp


# ------------------------------------------------------------------- requeue


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    kind: str  # records.TIMEOUT or records.PREEMPTION
    reason: str  # why not, when not
    cancelled: bool = False  # not requeued because someone is cancelling the job

    @property
    def outcome(self) -> str:
        if self.requeue:
            return records.REQUEUED
        return records.CANCELLED if self.cancelled else records.STOPPED


def parse_slurm_duration(text: str) -> Optional[float]:
    """Seconds in a Slurm time limit: [D-]HH:MM:SS, MM:SS or M; None for UNLIMITED and the like."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    if len(parts) == 1:
        seconds = int(parts[0]) * 60  # plain minutes
    else:
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


def query_job(raw_job_id: str) -> tuple[Optional[str], Optional[float]]:
    """(state, seconds left before the time limit) of a job as slurmctld sees it; Nones when unknown.

    The time left is start + time limit - now. The job's end time would be
    wrong here: on preemption Slurm moves it to the end of the grace period.
    """
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", raw_job_id, "-o", "%T|%S|%l"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if line.count("|") != 2:
        return None, None
    state, start, limit = (part.strip() for part in line.split("|"))
    left = None
    duration = parse_slurm_duration(limit)
    try:
        if duration is not None:
            left = datetime.datetime.fromisoformat(start).timestamp() + duration - time.time()
    except ValueError:  # "N/A", "Unknown"
        left = None
    return state or None, left


def decide_requeue(
    run_dir: str,
    task: TaskInfo,
    *,
    max_requeues: int,
    signal_delay_s: int,
    job_state: Optional[str],
    seconds_left: Optional[float],
) -> RequeueDecision:
    """Whether a checkpointed (exit 18) attempt should be put back in the queue.

    A signal that came with at most `signal_delay_s` (plus Slurm's jitter)
    left is the time-limit warning: such requeues are capped at
    `max_requeues`. With more time left it was a preemption: not capped.
    An unknown time left counts as a time limit (the safe side).
    """
    timeout = seconds_left is None or seconds_left <= signal_delay_s + TIMEOUT_MARGIN_S
    kind = records.TIMEOUT if timeout else records.PREEMPTION
    if records.cancel_requested(run_dir, task.job_id):
        return RequeueDecision(False, kind, "cancel requested (looptrain cancel)", cancelled=True)
    if job_state is not None and job_state not in LIVE_JOB_STATES:
        return RequeueDecision(False, kind, f"the job is {job_state}: Slurm is ending it (scancel?)", cancelled=True)
    if timeout:
        done = records.count_requeues(records.read_attempts(run_dir, task.job_id), records.TIMEOUT)
        if done >= max_requeues:
            why = f"time-limit requeue cap reached ({done} of max_requeues={max_requeues})"
            return RequeueDecision(False, kind, why)
    return RequeueDecision(True, kind, "")


def job_comment(outcome: str, code: int, run_dir: str, reason: Optional[str] = None) -> str:
    """What the attempt's end means, for Slurm's job comment: submitit reports every stopped run as
    FAILED 1:0 in sacct, so a halt could not be told from a crash there."""
    text = f"looptrain: {outcome} (exit {code})"
    if outcome == records.HALTED:
        from looptrain.monitor.halt import read_halt_record

        halt = read_halt_record(run_dir) or {}
        text += f": monitor rule {halt.get('rule', '?')} at step {halt.get('step', '?')}: {halt.get('message', '')}"
    elif reason:
        text += f": {reason}"
    return text[:250]


def set_job_comment(raw_job_id: str, text: str) -> None:
    """`scontrol update JobId=... Comment=...`: shown by `scontrol show job`, `squeue -o %k` and
    (with AccountingStoreFlags=job_comment) `sacct -o Comment`. Best effort."""
    try:
        subprocess.run(["scontrol", "update", f"JobId={raw_job_id}", f"Comment={text}"],
                       capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


def requeue_job(raw_job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", raw_job_id], check=True, capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------- job


_OUTCOMES = {exit_codes.OK: records.FINISHED, exit_codes.HALTED: records.HALTED,
             exit_codes.CANCELLED: records.CANCELLED}
_CLEAN_ENDS = (exit_codes.OK, exit_codes.HALTED, exit_codes.PREEMPTED, exit_codes.CANCELLED)


class SlurmTrainJob(submitit.helpers.Checkpointable):
    """Train one recipe in every task of a Slurm job; requeue on preemption (see the module docstring)."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        workdir: str,
        max_requeues: int,
        signal_delay_s: int,
        force_resume: bool = False,
    ):
        self.recipe = recipe
        self.workdir = workdir
        self.max_requeues = max_requeues
        self.signal_delay_s = signal_delay_s
        self.force_resume = force_resume

    @property
    def run_dir(self) -> str:
        return os.path.join(self.workdir, self.recipe.run_dir)

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)  # relative recipe paths mean what they meant at submission
        task = TaskInfo.from_env()
        tmp = prepare_task_environment(task)
        if task.rank == 0:
            records.append_attempt(self.run_dir, event="start", job_id=task.job_id, restart=task.restart)
        from looptrain.train import main_worker

        code = main_worker(self.recipe, force_resume=self.force_resume)
        if code in _CLEAN_ENDS and os.environ.get("LOCAL_RANK") == "0":
            # Every rank has passed the trainer's final barrier: nobody needs the locks any more.
            shutil.rmtree(tmp, ignore_errors=True)
        return self._conclude(task, code)

    def _conclude(self, task: TaskInfo, code: int) -> dict[str, Any]:
        result = {"exit_code": code, "run_dir": self.run_dir, "job_id": task.job_id, "rank": task.rank}
        coordinated = code in (exit_codes.HALTED, exit_codes.PREEMPTED)
        if task.rank != 0:
            if code in (exit_codes.OK, exit_codes.CANCELLED):
                return result
            if coordinated:
                self._wait_for_rank0(task)
                sys.exit(code)  # no result file: rank 0 speaks for the job
            raise RunStopped(f"rank {task.rank} of {self.run_dir} failed with exit status {code}")

        if code == exit_codes.PREEMPTED:
            state, left = query_job(task.raw_job_id)
            decision = decide_requeue(
                self.run_dir, task, max_requeues=self.max_requeues, signal_delay_s=self.signal_delay_s,
                job_state=state, seconds_left=left,
            )
            if decision.requeue:
                # Recorded first: the requeue ends this attempt within KillWait.
                self._record_end(task, code, records.REQUEUED, kind=decision.kind)
                try:
                    requeue_job(task.raw_job_id)
                except (OSError, subprocess.SubprocessError) as err:
                    detail = (getattr(err, "stderr", "") or str(err)).strip()
                    decision = RequeueDecision(False, decision.kind, f"scontrol requeue failed: {detail}")
                else:
                    print(f"looptrain: checkpointed and requeued job {task.job_id} ({decision.kind})", flush=True)
                    sys.exit(code)  # Slurm ends this attempt; submitit waits for the next one
            self._record_end(task, code, decision.outcome, kind=decision.kind, reason=decision.reason)
            raise RunStopped(f"{self.run_dir}: checkpointed after a signal, not requeued: {decision.reason}")

        outcome = _OUTCOMES.get(code, records.FAILED)
        self._record_end(task, code, outcome)
        if code in (exit_codes.OK, exit_codes.CANCELLED):  # a Ctrl-C/SIGINT stop is not a failure
            return result
        if code == exit_codes.HALTED:
            raise RunStopped(f"{self.run_dir}: halted by the norm monitor (exit status 17, see HALTED.json)")
        raise RunStopped(f"{self.run_dir}: training failed with exit status {code} (see the rank logs)")

    def _record_end(self, task: TaskInfo, code: int, outcome: str, *, kind: Optional[str] = None,
                    reason: Optional[str] = None) -> None:
        records.append_attempt(
            self.run_dir, event="end", job_id=task.job_id, restart=task.restart, outcome=outcome,
            exit_code=code, requeue_kind=kind, reason=reason,
        )
        set_job_comment(task.raw_job_id, job_comment(outcome, code, self.run_dir, reason))

    def _wait_for_rank0(self, task: TaskInfo) -> None:
        deadline = time.monotonic() + PEER_WAIT_S
        while time.monotonic() < deadline:
            ends = [a for a in records.read_attempts(self.run_dir, task.job_id)
                    if a.event == "end" and a.restart == task.restart]
            if ends:
                return
            time.sleep(0.2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        """submitit's USR2 handler, on rank 0, before the training loop took signals over.

        The last committed checkpoint is the state to resume from, so a plain
        resubmission of this job is the checkpoint. Returning None refuses
        the requeue (submitit then ends the job).
        """
        task = TaskInfo.from_env()
        state, left = query_job(task.raw_job_id)
        decision = decide_requeue(
            self.run_dir, task, max_requeues=self.max_requeues, signal_delay_s=self.signal_delay_s,
            job_state=state, seconds_left=left,
        )
        if not decision.requeue:
            self._record_end(task, exit_codes.PREEMPTED, decision.outcome, kind=decision.kind, reason=decision.reason)
            return None
        self._record_end(task, exit_codes.PREEMPTED, records.REQUEUED, kind=decision.kind)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------ plain sbatch


def conclude_sbatch_attempt(run_dir: str, *, rc: int, signalled: bool, terminated: bool, max_requeues: int,
                            signal_delay_s: int) -> int:
    """The end of one attempt of the `--emit-sbatch` script, decided by the rules `SlurmTrainJob` uses:
    record it, set the job comment, requeue when due; return the batch script's exit status.

    rc is srun's status; signalled: the batch shell got the warning (USR2), so a kill status after
    it still means checkpoint-and-stop; terminated: it got SIGTERM (scancel).
    """
    from looptrain.monitor.halt import HALT_FILE

    task = TaskInfo.from_env()

    def record(outcome: str, code: int, kind: Optional[str] = None, reason: Optional[str] = None) -> None:
        records.append_attempt(run_dir, event="end", job_id=task.job_id, restart=task.restart, outcome=outcome,
                               exit_code=code, requeue_kind=kind, reason=reason, launcher="sbatch")
        set_job_comment(task.raw_job_id, job_comment(outcome, code, run_dir, reason))

    # With --kill-on-bad-exit the first rank to exit 17 gets its peers terminated, and srun may
    # report their kill status: a halt record written during this attempt is what tells.
    starts = [a.time for a in records.read_attempts(run_dir, task.job_id) if a.event == "start"]
    halt_file = os.path.join(run_dir, HALT_FILE)
    if rc != 0 and starts and os.path.exists(halt_file) and os.path.getmtime(halt_file) > starts[-1]:
        rc = exit_codes.HALTED
    if rc in _OUTCOMES:
        record(_OUTCOMES[rc], rc)
        return 0 if rc in (exit_codes.OK, exit_codes.CANCELLED) else rc
    if rc != exit_codes.PREEMPTED and not signalled:
        record(records.FAILED, rc)
        return rc
    state, left = query_job(task.raw_job_id)
    decision = decide_requeue(run_dir, task, max_requeues=max_requeues, signal_delay_s=signal_delay_s,
                              job_state=state, seconds_left=left)
    if terminated and decision.requeue:
        decision = RequeueDecision(False, decision.kind, "the job was cancelled", cancelled=True)
    if not decision.requeue:
        record(decision.outcome, rc, decision.kind, decision.reason)
        return rc
    record(records.REQUEUED, rc, decision.kind)  # first: the requeue ends this batch shell
    what = "checkpointed" if rc == exit_codes.PREEMPTED else f"no new checkpoint (ranks exited {rc})"
    print(f"looptrain: {what}; requeueing job {task.job_id} ({decision.kind})", flush=True)
    try:
        requeue_job(task.raw_job_id)
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip()
        record(records.STOPPED, rc, decision.kind, f"scontrol requeue failed: {detail}")
        return rc
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m looptrain.launch.job start|end ...`: the attempt records of the plain sbatch script."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m looptrain.launch.job")
    parser.add_argument("event", choices=("start", "end"))
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument("--signalled", type=int, default=0)
    parser.add_argument("--terminated", type=int, default=0)
    parser.add_argument("--max-requeues", type=int, default=0)
    parser.add_argument("--signal-delay-s", type=int, default=0)
    args = parser.parse_args(argv)
    if args.event == "start":
        task = TaskInfo.from_env()
        records.append_attempt(args.run_dir, event="start", job_id=task.job_id, restart=task.restart,
                               launcher="sbatch")
        return 0
    return conclude_sbatch_attempt(args.run_dir, rc=args.rc, signalled=bool(args.signalled),
                                   terminated=bool(args.terminated), max_requeues=args.max_requeues,
                                   signal_delay_s=args.signal_delay_s)


if __name__ == "__main__":
    sys.exit(main())
