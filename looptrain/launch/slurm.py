"""Submitting runs to Slurm through submitit: one run (`looptrain launch`) or a job array (sweeps).

The profile becomes submitit's sbatch parameters; the job's callable is a
`SlurmTrainJob` (see `looptrain.launch.job`) that runs in every task. The
submitit folder, and with it every rank's log, lives in the run directory
(`<run_dir>/slurm/`), and `<run_dir>/launch.json` records what was
submitted and where its logs are.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from looptrain.config import Recipe, RecipeError, recipe_to_dict, recipe_to_yaml
from looptrain.redact import redact_shell
from looptrain.config.schema import check_world_size
from looptrain.launch import records
from looptrain.launch.profile import ClusterProfile, LaunchError

SRUN_ARGS = ("--kill-on-bad-exit=1",)
# A TCP port free on the batch host (the first node) for the ranks' rendezvous.
PICK_MASTER_PORT = (
    f"export LOOPTRAIN_MASTER_PORT=$({shlex.quote(sys.executable)} -c "
    "'import socket; s = socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])')"
)  # one rank's error ends the others instead of leaving them in a collective
ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SIGNALING", "SUSPENDED", "RESIZING", "STAGE_OUT", "PREEMPTED",
}


def submitit_parameters(
    profile: ClusterProfile, *, job_name: str, array_parallelism: Optional[int] = None
) -> dict[str, Any]:
    """The profile as `submitit.SlurmExecutor.update_parameters` keywords."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "partition": profile.partition,
        "time": profile.time_limit_min,
        "nodes": profile.nodes,
        "ntasks_per_node": profile.ranks_per_node,
        "signal_delay_s": profile.signal_delay_s,
        "srun_args": list(SRUN_ARGS),
        # --requeue: clusters with JobRequeue=0 refuse `scontrol requeue` otherwise.
        "additional_parameters": {"requeue": True, **profile.sbatch_extra},
    }
    optional = {
        "account": profile.account,
        "qos": profile.qos,
        "cpus_per_task": profile.cpus_per_task,
        "gpus_per_node": profile.gpus_per_node or None,
        "mem": profile.memory_per_node_gb(),
        "constraint": profile.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    # The batch script runs on the job's first node (MASTER_ADDR): it picks the rendezvous port there.
    setup = redact_shell("\n".join(profile.setup)).splitlines() if profile.setup else []  # no credential in the script
    params["setup"] = [*setup, PICK_MASTER_PORT]
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    return params


def _executor_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """submitit takes memory in GB and converts it; the preview converts it the same way."""
    params = dict(params)
    if "mem" in params:
        from submitit.slurm.slurm import _convert_mem

        params["mem"] = _convert_mem(params["mem"])
    return params


def make_executor(folder: str | os.PathLike, profile: ClusterProfile, params: dict[str, Any]):
    """A submitit SlurmExecutor writing into `folder` (needs `srun` on PATH: a Slurm login node)."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=profile.max_requeues)
    except RuntimeError as err:
        raise LaunchError(f"cannot submit to Slurm from here: {err} (srun/sbatch must be on PATH)") from None
    executor.update_parameters(**_executor_parameters(params))
    return executor


def preview_sbatch(folder: str | os.PathLike, params: dict[str, Any], *, array_size: Optional[int] = None) -> str:
    """The sbatch script submitit would write for these parameters (nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = _executor_parameters(params)
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array_size, **params)


# ------------------------------------------------------------------- records


def slurm_job_states(job_ids: Sequence[str]) -> Optional[dict[str, str]]:
    """{job id: state} from squeue for jobs that slurmctld still lists; None when squeue is unavailable."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T", "-j", ",".join(sorted({str(j) for j in job_ids}))],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # squeue refuses ids it no longer knows ("Invalid job id"): nothing is active.
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip()] = state.strip()
    return states


def refuse_if_active(record: Optional[dict[str, Any]], where: str) -> None:
    """Two jobs writing one run directory would corrupt it: refuse while an earlier job is queued or running."""
    if not record:
        return
    job_ids = [str(record["job_id"])] if record.get("job_id") else []
    states = slurm_job_states(job_ids) or {}
    for job_id in job_ids:
        for listed, state in states.items():
            if (listed == job_id or listed.startswith(job_id + "_")) and state in ACTIVE_STATES:
                raise LaunchError(
                    f"{where}: job {listed} of this directory is still {state}; wait for it, cancel it "
                    f"(`looptrain cancel {where}`), or choose another run name (name=...)"
                )


def check_world(recipe: Recipe, profile: ClusterProfile) -> None:
    """A multi-rank job needs a distributed backend and a batch that divides: fail before submitting, not after queueing."""
    world = profile.nodes * profile.ranks_per_node
    try:
        check_world_size(recipe, world, f"{profile.nodes} node(s) x {profile.ranks_per_node} rank(s)")
    except RecipeError as err:
        raise LaunchError(str(err)) from None


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class LaunchPlan:
    """Everything a launch needs, resolved and checked before anything is submitted."""

    recipe: Recipe
    profile: ClusterProfile
    recipe_path: str
    overrides: list[str]
    workdir: str
    force_resume: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.recipe.run_dir

    @property
    def log_dir(self) -> Path:
        return records.slurm_dir(self.run_dir)

    @property
    def world_size(self) -> int:
        return self.profile.nodes * self.profile.ranks_per_node

    def check(self) -> "LaunchPlan":
        check_world(self.recipe, self.profile)
        return self

    def parameters(self) -> dict[str, Any]:
        return submitit_parameters(self.profile, job_name=f"looptrain-{self.recipe.name}")

    def describe(self) -> str:
        p = self.profile
        return (
            f"run {self.recipe.name}: {p.nodes} node(s) x {p.ranks_per_node} rank(s) = world size {self.world_size}, "
            f"backend {self.recipe.parallel.backend}, {self.recipe.train.steps} steps, "
            f"partition {p.partition}, time limit {p.time_limit_min} min (USR2 {p.signal_delay_s} s before), "
            f"max {p.max_requeues} time-limit requeues"
        )

    def dry_run_text(self) -> str:
        return "\n".join([
            "# looptrain launch --dry-run: nothing was submitted",
            f"# {self.describe()}",
            f"# run directory: {self.run_dir}",
            "# ---- sbatch script submitit would submit",
            preview_sbatch(self.log_dir, self.parameters()).rstrip(),
            "# ---- resolved recipe",
            recipe_to_yaml(self.recipe).rstrip(),
        ])

    def job(self):
        from looptrain.launch.job import SlurmTrainJob

        return SlurmTrainJob(
            self.recipe, workdir=self.workdir, max_requeues=self.profile.max_requeues,
            signal_delay_s=self.profile.signal_delay_s, force_resume=self.force_resume,
        )

    def submit(self) -> dict[str, Any]:
        """Submit the job; write and return launch.json."""
        launch_file = self.run_dir / records.LAUNCH_FILE
        previous = records.read_json(launch_file)
        refuse_if_active(previous, str(self.run_dir))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        executor = make_executor(self.log_dir, self.profile, self.parameters())
        job = executor.submit(self.job())
        logs = records.rank_log_paths(self.log_dir, job.job_id, self.world_size)
        record = {
            "kind": "launch",
            "job_id": job.job_id,
            "previous_job_ids": ([*previous.get("previous_job_ids", []), previous["job_id"]]
                                 if previous and previous.get("job_id") else []),
            "run_name": self.recipe.name,
            "run_dir": str(self.run_dir),
            "workdir": self.workdir,
            "recipe_path": os.path.abspath(self.recipe_path),
            "overrides": list(self.overrides),
            "steps": self.recipe.train.steps,
            "nodes": self.profile.nodes,
            "tasks_per_node": self.profile.ranks_per_node,
            "world_size": self.world_size,
            "log_dir": str(self.log_dir),
            "logs": [[str(out), str(err)] for out, err in logs],
            "submitted_at": now_iso(),
            "profile_path": self.profile.source,
            "profile": self.profile.to_dict(),
            "recipe": recipe_to_dict(self.recipe),
        }
        records.write_json(launch_file, record)
        return record


# -------------------------------------------------------------------- cancel


def cancel_directory(directory: str | os.PathLike) -> tuple[list[str], str]:
    """Cancel the jobs of a launch or sweep directory: ([job ids asked], scancel's complaint or '').

    Each run is marked first (slurm/cancel.json), so that a run whose ranks
    answer scancel's SIGTERM with a checkpoint does not requeue itself.
    """
    from looptrain.launch.status import runs_of

    kind, runs, record = runs_of(directory)
    job_ids = [record["array_job_id"]] if kind == "sweep" else [runs[0].job_id]
    for run in runs:
        records.request_cancel(run.run_dir, [run.job_id, *job_ids])
    try:
        out = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise LaunchError(f"scancel failed: {err} (is this a Slurm login node?)") from None
    return job_ids, out.stderr.strip() if out.returncode != 0 else ""
