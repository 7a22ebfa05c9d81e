"""W&B: choosing the mode, starting the run, alerts, per-loop charts.

Everything that imports `wandb` lives here and is only reached on rank 0
with a mode other than `disabled`, so other ranks and disabled runs never
import it.
"""

from __future__ import annotations

import netrc
import os
from typing import Any, Optional
from urllib.parse import urlparse

from looptrain.config.schema import RecipeError, TrackingConfig
from looptrain.redact import redact

# Metric families drawn as one chart with one line per loop.
PER_LOOP_FAMILIES = ("norm/mean", "norm/rms", "norm/p99", "norm/max", "norm/ratio", "train/loss_exit", "val/loss")
MAX_CHART_POINTS = 1000  # per line; longer histories are thinned evenly
STEP_KEY = "step"

# W&B directory variables this process set itself (a later run may move them;
# values the user exported are kept).
_dirs_we_set: dict[str, str] = {}


def api_key_configured() -> bool:
    """Whether W&B could log in: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    return False


def resolve_mode(mode: str) -> tuple[str, Optional[str]]:
    """The W&B mode to run in, and a one-line note to print (or None).

    auto: WANDB_MODE when the environment sets it, else online when an API key
    is configured, else offline (saying so once).
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise RecipeError(f"tracking.mode: unknown mode {mode!r}; use auto, online, offline or disabled")
    note = None
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode in ("online", "offline", "disabled"):
            mode = env_mode
        elif env_mode == "dryrun":
            mode = "offline"
        elif api_key_configured():
            mode = "online"
        else:
            mode = "offline"
            note = (
                "W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline into the run directory "
                "(upload later with `wandb sync RUN_DIR/wandb/offline-run-*`, or set tracking.mode=disabled)"
            )
    if mode == "online" and not api_key_configured():
        raise RecipeError(
            "tracking.mode=online needs a W&B API key: export WANDB_API_KEY or run `wandb login`; "
            "or use tracking.mode=offline (sync later) or tracking.mode=auto"
        )
    return mode, note


def point_wandb_dirs(run_dir: str) -> None:
    """Keep W&B's files (run data, cache, config, staging) in the run directory
    unless the environment chose other places: shared home directories on
    clusters are small, and tests must not write outside their tmp dir."""
    base = os.path.join(os.path.abspath(run_dir), "wandb")
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        current = os.environ.get(var)
        if current is None or current == _dirs_we_set.get(var):
            os.environ[var] = _dirs_we_set[var] = os.path.join(base, sub)
    os.environ["WANDB_DIR"] = os.path.abspath(run_dir)  # wandb adds the "wandb" folder itself


class WandbRun:
    """A started W&B run with the calls the tracker needs."""

    def __init__(
        self,
        cfg: TrackingConfig,
        mode: str,
        run_dir: str,
        config_dict: dict[str, Any],
        resume_id: Optional[str],
    ):
        point_wandb_dirs(run_dir)
        import wandb

        self._wandb = wandb
        name = cfg.name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
        kwargs: dict[str, Any] = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=name,
            tags=list(cfg.tags) or None,
            config=redact(config_dict),  # W&B stores the config in the run directory and its servers
            dir=os.path.abspath(run_dir),
            mode=mode,
        )
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        # Our own step as the x-axis of every chart: a resumed run re-logs the
        # steps after its last checkpoint, which W&B's internal monotonic step
        # would drop.
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        self.run.define_metric("val/loss/*", step_metric=STEP_KEY, summary="min")

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, STEP_KEY: step})

    def alert(self, title: str, text: str, level: str) -> None:
        levels = {"INFO": self._wandb.AlertLevel.INFO, "WARN": self._wandb.AlertLevel.WARN}
        self.run.alert(title=title, text=text, level=levels.get(level, self._wandb.AlertLevel.ERROR))

    def log_per_loop_charts(self, step: int, records: list[dict[str, Any]]) -> list[str]:
        """One chart per metric family with one line per loop, from the run's
        metrics history; returns the keys logged (`per_loop/<family>`)."""
        from looptrain.tracking.metrics_file import per_loop_series

        charts: dict[str, Any] = {}
        for family in PER_LOOP_FAMILIES:
            series = per_loop_series(records, family)
            if not series:
                continue
            xs, ys, keys = [], [], []
            for k, (steps, values) in series.items():
                stride = max(1, -(-len(steps) // MAX_CHART_POINTS))
                xs.append(steps[::stride])
                ys.append(values[::stride])
                keys.append(f"loop {k}")
            key = "per_loop/" + family.replace("/", "_")
            charts[key] = self._wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"{family} per loop", xname=STEP_KEY
            )
        if charts:
            self.run.log({**charts, STEP_KEY: step})
        return list(charts)

    def abandon(self) -> None:
        """Give up on a broken W&B (its service is gone): close what can be closed, quietly, so
        that W&B's exit hook does not print a traceback about the lost connection at exit."""
        try:
            self._wandb.teardown()
        except (Exception, SystemExit):  # noqa: BLE001 - the connection is already broken
            pass

    def mark_halted(self, rule: str, message: str, step: int) -> None:
        """A `halted` tag and the rule in the summary: a halt is told apart from a crash at a glance."""
        self.run.tags = tuple(t for t in (self.run.tags or ()) if t != "halted") + ("halted",)
        self.run.summary.update({"halt/rule": rule, "halt/message": message, "halt/step": step})

    def take_stop_tag(self) -> bool:
        """Whether someone tagged this run `stop` in the W&B UI (read from the server); the tag is removed."""
        from looptrain.tracking.tracker import STOP_TAG

        api = self._wandb.Api(timeout=10)
        remote = api.run(f"{self.run.entity}/{self.run.project}/{self.run.id}")
        if STOP_TAG not in remote.tags:
            return False
        remote.tags = [t for t in remote.tags if t != STOP_TAG]
        remote.update()
        return True

    def finish(self, exit_code: int, outcome: Optional[str] = None) -> None:
        from looptrain.exit_codes import CANCELLED, OUTCOMES, PREEMPTED

        self.run.summary["exit_code"] = exit_code
        self.run.summary["outcome"] = outcome or OUTCOMES.get(exit_code, "failed")
        # A run stopped on purpose (cancelled, or checkpointed for a requeue) has not failed.
        self.run.finish(exit_code=0 if exit_code in (CANCELLED, PREEMPTED) else exit_code)
        # finish() can return before W&B's writer process has flushed the run
        # file (seen with offline runs in wandb 0.31); shutting the writer down
        # guarantees that everything is on disk before the process exits or a
        # requeued job resumes the run.
        self._wandb.teardown()
