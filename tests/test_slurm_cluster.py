"""The local Slurm test cluster really schedules multi-node work and records it.

These tests guard the ground the Slurm launcher stands on: if srun cannot span both
emulated nodes, or submitit cannot get a result and a sacct record back, every
launcher test above them would fail for the wrong reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_srun_spreads_two_tasks_over_both_nodes(slurm_cluster):
    out = slurm_cluster.run(
        "srun", "-N2", "-n2", "--time=1", "bash", "-c", 'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_NTASKS"'
    ).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 n1 2", "1 n2 2"], out


def _node_report():
    """Built here so that cloudpickle ships it by value: the job's Python cannot
    import this test module by name."""

    def report(x: int) -> tuple[int, str, str]:
        return x * x, os.environ["SLURMD_NODENAME"], os.environ["SLURM_JOB_PARTITION"]

    return report


@pytest.mark.slow
def test_submitit_job_returns_its_result_and_sacct_records_it(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    # submitit asks for USR2 90 s before the limit, and Slurm may send it up to ~60 s
    # earlier still: a 2-minute limit can see USR2 right at start. 5 minutes cannot.
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=5, nodes=1, tasks_per_node=1)
    job = executor.submit(_node_report(), 7)

    deadline = time.monotonic() + 60
    while not job.done():
        assert time.monotonic() < deadline, f"job {job.job_id} not done after 60 s: {job.state}"
        time.sleep(0.5)

    value, node, partition = job.result()
    assert value == 49
    assert node in slurm_cluster.nodes
    assert partition == slurm_cluster.partition
    slurm_cluster.wait_for_job_state(job.job_id, "COMPLETED")
    account = slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "Account", "-j", job.job_id).stdout.strip()
    assert account == slurm_cluster.account


def _profile(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "slurm" / name).read_text())


def test_cluster_profiles_share_keys_and_leave_room_for_the_warning_signal():
    local, gpu = _profile("local.yaml"), _profile("gpu-cluster.example.yaml")
    assert set(local) == set(gpu)
    for profile in (local, gpu):
        # Slurm may send the signal up to ~60 s before the requested time.
        assert profile["time_limit_min"] * 60 > profile["signal_delay_s"] + 60


@pytest.mark.slow
def test_local_profile_is_accepted_by_the_local_cluster(slurm_cluster):
    profile = _profile("local.yaml")
    flags = [
        f"--partition={profile['partition']}",
        f"--nodes={profile['nodes']}",
        f"--ntasks-per-node={profile['tasks_per_node']}",
        f"--cpus-per-task={profile['cpus_per_task']}",
        f"--time={profile['time_limit_min']}",
        f"--signal=USR2@{profile['signal_delay_s']}",
    ]
    accepted = slurm_cluster.run("sbatch", "--test-only", f"--account={profile['account']}", *flags, "--wrap=true")
    assert "to start at" in accepted.stderr
    # Associations are enforced, so the check above can fail: an unknown account is refused.
    refused = slurm_cluster.run("sbatch", "--test-only", "--account=no-such-account", *flags, "--wrap=true", check=False)
    assert refused.returncode != 0 and "account" in refused.stderr.lower()
