"""Launching runs: local worker processes (`looptrain train --nproc N`) and Slurm through submitit.

Slurm: `looptrain launch RECIPE --cluster slurm/<profile>.yaml` submits one
run, `looptrain sweep SWEEP.yaml` a job array of runs, `looptrain status DIR`
and `looptrain cancel DIR` follow and stop them. Nothing heavy is imported
here: the CLI registers these commands on every start.

    profile.py  cluster profiles (slurm/*.yaml), strictly checked
    slurm.py    submission through submitit, dry runs, cancel
    job.py      what runs in each Slurm task: rendezvous, requeue on checkpoint
    sweep.py    sweep files -> runs -> one job array
    sbatch.py   a plain sbatch script for users without submitit
    status.py   the state and progress of each run
    records.py  launch.json, sweep.json, attempts.jsonl: what the launcher leaves in run directories
    local.py    N local worker processes of one job
"""

from looptrain.launch.profile import ClusterProfile, LaunchError, load_profile, profile_from_dict

__all__ = ["ClusterProfile", "LaunchError", "load_profile", "profile_from_dict"]
