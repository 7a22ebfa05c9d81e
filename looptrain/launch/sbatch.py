"""A plain sbatch script for one run (`looptrain launch ... --emit-sbatch FILE`), for users without submitit.

It renders `sbatch.template.sh` (shipped inside the package, next to this
module, so that it works from a wheel): the #SBATCH flags come from the same
profile fields as the submitit launch; the job itself is `srun python -m
looptrain.cli train RECIPE OVERRIDES` with a requeue-on-checkpoint loop in
the batch shell (the template explains it).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from looptrain.launch import records
from looptrain.launch.profile import ClusterProfile, LaunchError
from looptrain.redact import redact_shell

TEMPLATE = Path(__file__).resolve().with_name("sbatch.template.sh")
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def sbatch_directives(profile: ClusterProfile, *, job_name: str, log_dir: str, workdir: str) -> list[str]:
    """#SBATCH lines for one run of this profile."""
    flags: dict[str, Any] = {
        "job-name": job_name,
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "nodes": profile.nodes,
        "ntasks-per-node": profile.ranks_per_node,
        "cpus-per-task": profile.cpus_per_task,
        "gpus-per-node": profile.gpus_per_node or None,
        "mem": _mem(profile.memory_per_node_gb()),
        "constraint": profile.constraint,
        "time": profile.time_limit_min,
        # B: the batch shell gets the warning and forwards it (see the template).
        "signal": f"B:USR2@{profile.signal_delay_s}",
        "requeue": True,
        "open-mode": "append",  # a requeued attempt adds to the logs instead of truncating them
        "output": os.path.join(log_dir, "%j_batch.out"),
        "error": os.path.join(log_dir, "%j_batch.err"),
        "chdir": workdir,
    }
    flags.update(profile.sbatch_extra)
    lines = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}")
    return lines


def _mem(gb: float | None) -> str | None:
    if gb is None:
        return None
    return f"{int(gb)}G" if float(gb).is_integer() else f"{int(gb * 1024)}M"


def render_sbatch(
    profile: ClusterProfile,
    *,
    recipe_path: str,
    overrides: list[str],
    run_name: str,
    run_dir: str,
    workdir: str,
    force_resume: bool = False,
    template: str | os.PathLike = TEMPLATE,
) -> str:
    """The filled-in template: every @@NAME@@ replaced, or an error naming the ones left."""
    log_dir = str(records.slurm_dir(run_dir))
    train_args = [os.path.abspath(recipe_path), *overrides] + (["--force-resume"] if force_resume else [])
    values = {
        "SBATCH_DIRECTIVES": "\n".join(
            sbatch_directives(profile, job_name=f"looptrain-{run_name}", log_dir=log_dir, workdir=workdir)
        ),
        "RUN_DIR": shlex.quote(run_dir),
        "WORKDIR": shlex.quote(workdir),
        "MAX_REQUEUES": str(profile.max_requeues),
        "SIGNAL_DELAY_S": str(profile.signal_delay_s),
        "SETUP": "\n".join(profile.setup) if profile.setup else "# (none)",
        "PYTHON": shlex.quote(sys.executable),
        "TRAIN_ARGS": " ".join(shlex.quote(a) for a in train_args),
    }
    text = Path(template).read_text()
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise LaunchError(f"{template}: unknown placeholders {', '.join(unknown)}")
    # No credential is written into the script: secret exports refer to the submitting environment.
    return redact_shell(_PLACEHOLDER.sub(lambda m: values[m.group(1)], text))


def write_sbatch(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path
