"""Faults around the training loop on a shared host, with real processes: many jobs starting
together on one machine, jobs killed with SIGKILL, signals (cancel, Ctrl-C), launcher death.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from looptrain.launch.local import free_port, worker_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# One rank of a job that builds the training loader and reads one batch. Every rank of
# every job waits for the start file after its (slow) imports, so that all jobs register
# their streaming shared memory at the same moment: the race seen on packed nodes.
DATASET_JOB = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path
    from looptrain.config.schema import DataConfig
    from looptrain.data.loader import build_train_loader
    from looptrain.data.streaming_import import import_streaming
    from looptrain.parallel.env import init_distributed, shutdown_distributed

    go, data, hold = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    env = init_distributed("cpu", "gloo")
    import_streaming()
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    loader = build_train_loader(DataConfig(dir=data, num_canonical_nodes=2), seq_len=64, vocab_size=512,
                                micro_batch_size=2)
    batch = next(iter(loader))
    print("batch", env.rank, hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16], flush=True)
    time.sleep(hold)
    shutdown_distributed()
""")


class DatasetJob:
    """Two ranks of one job, each in its own process group (so SIGKILL reaches its helpers too)."""

    def __init__(self, directory: Path, name: str, data: str, go: Path, hold_s: float = 0.0):
        self.logs = [directory / f"{name}.rank{r}.log" for r in range(2)]
        port = free_port()
        base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        self.procs = [
            subprocess.Popen([sys.executable, "-c", DATASET_JOB, str(go), data, str(hold_s)],
                             env=worker_env(rank, 2, port, base), stdout=open(self.logs[rank], "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
            for rank in range(2)
        ]

    def output(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs)

    def lines(self, word: str) -> list[str]:
        return [line for p in self.logs for line in p.read_text().splitlines() if line.startswith(word)]

    def wait(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                codes.append(proc.wait())
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start_together(jobs: list[DatasetJob], go: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(job.lines("ready")) for job in jobs) < 2 * len(jobs):
        assert time.monotonic() < deadline, "\n".join(job.output() for job in jobs)
        assert all(p.poll() is None for job in jobs for p in job.procs), "\n".join(job.output() for job in jobs)
        time.sleep(0.1)
    go.touch()


@pytest.mark.slow
def test_jobs_starting_together_on_one_host_never_share_streaming_memory(bible_data, tmp_path):
    """Two rounds of four two-rank jobs register their shared memory at the same instant; in the
    second, two are killed with SIGKILL while they hold it, and three new ones start beside the
    leftovers.
    Every job must start, and every job must read the same batches (its own sample order)."""
    batches: set[tuple[str, ...]] = set()
    for round_, (starting, killed) in enumerate([(4, 0), (4, 2)]):
        go = tmp_path / f"go{round_}"
        holding = [DatasetJob(tmp_path, f"r{round_}-held{i}", bible_data, go, hold_s=600) for i in range(killed)]
        jobs = [DatasetJob(tmp_path, f"r{round_}-job{i}", bible_data, go) for i in range(starting - killed)]
        _start_together(holding + jobs, go)
        for job in holding:  # killed while they hold their segments: stale memory for the next jobs
            deadline = time.monotonic() + 120
            while len(job.lines("batch")) < 2:
                assert time.monotonic() < deadline, job.output()
                time.sleep(0.1)
            job.kill()
        if killed:
            go = tmp_path / f"go{round_}-after-kill"
            jobs += [DatasetJob(tmp_path, f"r{round_}-late{i}", bible_data, go) for i in range(3)]
            _start_together(jobs[-3:], go)
        for job in jobs:
            assert job.wait(timeout_s=240) == [0, 0], job.output()
            assert "Traceback" not in job.output(), job.output()
            batches.add(tuple(sorted(job.lines("batch"))))
    assert len(batches) == 1, batches
