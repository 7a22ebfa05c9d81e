"""A real two-node Slurm cluster for tests, started once per test session.

Launch code is only worth what it does against real Slurm: sbatch flags, srun across
nodes, submitit's sacct-driven job states, signals and requeue. So the Slurm tests
run against the local cluster of `tools/slurm_cluster.sh` (two emulated nodes n1, n2
on 127.0.0.1, with accounting) rather than against mocks.

The cluster needs root and Debian's slurm/munge/mariadb packages. Without them the
Slurm tests are skipped with the reason; with LOOPTRAIN_REQUIRE_SLURM=1 (CI) they
fail instead, so a broken set-up cannot pass silently. A cluster that is already up
in the same state directory is reused and left running; one started here is stopped
when the session ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_TOOL = REPO_ROOT / "tools" / "slurm_cluster.sh"
REQUIRE_ENV = "LOOPTRAIN_REQUIRE_SLURM"
STATE_DIR_ENV = "LOOPTRAIN_SLURM_STATE_DIR"
DEFAULT_STATE_DIR = Path("/tmp/looptrain-slurm")
REQUIRED_PROGRAMS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun", "sacct")


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running test cluster; everything a Slurm test needs to reach it."""

    state_dir: Path
    conf_path: Path
    env: dict[str, str]  # to merge into a subprocess environment (SLURM_CONF)
    nodes: tuple[str, ...] = ("n1", "n2")
    partition: str = "debug"  # default partition, both nodes
    preempting_partition: str = "urgent"  # its jobs requeue jobs of `partition`
    account: str = "looptrain"  # root's default account (associations are enforced)
    cpus_per_node: int = 2
    mem_per_node_mb: int = 4000
    started_here: bool = field(default=False, compare=False)

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (srun, sbatch, sacct, scontrol...) against this cluster."""
        return subprocess.run(
            command,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def job_state(self, job_id: str) -> str:
        """The accounting database's state of a job (what submitit sees), '' if not recorded yet."""
        out = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)).stdout.split()
        return out[0] if out else ""

    def wait_for_job_state(self, job_id: str, wanted: str, timeout_s: float = 120) -> None:
        """Wait until sacct reports `wanted` (e.g. COMPLETED) for a job.

        slurmctld forwards job records to slurmdbd asynchronously: sacct can still say
        PENDING for a second or two after the job's result file exists, and the job's
        processes are still exiting (interpreter and process-group teardown), which on
        a loaded 2-core machine can take tens of seconds. The limit only bounds a hang.
        """
        deadline = time.monotonic() + timeout_s
        state = self.job_state(job_id)
        while not state.startswith(wanted):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: sacct says {state or 'nothing'}, expected {wanted} within {timeout_s} s")
            time.sleep(0.25)
            state = self.job_state(job_id)


def _unavailable_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the local Slurm cluster needs root (its daemons run as root and munge)"
    missing = [program for program in REQUIRED_PROGRAMS if shutil.which(program, path=_sbin_path()) is None]
    if missing:
        return f"Slurm packages missing ({', '.join(missing)}): run `{CLUSTER_TOOL.relative_to(REPO_ROOT)} install`"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def _tool(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_TOOL), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _read_node_shape(env: dict[str, str]) -> tuple[int, int]:
    """CPUs and memory (MB) of one node as Slurm reports them."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%c %m"], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start (or reuse) the local two-node Slurm cluster; set SLURM_CONF for the session.

    SLURM_CONF goes into os.environ too, because submitit runs sbatch/sacct/scancel
    as subprocesses of the test process.
    """
    reason = _unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)

    state_dir = Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))
    started_here = _tool("status", str(state_dir), timeout=60).returncode != 0
    if started_here:
        started = _tool("start", str(state_dir), timeout=180)
        if started.returncode != 0:
            pytest.fail(f"could not start the local Slurm cluster:\n{started.stderr[-3000:]}")
    conf_path = state_dir / "etc" / "slurm.conf"
    env = {"SLURM_CONF": str(conf_path)}
    cpus, mem_mb = _read_node_shape(env)
    cluster = SlurmCluster(
        state_dir=state_dir,
        conf_path=conf_path,
        env=env,
        cpus_per_node=cpus,
        mem_per_node_mb=mem_mb,
        started_here=started_here,
    )
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf_path)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started_here:
            stopped = _tool("stop", str(state_dir), timeout=120)
            if stopped.returncode != 0:
                raise RuntimeError(f"could not stop the local Slurm cluster:\n{stopped.stderr[-3000:]}")
