"""Running the grid: the dataset, the training processes (reused when finished), and their evaluation."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from typing import Any, Optional, Sequence

from looptrain.exit_codes import HALTED, OK
from repro.grid import MARKER, REPO, TOLERANCE, Job, RunOutcome, Scale

# ------------------------------------------------------------------ data

def ensure_dataset(data_dir: str, scale: Scale) -> dict:
    """Prepare the King James Bible into data_dir unless a matching dataset is already there."""
    info_path = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("vocab_size") != scale.vocab_size or info.get("seq_len") != scale.seq_len:
            raise SystemExit(
                f"repro_report: {data_dir} holds a dataset with vocab {info.get('vocab_size')} and seq_len "
                f"{info.get('seq_len')}, but this grid needs vocab {scale.vocab_size} and seq_len {scale.seq_len}; "
                "pass another --data directory or delete that one"
            )
        return info
    from looptrain.data.prepare import prepare_dataset

    print(f"repro_report: preparing the King James Bible into {data_dir} "
          f"(vocab {scale.vocab_size}, seq_len {scale.seq_len})", flush=True)
    return prepare_dataset("bible", data_dir, vocab_size=scale.vocab_size, seq_len=scale.seq_len, progress=False)


# ------------------------------------------------------------------ training


def read_marker(job: Job) -> Optional[dict]:
    path = os.path.join(job.run_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        marker = json.load(f)
    if marker.get("overrides") != job.overrides() or marker.get("recipe") != job.condition.recipe:
        return None
    return marker


def start_job(job: Job, threads: int) -> tuple[subprocess.Popen, Any, float, float]:
    """Start a fresh training process for `job`, logging to RUN_DIR.log."""
    if os.path.isdir(job.run_dir):
        shutil.rmtree(job.run_dir)  # a stale or interrupted run: start it over
    tmp = os.path.join(job.runs_dir, ".tmp", job.name)  # streaming's file locks, one dir per job
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TMPDIR": tmp,
        "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(job.run_dir + ".log", "w")
    log.write("$ " + shlex.join(job.command()) + "\n")
    log.flush()
    proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, time.time(), os.getloadavg()[0]


def finish_job(job: Job, code: int, wall: float, cpu: Optional[float] = None,
               circumstances: Optional[dict[str, Any]] = None) -> RunOutcome:
    """Write the run's marker (what was trained, how it ended, under which conditions) and return its outcome."""
    os.makedirs(job.run_dir, exist_ok=True)
    ended = time.time()
    circumstances = dict(circumstances or {}, load_end=os.getloadavg()[0])
    marker = {"recipe": job.condition.recipe, "overrides": job.overrides(), "exit_code": code, "wall_s": wall,
              "cpu_s": cpu, "ended": ended, "circumstances": circumstances}
    with open(os.path.join(job.run_dir, MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    return RunOutcome(job.name, job.condition.key, job.seed, job.run_dir, code, wall, cpu, ended, circumstances)


def reap(proc: subprocess.Popen) -> Optional[tuple[int, float]]:
    """(exit status, CPU seconds) of a process that has ended, None while it runs.

    os.wait4 reads the child's own resource usage, which says what the run
    would cost on an idle machine whatever else shares the cores.
    """
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def train_all(jobs: Sequence[Job], parallel: int, threads: int) -> list[RunOutcome]:
    """Train every job not already finished, `parallel` processes at a time; outcomes in job order."""
    outcomes: dict[str, RunOutcome] = {}
    pending = []
    for job in jobs:
        marker = read_marker(job)
        if marker is not None and marker["exit_code"] in (OK, HALTED):
            print(f"repro_report: reusing {job.run_dir} (status {marker['exit_code']})", flush=True)
            ended = marker.get("ended") or os.path.getmtime(os.path.join(job.run_dir, MARKER))
            outcomes[job.name] = RunOutcome(job.name, job.condition.key, job.seed, job.run_dir,
                                            marker["exit_code"], marker["wall_s"], marker.get("cpu_s"), ended,
                                            marker.get("circumstances") or {}, reused=True)
        else:
            pending.append(job)
    running: list[tuple[Job, subprocess.Popen, Any, float, float]] = []
    total = len(pending)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                print(f"repro_report: training {job.name} ({total - len(pending)}/{total}): {job.run_dir}.log",
                      flush=True)
                running.append((job, *start_job(job, threads)))
            time.sleep(0.5)
            for item in list(running):
                job, proc, log, start, load_start = item
                ended = reap(proc)
                if ended is None:
                    continue
                log.close()
                running.remove(item)
                outcome = finish_job(job, ended[0], time.time() - start, ended[1],
                                     {"parallel": parallel, "threads": threads, "load_start": load_start})
                outcomes[job.name] = outcome
                print(f"repro_report: {job.name} ended: {outcome.status} after {outcome.wall_s:.0f} s", flush=True)
    finally:
        for _, proc, log, _, _ in running:  # interrupted: stop our own children
            proc.terminate()
            proc.wait()
            log.close()
    return [outcomes[job.name] for job in jobs]


# ------------------------------------------------------------------ evaluation


def evaluate_all(outcomes: Sequence[RunOutcome], data_dir: str, scale: Scale, threads: int) -> None:
    """Depth curve 1..2K, loop norms and early exits of every run that left a checkpoint."""
    import torch

    from looptrain.eval import evaluate_run
    from looptrain.tracking.metrics_file import read_metrics

    torch.set_num_threads(max(1, threads))
    depths = list(range(1, 2 * scale.loops + 1))
    for outcome in outcomes:
        if outcome.exit_code not in (OK, HALTED):
            continue
        print(f"repro_report: evaluating {outcome.name}", flush=True)
        try:
            outcome.eval = evaluate_run(
                outcome.run_dir, data_dir=data_dir, depths=depths, batches=scale.eval_batches,
                batch_size=scale.micro_batch_size, name=outcome.name, device="cpu", tolerance=TOLERANCE,
            )
        except Exception as err:  # one broken run must not lose the report of the others
            outcome.eval_error = f"{type(err).__name__}: {err}"
            print(f"repro_report: evaluation of {outcome.name} failed: {outcome.eval_error}", flush=True)
        try:
            records = read_metrics(outcome.run_dir)
        except FileNotFoundError:
            records = []
        norm_key, ce_key = f"norm/mean/{scale.loops}", f"train/loss_exit/{scale.loops}"
        points = [(r["step"], r[norm_key], r.get(ce_key)) for r in records
                  if isinstance(r.get(norm_key), (int, float))]
        outcome.curve = {"step": [p[0] for p in points], "norm": [p[1] for p in points],
                         "ce": [p[2] for p in points]}
