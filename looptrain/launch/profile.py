"""Cluster profiles: where and how a run is scheduled (slurm/*.yaml).

A profile is the cluster half of a launch; the recipe is the training half.
It is checked as strictly as a recipe, before anything is submitted: an
unknown key names the closest valid one, a missing partition says so, a
wrong type names the expected type. A typo such as `time_limit: 60` must not
silently become the cluster's default time limit.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from looptrain.config.loader import read_yaml_mapping
from looptrain.config.schema import RecipeError


class LaunchError(RecipeError):
    """Bad input to launch, sweep, status or cancel (reported like a recipe error, exit status 2)."""


@dataclass
class ClusterProfile:
    """One Slurm cluster's scheduling settings. `None` leaves a flag to the cluster's default."""

    partition: str  # --partition (required: there is no portable default queue)
    account: Optional[str] = None  # --account
    qos: Optional[str] = None  # --qos
    nodes: int = 1  # --nodes
    gpus_per_node: int = 0  # --gpus-per-node (0: not passed)
    tasks_per_node: Optional[int] = None  # --ntasks-per-node: one rank each; None = gpus_per_node or 1
    cpus_per_task: Optional[int] = None  # --cpus-per-task
    mem_gb: Optional[float] = None  # --mem per node
    mem_per_task_gb: Optional[float] = None  # --mem per node = this x tasks per node
    constraint: Optional[str] = None  # --constraint
    time_limit_min: int = 60  # --time
    setup: list[str] = field(default_factory=list)  # shell lines in the batch script before srun
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # more sbatch flags: {key: value}
    signal_delay_s: int = 120  # --signal=USR2@N: the checkpoint warning before the time limit
    max_requeues: int = 3  # requeues at the time limit (preemptions are not counted)
    source: Optional[str] = field(default=None, compare=False)  # the file it came from (not a key)

    @property
    def ranks_per_node(self) -> int:
        """Training processes per node: one per GPU, else tasks_per_node (default 1)."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def with_nodes(self, nodes: Optional[int]) -> "ClusterProfile":
        """This profile with another node count (`--nodes` on the command line)."""
        if nodes is None:
            return self
        changed = dataclasses.replace(self, nodes=nodes)
        return changed.validate()

    def memory_per_node_gb(self) -> Optional[float]:
        if self.mem_gb is not None:
            return self.mem_gb
        if self.mem_per_task_gb is not None:
            return self.mem_per_task_gb * self.ranks_per_node
        return None

    def validate(self) -> "ClusterProfile":
        where = f"{self.source}: " if self.source else ""

        def bad(key: str, why: str) -> None:
            raise LaunchError(f"{where}{key}: {why}")

        if not self.partition.strip():
            bad("partition", "must name a Slurm partition (`sinfo -s` lists them)")
        if self.nodes < 1:
            bad("nodes", f"must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            bad("gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            bad("tasks_per_node", f"must be >= 1 (or null), got {self.tasks_per_node}")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            bad(
                "tasks_per_node",
                f"{self.tasks_per_node} tasks on {self.gpus_per_node} GPUs per node: looptrain runs one rank per GPU; "
                f"set tasks_per_node: {self.gpus_per_node} or null",
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            bad("cpus_per_task", f"must be >= 1 (or null), got {self.cpus_per_task}")
        if self.mem_gb is not None and self.mem_per_task_gb is not None:
            bad("mem_per_task_gb", "give either mem_gb (per node) or mem_per_task_gb, not both")
        for key in ("mem_gb", "mem_per_task_gb"):
            value = getattr(self, key)
            if value is not None and value < 0:
                bad(key, f"must be >= 0 (or null), got {value}")
        if self.time_limit_min < 1:
            bad("time_limit_min", f"must be >= 1 minute, got {self.time_limit_min}")
        if self.signal_delay_s < 0:
            bad("signal_delay_s", f"must be >= 0, got {self.signal_delay_s}")
        if self.signal_delay_s >= self.time_limit_min * 60:
            bad(
                "signal_delay_s",
                f"the checkpoint warning ({self.signal_delay_s} s before the limit) would come before the job "
                f"starts: raise time_limit_min ({self.time_limit_min}) or lower signal_delay_s",
            )
        if self.max_requeues < 0:
            bad("max_requeues", f"must be >= 0, got {self.max_requeues}")
        for key in self.sbatch_extra:
            if not isinstance(key, str) or not key or key.startswith("-"):
                bad("sbatch_extra", f"flag names are written without dashes, like `mail-type: END`; got {key!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


_KEYS = [f.name for f in dataclasses.fields(ClusterProfile) if f.name != "source"]
_REQUIRED = [
    f.name for f in dataclasses.fields(ClusterProfile)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + " (or null)"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp: Any, where: str) -> Any:
    def wrong() -> LaunchError:
        return LaunchError(f"{where}{key}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _convert(key, value, inner, where)
        except LaunchError:
            raise wrong() from None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong()
        return list(value)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise wrong()
        return dict(value)
    raise LaunchError(f"{where}{key}: unsupported profile type {tp!r}")


def profile_from_dict(data: dict[str, Any], source: Optional[str] = None) -> ClusterProfile:
    """Check every key and type of a profile mapping; return the validated profile."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise LaunchError(f"{where}a cluster profile must be a YAML mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(ClusterProfile)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LaunchError(f"{where}unknown profile key {key!r}{hint} (valid keys: {', '.join(_KEYS)})")
        kwargs[key] = _convert(key, value, hints[key], where)
    missing = [key for key in _REQUIRED if kwargs.get(key) is None]
    if missing:
        raise LaunchError(
            f"{where}missing required key {missing[0]!r}: a profile must name the Slurm partition to submit to, "
            f"e.g. `partition: gpu` (`sinfo -s` lists them)"
        )
    return ClusterProfile(**kwargs, source=source).validate()


def load_profile(path: str | os.PathLike) -> ClusterProfile:
    """Read and check a cluster profile file (see slurm/local.yaml)."""
    path = str(path)
    data = read_yaml_mapping(path, kind="cluster profile", error=LaunchError,
                             missing_hint="profiles live under slurm/ (e.g. slurm/local.yaml)")
    return profile_from_dict(data, source=path)
