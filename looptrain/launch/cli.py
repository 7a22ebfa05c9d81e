"""Command-line glue for `looptrain launch`, `sweep`, `status` and `cancel`.

Imports stay inside the commands: `looptrain --help` registers these on
every start and must not pay for submitit or torch.
"""

from __future__ import annotations

import argparse
import os

from looptrain import exit_codes


def allow_overrides_after_options(parser: argparse.ArgumentParser) -> None:
    """Let `launch RECIPE --cluster X --dry-run key=value` work: overrides may follow the options.

    Plain argparse consumes both positionals (recipe, overrides) at the first
    positional and then rejects the trailing overrides. Intermixed parsing
    collects positionals from anywhere; the top-level parser reaches a
    sub-command through `parse_known_args`, so that is where it is switched on
    (the intermixed parser calls `parse_known_args` itself, hence the guard).
    """
    plain = parser.parse_known_args
    inside = False

    def parse_known_args(args=None, namespace=None):
        nonlocal inside
        if inside:
            return plain(args, namespace)
        inside = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            inside = False

    parser.parse_known_args = parse_known_args


# -------------------------------------------------------------------- launch


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    parser.add_argument("--cluster", required=True, metavar="PROFILE",
                        help="cluster profile YAML (see slurm/local.yaml, slurm/gpu-cluster.example.yaml)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes for this run (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and the resolved recipe; submit nothing")
    parser.add_argument("--emit-sbatch", metavar="FILE", default=None,
                        help="write a plain sbatch script (no submitit) to FILE instead of submitting")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume a run that the norm monitor halted (HALTED.json)")
    allow_overrides_after_options(parser)


def run_launch(args) -> int:
    from looptrain.config import load_recipe
    from looptrain.launch.profile import load_profile
    from looptrain.launch.slurm import LaunchPlan

    # Both halves are checked before anything is written or submitted.
    profile = load_profile(args.cluster).with_nodes(args.nodes)
    recipe = load_recipe(args.recipe, args.overrides)
    plan = LaunchPlan(recipe, profile, args.recipe, list(args.overrides), os.getcwd(), args.force_resume).check()
    if args.emit_sbatch:
        from looptrain.launch.sbatch import render_sbatch, write_sbatch

        text = render_sbatch(
            profile, recipe_path=args.recipe, overrides=list(args.overrides), run_name=recipe.name,
            run_dir=str(plan.run_dir), workdir=plan.workdir, force_resume=args.force_resume,
        )
        path = write_sbatch(args.emit_sbatch, text)
        plan.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create its log directory
        print(f"wrote {path}: submit it with `sbatch {path}` (logs go to {plan.log_dir})")
        return exit_codes.OK
    if args.dry_run:
        print(plan.dry_run_text())
        return exit_codes.OK
    record = plan.submit()
    print(f"submitted job {record['job_id']}: {plan.describe()}")
    print(f"run directory: {record['run_dir']}")
    print(f"rank logs: {record['log_dir']}/{record['job_id']}_<rank>_log.{{out,err}}")
    for i, (out, err) in enumerate(record["logs"][:4]):
        print(f"  rank {i}: {out}")
    print(f"follow it with `looptrain status {record['run_dir']}`; stop it with `looptrain cancel {record['run_dir']}`")
    return exit_codes.OK


# --------------------------------------------------------------------- sweep


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML file (see slurm/sweeps/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides applied to every run")
    parser.add_argument("--cluster", default=None, metavar="PROFILE",
                        help="cluster profile YAML (default: the sweep file's `cluster:`)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes per run (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="print the job array and its runs; submit nothing")
    allow_overrides_after_options(parser)


def run_sweep(args) -> int:
    from looptrain.launch.profile import LaunchError
    from looptrain.launch.slurm import check_world
    from looptrain.launch.sweep import dry_run_text, load_sweep, submit_sweep, sweep_profile

    sweep = load_sweep(args.sweep, list(args.overrides))
    profile = sweep_profile(sweep, args.cluster).with_nodes(args.nodes)
    for run in sweep.runs:
        try:
            check_world(run.recipe, profile)
        except LaunchError as err:
            raise LaunchError(f"{args.sweep}: run {run.name}: {err}") from None
    if args.dry_run:
        print(dry_run_text(sweep, profile))
        return exit_codes.OK
    record = submit_sweep(sweep, profile)
    print(f"submitted job array {record['array_job_id']}: sweep {sweep.name}, {len(record['runs'])} runs")
    for run in record["runs"]:
        print(f"  {run['job_id']:<14} {run['name']:<32} {run['run_dir']}")
    print(f"sweep directory: {record['sweep_dir']} (logs in {record['log_dir']})")
    print(f"follow it with `looptrain status {record['sweep_dir']}`")
    return exit_codes.OK


# -------------------------------------------------------------------- status


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a run directory made by `looptrain launch` or a sweep directory")


def run_status(args) -> int:
    from looptrain.launch.status import collect_status, format_status

    _kind, rows = collect_status(args.dir)
    print(format_status(rows))
    return exit_codes.OK


# -------------------------------------------------------------------- cancel


def add_cancel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a run directory made by `looptrain launch` or a sweep directory")


def run_cancel(args) -> int:
    from looptrain.launch.slurm import cancel_directory

    job_ids, complaint = cancel_directory(args.dir)
    print(f"cancelled job(s) {' '.join(job_ids)}" + (f" (scancel: {complaint})" if complaint else ""))
    return exit_codes.OK
