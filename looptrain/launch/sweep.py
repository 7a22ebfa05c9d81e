"""Sweeps: one YAML file -> many runs -> one Slurm job array.

    name: paper-44m                 # the sweep's name: its directory, and tracking.group of every run
    base: ../recipes/x.yaml         # the recipe every run starts from (paths relative to this file)
    cluster: ../slurm/local.yaml    # the cluster profile (`--cluster` on the command line wins)
    out_dir: runs/sweeps            # the sweep directory is out_dir/name (default: runs)
    array_parallelism: 4            # at most this many runs at once
    overrides: [train.steps=1000]   # applied to every run
    runs:                           # named variants ...
      - {name: rmsnorm, overrides: [model.readout=rmsnorm]}
      - {name: raw, recipe: ../recipes/y.yaml}   # a run may start from its own recipe
    grid:                           # ... times every combination of these values
      train.seed: [0, 1, 2]

Each (run, grid point) becomes one run named `<run>-<key><value>...` (e.g.
`raw-seed1`) in `<sweep_dir>/<run name>`, with `tracking.group` = the sweep
name and `tracking.name` = the run name. Overrides apply in this order:
sweep, run, grid, command line. Every run's recipe is loaded and validated
before anything is submitted.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from looptrain.config import Recipe, RecipeError, load_recipe
from looptrain.config.loader import read_yaml_mapping
from looptrain.launch import records
from looptrain.launch.profile import ClusterProfile, LaunchError, load_profile

SWEEP_KEYS = ("name", "base", "cluster", "out_dir", "array_parallelism", "overrides", "runs", "grid")
RUN_KEYS = ("name", "recipe", "overrides")
_NAME_OK = re.compile(r"[^A-Za-z0-9._+-]+")
_SWEEP_SET = ("name=", "out_dir=", "tracking.group=", "tracking.name=")  # overrides every run gets from the sweep


@dataclass
class SweepRun:
    name: str
    recipe_path: str
    overrides: list[str]  # everything applied to recipe_path, in order (run dir and tracking included)
    recipe: Recipe


@dataclass
class Sweep:
    name: str
    path: str
    sweep_dir: Path
    runs: list[SweepRun]
    array_parallelism: Optional[int]
    cluster: Optional[str]  # the profile named in the file (absolute), if any


def _unknown(key: str, valid: tuple[str, ...], where: str) -> LaunchError:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return LaunchError(f"{where}: unknown sweep key {key!r}{hint} (valid keys: {', '.join(valid)})")


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LaunchError(f"{where}: expected a list of KEY=VALUE strings, got {value!r}")
    return list(value)


def _relative_to(path: str, sweep_file: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(os.path.dirname(sweep_file), path))


def _format_value(value: Any) -> str:
    """A grid value as it appears in an override (YAML scalar syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _name_part(key: str, value: Any) -> str:
    return _NAME_OK.sub("_", f"{key.split('.')[-1]}{_format_value(value)}")


def grid_points(grid: dict[str, list[Any]]) -> list[list[tuple[str, Any]]]:
    """Every combination of the grid's values, in the order the keys are written."""
    if not grid:
        return [[]]
    keys = list(grid)
    return [list(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def load_sweep(path: str, cli_overrides: list[str] = (), *, workdir: Optional[str] = None) -> Sweep:
    """Read, expand and validate a sweep file; every run's recipe is loaded and checked."""
    workdir = workdir or os.getcwd()
    data = read_yaml_mapping(path, kind="sweep file", error=LaunchError,
                             missing_hint="check the path (examples live under slurm/sweeps/)")
    for key in data:
        if key not in SWEEP_KEYS:
            raise _unknown(key, SWEEP_KEYS, path)

    name = data.get("name")
    if not isinstance(name, str) or not name or _NAME_OK.search(name):
        raise LaunchError(
            f"{path}: name: the sweep needs a name of letters, digits and ._+- (it names its directory), got {name!r}"
        )
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise LaunchError(f"{path}: base: expected a recipe path, got {base!r}")
    cluster = data.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise LaunchError(f"{path}: cluster: expected a cluster profile path, got {cluster!r}")
    parallelism = data.get("array_parallelism")
    if parallelism is not None and (type(parallelism) is not int or parallelism < 1):
        raise LaunchError(f"{path}: array_parallelism: expected an int >= 1, got {parallelism!r}")
    out_dir = data.get("out_dir", "runs")
    if not isinstance(out_dir, str) or not out_dir:
        raise LaunchError(f"{path}: out_dir: expected a directory path, got {out_dir!r}")
    common = _str_list(data.get("overrides"), f"{path}: overrides")

    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise LaunchError(f"{path}: grid: expected a mapping of dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise LaunchError(f"{path}: grid.{key}: expected a non-empty list of values, got {values!r}")

    variants = data.get("runs")
    if variants is None:
        variants = [{}]
    if not isinstance(variants, list) or not variants:
        raise LaunchError(f"{path}: runs: expected a non-empty list of {{name, overrides, recipe}} entries")
    if not data.get("runs") and not grid:
        raise LaunchError(f"{path}: a sweep needs `runs:`, `grid:` or both")

    sweep_dir = Path(workdir) / out_dir / name
    runs: list[SweepRun] = []
    seen: dict[str, int] = {}
    for i, variant in enumerate(variants):
        where = f"{path}: runs[{i}]"
        if not isinstance(variant, dict):
            raise LaunchError(f"{where}: expected a mapping with name, overrides (and recipe), got {variant!r}")
        for key in variant:
            if key not in RUN_KEYS:
                raise _unknown(key, RUN_KEYS, where)
        recipe = variant.get("recipe", base)
        if not isinstance(recipe, str):
            raise LaunchError(f"{where}: no recipe: set `base:` for the sweep or `recipe:` for this run")
        recipe_path = _relative_to(recipe, path)
        variant_name = variant.get("name")
        if data.get("runs") is not None and (
            not isinstance(variant_name, str) or not variant_name or _NAME_OK.search(variant_name)
        ):
            raise LaunchError(
                f"{where}: name: every run needs a name of letters, digits and ._+-, got {variant_name!r}"
            )
        variant_overrides = _str_list(variant.get("overrides"), f"{where}.overrides")
        for point in grid_points(grid):
            parts = ([variant_name] if variant_name else []) + [_name_part(k, v) for k, v in point]
            run_name = "-".join(parts)
            if run_name in seen:
                raise LaunchError(f"{path}: two runs are both named {run_name!r}; give the runs distinct names")
            seen[run_name] = i
            overrides = [
                *common,
                *variant_overrides,
                *(f"{k}={_format_value(v)}" for k, v in point),
                *cli_overrides,
                # JSON strings are YAML strings: a name like 1e-3 stays a string.
                f"name={json.dumps(run_name)}",
                f"out_dir={json.dumps(str(sweep_dir))}",
                f"tracking.group={json.dumps(name)}",
                f"tracking.name={json.dumps(run_name)}",
            ]
            try:
                loaded = load_recipe(recipe_path, overrides)
            except RecipeError as err:
                raise LaunchError(f"{path}: run {run_name}: {err}") from None
            runs.append(SweepRun(run_name, recipe_path, overrides, loaded))
    return Sweep(
        name=name,
        path=os.path.abspath(path),
        sweep_dir=sweep_dir,
        runs=runs,
        array_parallelism=parallelism,
        cluster=_relative_to(cluster, path) if cluster else None,
    )


def sweep_profile(sweep: Sweep, cli_cluster: Optional[str]) -> ClusterProfile:
    """The command line's --cluster, else the sweep file's `cluster:`."""
    chosen = cli_cluster or sweep.cluster
    if not chosen:
        raise LaunchError(f"{sweep.path}: no cluster profile: pass --cluster slurm/<profile>.yaml or set `cluster:`")
    return load_profile(chosen)


# ------------------------------------------------------------------ submit


def _job_name(sweep: Sweep) -> str:
    return f"looptrain-sweep-{sweep.name}"


def sweep_parameters(sweep: Sweep, profile: ClusterProfile) -> dict[str, Any]:
    from looptrain.launch.slurm import submitit_parameters

    return submitit_parameters(profile, job_name=_job_name(sweep), array_parallelism=sweep.array_parallelism)


def dry_run_text(sweep: Sweep, profile: ClusterProfile) -> str:
    from looptrain.launch.slurm import preview_sbatch

    folder = records.slurm_dir(sweep.sweep_dir)
    lines = [
        "# looptrain sweep --dry-run: nothing was submitted",
        f"# sweep {sweep.name}: {len(sweep.runs)} runs as one job array, "
        f"{profile.nodes} node(s) x {profile.ranks_per_node} rank(s) each",
        f"# sweep directory: {sweep.sweep_dir}",
        "# ---- sbatch script submitit would submit",
        preview_sbatch(folder, sweep_parameters(sweep, profile), array_size=len(sweep.runs)).rstrip(),
        "# ---- runs",
    ]
    for i, run in enumerate(sweep.runs):
        shown = [o for o in run.overrides if not o.startswith(_SWEEP_SET)]
        lines.append(f"[{i}] {run.name}  recipe={run.recipe_path}  {' '.join(shown)}")
    return "\n".join(lines)


def submit_sweep(sweep: Sweep, profile: ClusterProfile, *, workdir: Optional[str] = None) -> dict[str, Any]:
    """Submit every run as one job array; write and return sweep.json."""
    from looptrain.launch.job import SlurmTrainJob
    from looptrain.launch.slurm import make_executor, now_iso, refuse_if_active

    workdir = workdir or os.getcwd()
    sweep_file = sweep.sweep_dir / records.SWEEP_FILE
    previous = records.read_json(sweep_file)
    if previous and previous.get("array_job_id"):
        refuse_if_active({"job_id": previous["array_job_id"]}, str(sweep.sweep_dir))
    folder = records.slurm_dir(sweep.sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(folder, profile, sweep_parameters(sweep, profile))
    jobs = []
    with executor.batch():
        for run in sweep.runs:
            callable_ = SlurmTrainJob(
                run.recipe, workdir=workdir, max_requeues=profile.max_requeues, signal_delay_s=profile.signal_delay_s,
            )
            jobs.append(executor.submit(callable_))
    world = profile.nodes * profile.ranks_per_node
    array_id = jobs[0].job_id.split("_")[0]
    record = {
        "kind": "sweep",
        "name": sweep.name,
        "sweep_file": sweep.path,
        "sweep_dir": str(sweep.sweep_dir),
        "array_job_id": array_id,
        "workdir": workdir,
        "log_dir": str(folder),
        "world_size": world,
        "submitted_at": now_iso(),
        "profile_path": profile.source,
        "profile": profile.to_dict(),
        "runs": [
            {
                "name": run.name,
                "job_id": job.job_id,
                "run_dir": str(Path(workdir) / run.recipe.run_dir),
                "recipe_path": run.recipe_path,
                "overrides": run.overrides,
                "steps": run.recipe.train.steps,
                "logs": [[str(o), str(e)] for o, e in records.rank_log_paths(folder, job.job_id, world)],
            }
            for run, job in zip(sweep.runs, jobs)
        ],
    }
    records.write_json(sweep_file, record)
    return record
