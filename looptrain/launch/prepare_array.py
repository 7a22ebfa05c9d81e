"""Prepare one corpus as a Slurm job array: `looptrain prepare ... --num-shards N --cluster PROFILE`.

Two batch scripts are written next to the output (`OUT.slurm/`): a job array
of N tasks, task i running `looptrain prepare ... --shard-index i --num-shards N`
with the CPUs Slurm gave it as workers, and a merge job that runs once the
whole array succeeded (`--dependency=afterok`) and joins the parts with
`looptrain prepare --merge`. `--cluster` submits both (`sbatch --parsable`);
`--emit-sbatch` only writes them. Scheduling flags come from the cluster
profile (partition, account, qos, time, CPUs, memory, constraint, setup
lines); GPUs are never requested.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from looptrain.data.errors import DataError
from looptrain.launch.profile import load_profile


def _directives(profile, *, job_name: str, log_dir: Path, array: str | None) -> list[str]:
    flags = {
        "job-name": job_name,
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "nodes": 1,
        "ntasks": 1,
        "cpus-per-task": profile.cpus_per_task,
        "mem": f"{int(profile.mem_gb)}G" if profile.mem_gb else None,
        "constraint": profile.constraint,
        "time": profile.time_limit_min,
        "array": array,
        "output": str(log_dir / ("%A_%a.out" if array else "%j_merge.out")),
    }
    return [f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in flags.items() if v is not None]


def render_scripts(profile, prepare_args: Sequence[str], out: str, num_shards: int, workdir: str) -> dict[str, str]:
    """{"array.sbatch": ..., "merge.sbatch": ...} for one corpus."""
    log_dir = Path(out).resolve().parent / f"{Path(out).name}.slurm"
    python = shlex.quote(sys.executable)
    setup = "\n".join(profile.setup) if profile.setup else "# (no setup lines in the profile)"
    common = " ".join(shlex.quote(a) for a in prepare_args)
    array = "\n".join([
        "#!/bin/bash",
        *_directives(profile, job_name="looptrain-prepare", log_dir=log_dir, array=f"0-{num_shards - 1}"),
        f"cd {shlex.quote(workdir)}",
        setup,
        f"exec {python} -m looptrain.cli prepare {common} --no-progress --num-shards {num_shards} "
        '--shard-index "$SLURM_ARRAY_TASK_ID" --workers "${SLURM_CPUS_PER_TASK:-1}"',
        "",
    ])
    merge = "\n".join([
        "#!/bin/bash",
        *_directives(profile, job_name="looptrain-prepare-merge", log_dir=log_dir, array=None),
        f"cd {shlex.quote(workdir)}",
        setup,
        f"exec {python} -m looptrain.cli prepare --merge --num-shards {num_shards} --out {shlex.quote(out)}",
        "",
    ])
    return {"array.sbatch": array, "merge.sbatch": merge}


def write_scripts(scripts: dict[str, str], out: str) -> Path:
    folder = Path(out).resolve().parent / f"{Path(out).name}.slurm"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
    return folder


def submit(folder: Path) -> tuple[str, str]:
    """sbatch the array, then the merge job depending on it; return both job ids."""
    def sbatch(*args: str) -> str:
        try:
            done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
        except FileNotFoundError as err:
            raise DataError("sbatch not found: submit from a Slurm login node, or use --emit-sbatch DIR") from err
        if done.returncode != 0:
            raise DataError(f"sbatch refused {args[-1]}: {done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.strip().split(";")[0]

    array_id = sbatch(str(folder / "array.sbatch"))
    merge_id = sbatch(f"--dependency=afterok:{array_id}", str(folder / "merge.sbatch"))
    return array_id, merge_id


def prepare_args_without_slurm(argv: Sequence[str]) -> list[str]:
    """The prepare arguments to repeat in every task: all but the Slurm and per-task ones."""
    drop_with_value = {"--cluster", "--emit-sbatch", "--shard-index", "--num-shards", "--workers"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop_with_value:
            skip = "=" not in arg
            continue
        if name == "--no-progress":
            continue
        out.append(arg)
    return out


def run(args, argv: Sequence[str]) -> int:

    if args.num_shards < 2:
        raise DataError("--cluster/--emit-sbatch prepare a corpus as a job array: give --num-shards N (N >= 2)")
    profile = load_profile(args.cluster)
    scripts = render_scripts(profile, prepare_args_without_slurm(argv), args.out, args.num_shards, os.getcwd())
    folder = write_scripts(scripts, args.out)
    if args.emit_sbatch:
        print(f"wrote {folder}/array.sbatch and merge.sbatch; submit: "
              f"id=$(sbatch --parsable {folder}/array.sbatch) && sbatch --dependency=afterok:$id {folder}/merge.sbatch")
        return 0
    array_id, merge_id = submit(folder)
    print(f"submitted array job {array_id} ({args.num_shards} tasks) and merge job {merge_id}; logs in {folder}")
    return 0


def run_prepare_command(args) -> int:
    """`looptrain prepare`: a job array with --cluster/--emit-sbatch, else one local preparation (data.cli)."""
    from looptrain import exit_codes
    from looptrain.config.schema import RecipeError
    from looptrain.data.cli import run_prepare

    if not args.cluster:
        return run_prepare(args)
    argv = sys.argv[sys.argv.index("prepare") + 1:] if "prepare" in sys.argv else []
    try:
        return run(args, argv)
    except (DataError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
