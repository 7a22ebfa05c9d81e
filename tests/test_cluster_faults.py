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


# ====================================================================== signals


def tiny_run(data: str, out: Path, name: str, *, steps: int = 5000, extra: tuple[str, ...] = ()) -> list[str]:
    """`looptrain train` of a looped LM small enough that the run is mostly start-up."""
    return [
        sys.executable, "-m", "looptrain.cli", "train", str(REPO_ROOT / "recipes" / "quickstart.yaml"),
        "model.d_model=64", "model.n_heads=4", "model.vocab_size=512", "model.max_seq_len=64",
        "model.core_layers=2", f"train.steps={steps}", "train.micro_batch_size=4", "train.log_every=1",
        "train.val_every=0", "optim.schedule.warmup_steps=2", f"data.dir={data}", f"out_dir={out}",
        f"name={name}", "data.num_canonical_nodes=2", "checkpoint.every=0", *extra,
    ]


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """In its own session, as a shell starts a foreground job (Ctrl-C reaches its process group)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True, cwd=REPO_ROOT)


def wait_for_step(proc: subprocess.Popen, log: Path, step: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while f"step {step}/" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def manifests(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("step_*/manifest.json"))]


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_every_rank_and_ends_cancelled(bible_data, tmp_path):
    """Ctrl-C at a terminal: SIGINT to the launcher's process group. Both ranks stop after the same
    step, write one checkpoint together, say where it is and how to resume, and the job exits
    CANCELLED (19); W&B records a finished run whose outcome is `cancelled`."""
    from looptrain import exit_codes
    from looptrain.tracking.wandb_records import offline_run_files, read_records

    log = tmp_path / "train.log"
    proc = start([*tiny_run(bible_data, tmp_path, "ctrl-c", extra=("parallel.backend=fsdp2", "tracking.mode=offline")),
                  "--nproc", "2"], log)
    wait_for_step(proc, log, 3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=240) == exit_codes.CANCELLED, log.read_text()[-4000:]
    out = log.read_text()
    (manifest,) = manifests(tmp_path / "ctrl-c")
    assert manifest["world_size"] == 2 and manifest["step"] >= 3
    checkpoint = tmp_path / "ctrl-c" / "checkpoints" / f"step_{manifest['step']:08d}"
    assert f"stopped at step {manifest['step']}/5000 (Ctrl-C); checkpoint: {checkpoint}" in out, out[-3000:]
    assert "resume by running the same command again" in out
    assert "Traceback" not in out, out[-4000:]
    (run_file,) = offline_run_files(str(tmp_path / "ctrl-c"))
    records = list(read_records(run_file))
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    summary = {item.key: item.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert exits == [0] and summary.get("outcome") == '"cancelled"', (exits, summary)


@pytest.mark.slow
def test_sigterm_checkpoints_even_when_the_wandb_service_died_with_it(bible_data, tmp_path):
    """scancel signals every process of the step, W&B's service included: the next W&B call raises
    ConnectionResetError. The run must still checkpoint and exit PREEMPTED (18), carrying on
    without W&B and saying so."""
    from looptrain import exit_codes

    log = tmp_path / "train.log"
    proc = start(tiny_run(bible_data, tmp_path, "term", extra=("tracking.mode=offline",)), log)
    wait_for_step(proc, log, 3)
    for pid in [proc.pid, *children(proc.pid)]:  # the trainer, W&B's service, streaming's helpers
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=240) == exit_codes.PREEMPTED, log.read_text()[-4000:]
    out = log.read_text()
    (manifest,) = manifests(tmp_path / "term")
    assert manifest["reason"] == "preempt" and manifest["step"] >= 3
    assert f"stopped at step {manifest['step']}/5000 (SIGTERM)" in out
    assert "continuing without W&B" in out and "ConnectionResetError" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]


@pytest.mark.slow
def test_killing_the_launcher_stops_its_workers(bible_data, tmp_path):
    """`looptrain train --nproc 2` killed with SIGKILL (no handler runs): its workers must stop at once,
    not train on and write a checkpoint (due every 20 steps) before a print to the dead launcher's
    pipe happens to end them."""
    log = tmp_path / "train.log"
    proc = start([*tiny_run(bible_data, tmp_path, "orphans", extra=("parallel.backend=fsdp2", "train.log_every=100000",
                                                                     "checkpoint.every=20")), "--nproc", "2"], log)
    deadline = time.monotonic() + 240
    while "starting from step 0" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60  # a hang limit, not a timing claim: the kernel kills them at once
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and
                 Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"]
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"
    assert not list((tmp_path / "orphans").glob("checkpoints/step_*")), "workers trained on after the launcher died"


LAUNCHER = """
import sys
from looptrain.launch.local import launch_workers
worker = '''
import os, signal, sys, time
def on_int(*_):
    print("stopping: checkpointing", flush=True)
    time.sleep(60)  # a checkpoint that takes long
    sys.exit(19)
signal.signal(signal.SIGINT, on_int)
print("ready", flush=True)
time.sleep(600)
'''
sys.exit(launch_workers([sys.executable, "-c", worker], 2))
"""


def test_second_ctrl_c_aborts_the_launcher_at_once(tmp_path):
    """The first Ctrl-C is passed on to the workers (they checkpoint); a second one kills them now."""
    log = tmp_path / "launcher.log"
    proc = start([sys.executable, "-c", LAUNCHER], log)
    deadline = time.monotonic() + 60
    while log.read_text().count("ready") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    while log.read_text().count("stopping: checkpointing") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130, log.read_text()
    assert "aborting" in log.read_text()


# ==================================================================== resume


def logged(run_dir: Path) -> dict[int, dict]:
    """Each logged step's metrics without timings (perf/*, time/*), the last record of a step winning."""
    from looptrain.tracking import read_metrics

    return {int(r["step"]): {k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))}
            for r in read_metrics(str(run_dir))}


@pytest.mark.slow
def test_run_resumed_mid_window_logs_every_window_like_an_uninterrupted_run(bible_data, tmp_path):
    """log_every=4, checkpoints every 7 steps, killed with SIGKILL after one: the first window after the
    resume (which began before the checkpoint) averages the same steps as without the kill."""
    extra = ("train.log_every=4", "checkpoint.every=7", "tracking.mode=disabled")
    reference = subprocess.run(tiny_run(bible_data, tmp_path / "ref", "run", steps=24, extra=extra),
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
                               capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    log = tmp_path / "killed.log"
    command = tiny_run(bible_data, tmp_path / "killed", "run", steps=24, extra=extra)
    proc = start(command, log)
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step_*/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = max(int(p.parent.name.split("_")[1]) for p in checkpoints.glob("step_*/manifest.json"))
    if resumed_from in (21, 24):
        pytest.skip(f"the run reached step {resumed_from} before the kill: no window to resume in")
    proc = start(command, tmp_path / "resumed.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    expected, got = logged(tmp_path / "ref" / "run"), logged(tmp_path / "killed" / "run")
    assert sorted(got) == sorted(expected) == [4, 8, 12, 16, 20, 24]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-9, abs=1e-12), (step, resumed_from)


@pytest.mark.slow
def test_a_stop_asked_for_from_outside_checkpoints_and_ends_cancelled(bible_data, tmp_path):
    """`touch RUN_DIR/STOP` (the same path as the W&B tag `stop` of an online run): checkpoint at the
    next log interval, exit CANCELLED, W&B outcome `cancelled (STOP file)`; the request is consumed."""
    from looptrain import exit_codes
    from looptrain.tracking.wandb_records import offline_run_files, read_records

    log = tmp_path / "train.log"
    proc = start(tiny_run(bible_data, tmp_path, "stopped", extra=("tracking.mode=offline",)), log)
    wait_for_step(proc, log, 3)
    (tmp_path / "stopped" / "STOP").touch()
    assert proc.wait(timeout=240) == exit_codes.CANCELLED, log.read_text()[-4000:]
    (manifest,) = manifests(tmp_path / "stopped")
    assert f"stopped at step {manifest['step']}/5000 (stop asked for: STOP file)" in log.read_text()
    assert not (tmp_path / "stopped" / "STOP").exists() and (tmp_path / "stopped" / "STOP.honoured").exists()
    (run_file,) = offline_run_files(str(tmp_path / "stopped"))
    summary = {item.key: item.value_json for r in read_records(run_file) if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary.get("outcome") == '"cancelled (STOP file)"', summary
