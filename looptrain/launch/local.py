"""Start N local worker processes of one job: `looptrain train --nproc N RECIPE ...`.

Why not torchrun: torchrun parses the script's own flags as prefixes of its
own (`--n` becomes ambiguous), and it is one more layer to explain. The job of
a local launcher is small: give each worker its rank and a rendezvous address,
show their output, and never leave a job half alive.

Failure policy. A rank that raises exits non-zero at once; its peers are then
usually blocked inside a collective waiting for it and would wait until the
process-group timeout (30 minutes by default). So when any worker fails, the
others get SIGTERM, then SIGKILL after a short grace period, and the launcher
returns the failed worker's status. HALTED and PREEMPTED are collective
decisions that every rank reaches together (rank 0 may still be writing the
checkpoint or halt record), so those get a long grace period instead.

Ctrl-C. The first one is passed on to every worker: they stop after the
current step, checkpoint, and exit CANCELLED (19); the launcher waits for
that. A second Ctrl-C aborts at once (the workers are killed, no checkpoint).

The launcher's death. Each worker asks the kernel for SIGKILL when the
launcher dies (Linux `PR_SET_PDEATHSIG`), so a launcher killed with SIGKILL
(or an OOM kill) never leaves its workers training on their own.

Under torchrun the same holds (it tears down the group when one worker
fails); under Slurm use `srun --kill-on-bad-exit=1` so that one task's
non-zero exit ends the step's other tasks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

from looptrain import exit_codes

FAILURE_GRACE_S = 5.0  # SIGTERM -> SIGKILL after a peer failed (peers are usually stuck in a collective)
COORDINATED_GRACE_S = 300.0  # peers of a rank that halted/was preempted finish their own checkpoint
_COORDINATED = {exit_codes.HALTED, exit_codes.PREEMPTED, exit_codes.CANCELLED}
TIMED_OUT = 124


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def worker_env(rank: int, nproc: int, master_port: int, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The variables torch.distributed, DeepSpeed and mosaicml-streaming read, for one local rank."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        PYTHONUNBUFFERED="1",
    )
    if "OMP_NUM_THREADS" not in env:  # N processes sharing the cores this process may use
        from looptrain.threads import available_cores

        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // nproc))
    return env


def _die_with_parent(parent_pid: int):
    """A Popen preexec_fn: SIGKILL this child when the launcher (the forking thread) dies."""

    def preexec() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: no parent-death signal
            return
        if os.getppid() != parent_pid:  # the launcher died before the request took effect
            os._exit(128 + signal.SIGKILL)

    return preexec


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    reader: threading.Thread


class _Output:
    """Prefixed, line-atomic output of all ranks, in the order the lines arrive.

    When one rank fails, its peers usually fail a moment later with a "lost
    connection" error from the collective they were waiting in. Those lines are
    shown too (hiding them would need a guess at which rank failed first); the
    launcher's last line names the rank that failed first.
    """

    def __init__(self, out: TextIO):
        self.out = out
        self.lock = threading.Lock()

    def stream(self, rank: int, pipe) -> None:
        for line in iter(pipe.readline, ""):
            self.write(f"[rank {rank}] {line if line.endswith(chr(10)) else line + chr(10)}")
        pipe.close()

    def write(self, text: str, stream: Optional[TextIO] = None) -> None:
        with self.lock:
            (stream or self.out).write(text)
            (stream or self.out).flush()


def _status(returncode: int) -> int:
    """Popen's -SIG for a signal death becomes the shell's 128 + SIG."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the worker and anything it started (each worker leads its own process group;
    the group outlives an exited worker while its children, e.g. data loader workers, live)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(workers: Sequence[_Worker], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
        time.sleep(0.05)


def _stop(workers: Sequence[_Worker], grace_s: float, *, wait_first_s: float = 0.0) -> None:
    """Let the workers finish for `wait_first_s`, then SIGTERM, then SIGKILL after `grace_s`."""
    _wait_all(workers, wait_first_s)
    for w in workers:
        _signal_group(w.proc, signal.SIGTERM)
    _wait_all(workers, grace_s)
    for w in workers:
        _signal_group(w.proc, signal.SIGKILL)
    for w in workers:
        w.proc.wait()


def launch_workers(
    command: Sequence[str],
    nproc: int,
    *,
    env: Optional[dict[str, str]] = None,
    out: Optional[TextIO] = None,
    failure_grace_s: float = FAILURE_GRACE_S,
    coordinated_grace_s: float = COORDINATED_GRACE_S,
    timeout_s: Optional[float] = None,
) -> int:
    """Run `command` as ranks 0..nproc-1 of one job; return the job's exit status.

    0 when every rank exits 0; otherwise the status of the first rank that
    exited non-zero (a signal death reads 128 + signal), after the others
    have been stopped. With `timeout_s`, a job still running then is stopped
    and the status is 124 (as from coreutils `timeout`).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    output = _Output(sys.stdout if out is None else out)
    port = free_port()
    workers: list[_Worker] = []
    for rank in range(nproc):
        proc = subprocess.Popen(
            list(command),
            env=worker_env(rank, nproc, port, env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # own process group: a stop reaches the worker's children too
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None,
        )
        reader = threading.Thread(target=output.stream, args=(rank, proc.stdout), daemon=True)
        workers.append(_Worker(rank, proc, reader))
    for w in workers:
        w.reader.start()

    forwarded = _forward_signals(workers)
    failed: Optional[_Worker] = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while failed is None and any(w.proc.poll() is None for w in workers):
            failed = next((w for w in workers if w.proc.poll() not in (None, 0)), None)
            if failed is None:
                if deadline is not None and time.monotonic() > deadline:
                    output.write(f"looptrain: the job ran past {timeout_s:.0f} s; stopping the workers\n", sys.stderr)
                    _stop(workers, failure_grace_s)
                    return TIMED_OUT
                time.sleep(0.05)
        if failed is None:  # everyone has exited: a late failure is still a failure
            failed = next((w for w in workers if w.proc.returncode != 0), None)
        if failed is not None:
            status = _status(failed.proc.returncode)
            others = [w for w in workers if w is not failed]
            if status in _COORDINATED:
                _stop(others, failure_grace_s, wait_first_s=coordinated_grace_s)
            else:
                running = any(w.proc.poll() is None for w in others)
                _stop(others, failure_grace_s)
                output.write(f"looptrain: rank {failed.rank} failed with exit status {status}"
                             f"{'; stopped the other workers' if running else ''}\n", sys.stderr)
    except KeyboardInterrupt:  # the second Ctrl-C: abort now
        output.write("looptrain: aborting: the workers are stopped without a checkpoint\n", sys.stderr)
        for w in workers:
            _signal_group(w.proc, signal.SIGKILL)
        for w in workers:
            w.proc.wait()
        return 130
    finally:
        _restore_signals(forwarded)
        for w in workers:
            w.reader.join(timeout=5)
    return 0 if failed is None else _status(failed.proc.returncode)


def _forward_signals(workers: Sequence[_Worker]) -> dict[int, object]:
    """Pass SIGTERM/SIGUSR2 and the first Ctrl-C on to every worker: each rank's checkpoint logic
    sees them; a second Ctrl-C raises KeyboardInterrupt here."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    interrupts = 0

    def forward(signum, _frame):
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt
        for w in workers:
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        previous[sig] = signal.signal(sig, forward)
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def check_nproc(nproc: int) -> None:
    """`--nproc` counts processes: 0 or a negative count is a typo, not "one process"."""
    from looptrain.config.schema import RecipeError

    if nproc < 1:
        raise RecipeError(f"--nproc {nproc}: must be an integer >= 1 (local worker processes); "
                          "omit it to train in this process")


def launch_local(argv: list[str], nproc: int) -> int:
    """`python -m looptrain.cli *argv` as `nproc` local ranks (argv without --nproc)."""
    if "--nproc" in argv or any(a.startswith("--nproc=") for a in argv):
        raise ValueError("launch_local: argv must not contain --nproc (the workers would launch workers)")
    return launch_workers([sys.executable, "-m", "looptrain.cli", *argv], nproc)
