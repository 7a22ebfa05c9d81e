"""Tracking: metrics/events JSONL, console lines, W&B offline records, plots."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from looptrain.config.schema import RecipeError, TrackingConfig
from looptrain.monitor import MonitorEvent
from looptrain.tracking import Tracker, per_loop_series, read_metrics
from looptrain.tracking.console import format_lines
from looptrain.tracking.wandb_records import offline_run_files, read_records

WANDB_VARS = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_DATA_DIR",
    "WANDB_ARTIFACT_DIR",
    "WANDB_BASE_URL",
)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No W&B key, no network, nothing written outside tmp_path."""
    for var in WANDB_VARS:
        monkeypatch.setenv(var, "x")  # recorded so that teardown removes what the tracker sets
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _step_metrics(step: int, loops: int = 4) -> dict[str, float]:
    m = {
        "train/loss": 5.0 - step / 100,
        "train/ce": 5.0 - step / 100,
        "train/grad_norm": 0.8,
        "train/lr": 3e-4,
        "perf/tokens_per_s": 12345.0,
    }
    for k in range(1, loops + 1):
        m[f"train/loss_exit/{k}"] = 5.5 - 0.3 * k - step / 100
        m[f"norm/mean/{k}"] = 10.0 * k * (1 + step / 10)
        m[f"norm/rms/{k}"] = 0.5 * k * (1 + step / 10)
    return m


WARN_EVENT = MonitorEvent(30, "final_rms", "WARN", "alert", "final-loop RMS 150 above warn 100", {"rms": 150.0})
HALT_EVENT = MonitorEvent(31, "nonfinite", "ERROR", "halt", "train/loss=nan: diverged", {"train/loss": math.nan})
LOG_EVENT = MonitorEvent(30, "loop_ratio", "WARN", "log", "loop 3 ratio 5 above 4", {"ratio": 5.0})


def _records_by_type(run_dir: str) -> dict[str, list]:
    (path,) = offline_run_files(run_dir)
    out: dict[str, list] = {}
    for record in read_records(path):
        out.setdefault(record.WhichOneof("record_type"), []).append(record)
    return out


def _history_rows(records: dict[str, list]) -> list[dict[str, object]]:
    rows = []
    for r in records.get("history", []):
        rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item})
    return rows


def test_offline_run_holds_metrics_per_loop_charts_and_alert(wandb_env):
    run_dir = str(wandb_env / "runs" / "quick")
    tracker = Tracker(
        TrackingConfig(mode="offline", tags=["t1"], group="g"),
        run_dir,
        {"model": {"loops": 4, "readout": "rmsnorm"}},
        is_main=True,
        total_steps=30,
    )
    run_id = tracker.run_id
    assert run_id
    for step in (10, 20, 30):
        tracker.log(step, _step_metrics(step))
    tracker.log(30, {"val/loss/1": 5.1, "val/loss/4": 4.6, "val/ppl/4": math.exp(4.6)})
    tracker.event(WARN_EVENT)
    tracker.event(LOG_EVENT)
    tracker.event(HALT_EVENT)
    tracker.finish(17)

    # finish() returns only once the run file is complete on disk.
    assert offline_run_files(run_dir)[0].endswith(f"run-{run_id}.wandb")
    records = _records_by_type(run_dir)
    rows = [r for r in _history_rows(records) if "norm/mean/1" in r]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["norm/mean/4"] == pytest.approx(_step_metrics(30)["norm/mean/4"])
    assert rows[0]["train/loss_exit/2"] == pytest.approx(_step_metrics(10)["train/loss_exit/2"])
    # Our step is the x-axis of every metric.
    metric_records = [r.metric for r in records["metric"]]
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in metric_records)
    # One alert per event whose action is alert or halt, with its level; none for a logged event.
    warn_alert, halt_alert = [r.alert for r in records["alert"]]
    assert "final_rms" in warn_alert.title and warn_alert.level == "WARN" and "150" in warn_alert.text
    assert "nonfinite" in halt_alert.title and halt_alert.level == "ERROR"
    # One chart per family with one line per loop (a line_series custom chart).
    config_keys = {"/".join(item.nested_key) or item.key for r in records["config"] for item in r.config.update}
    assert "_wandb/visualize/per_loop/norm_mean" in config_keys
    assert "_wandb/visualize/per_loop/train_loss_exit" in config_keys
    # Drawn from the first log on (the live dashboard has them), not only when the run ends.
    assert any(r.get("step") == 10 and any(k.startswith("per_loop/norm_mean") for k in r) for r in _history_rows(records))
    run_record = records["run"][0].run
    initial_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert initial_config["model"] == {"loops": 4, "readout": "rmsnorm"}, "the resolved recipe is the W&B config"
    assert records["exit"][0].exit.exit_code == 17
    assert (list(run_record.tags), run_record.run_group, run_record.display_name) == (["t1"], "g", "quick")

    # The JSONL files hold the same, independent of W&B.
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [10, 20, 30] and metrics[-1]["val/loss/4"] == 4.6
    events = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))]
    assert [e["rule"] for e in events] == ["final_rms", "loop_ratio", "nonfinite"]


def test_resume_id_continues_the_same_run(wandb_env):
    run_dir = str(wandb_env / "run")
    first = Tracker(TrackingConfig(mode="offline"), run_dir, {}, is_main=True)
    first.log(1, {"train/loss": 3.0})
    first.finish(18)
    second = Tracker(TrackingConfig(mode="offline"), run_dir, {}, is_main=True, resume_id=first.run_id)
    assert second.run_id == first.run_id
    second.log(2, {"train/loss": 2.9})
    second.finish(0)


def test_auto_mode_without_key_goes_offline_and_says_so_once(wandb_env, capsys):
    run_dir = str(wandb_env / "run")
    tracker = Tracker(TrackingConfig(mode="auto"), run_dir, {}, is_main=True)
    try:
        assert tracker.mode == "offline" and tracker.run_id
    finally:
        tracker.finish(0)
    out = capsys.readouterr().out
    assert out.count("no API key found") == 1
    assert offline_run_files(run_dir)


def test_online_without_key_is_a_clear_error(wandb_env):
    run_dir = wandb_env / "run"
    with pytest.raises(RecipeError, match="WANDB_API_KEY.*wandb login"):
        Tracker(TrackingConfig(mode="online"), str(run_dir), {}, is_main=True)
    assert not (run_dir / "wandb").exists()


def test_auto_mode_sees_a_netrc_key(wandb_env, monkeypatch):
    from looptrain.tracking.wandb_backend import resolve_mode

    netrc_path = wandb_env / "netrc"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert resolve_mode("auto") == ("online", None)


_NO_WANDB_SCRIPT = textwrap.dedent(
    """
    import sys
    from looptrain.config.schema import TrackingConfig
    from looptrain.monitor import MonitorEvent
    from looptrain.tracking import Tracker

    run_dir, mode, is_main = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    t = Tracker(TrackingConfig(mode=mode), run_dir, {"a": 1}, is_main=is_main, total_steps=5)
    t.log(1, {"train/loss": 3.0, "norm/mean/1": 2.0})
    t.event(MonitorEvent(1, "final_rms", "WARN", "alert", "warned", {"rms": 150.0}))
    t.finish(0)
    assert t.run_id is None
    assert "wandb" not in sys.modules, "wandb must not be imported here"
    """
)


def _run_without_wandb(run_dir: str, mode: str, is_main: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run(
        [sys.executable, "-c", _NO_WANDB_SCRIPT, run_dir, mode, "1" if is_main else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_disabled_writes_jsonl_but_no_wandb_files_and_never_imports_wandb(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_without_wandb(str(run_dir), "disabled", is_main=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(run_dir)) == ["events.jsonl", "metrics.jsonl"]
    assert read_metrics(str(run_dir)) == [{"step": 1, "train/loss": 3.0, "norm/mean/1": 2.0}]
    (event,) = [json.loads(line) for line in open(run_dir / "events.jsonl")]
    assert event["rule"] == "final_rms" and event["level"] == "WARN"
    assert "[monitor WARN alert] step 1 final_rms: warned" in proc.stdout


def test_non_main_rank_writes_nothing_and_never_imports_wandb(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_without_wandb(str(run_dir), "offline", is_main=False)
    assert proc.returncode == 0, proc.stderr
    assert not run_dir.exists() and proc.stdout == ""


def test_console_lines_show_each_exit_and_the_final_norm():
    metrics = {
        "train/loss": 4.8123,
        "train/loss_exit/1": 5.12,
        "train/loss_exit/2": 4.80,
        "train/loss_exit/3": 4.61,
        "train/loss_exit/4": 4.55,
        "norm/mean/4": 31.2,
        "norm/rms/4": 1.38,
        "norm/mean/3": 20.0,
        "perf/tokens_per_s": 12300.0,
        "train/lr": 3e-4,
    }
    (line,) = format_lines(120, 1000, metrics)
    assert line.startswith("step 120/1000 | loss 4.8123 | ce[1..4] 5.12 4.80 4.61 4.55 | |h4| 31.2 rms 1.38")
    assert "12.3k tok/s" in line and "lr 3.00e-04" in line
    (val,) = format_lines(200, 1000, {"val/loss/1": 5.0, "val/loss/4": 4.5, "val/ppl/4": 90.0})
    assert val == "val step 200/1000 | loss[1..4] 5.000 4.500 | ppl[4] 90"


def test_metrics_file_keeps_nan_and_the_latest_record_of_a_relogged_step(tmp_path):
    tracker = Tracker(TrackingConfig(mode="disabled"), str(tmp_path), {}, is_main=True)
    tracker.log(10, {"train/loss": 3.0, "norm/mean/1": 1.0})
    tracker.log(20, {"train/loss": float("nan"), "norm/mean/1": 2.0})
    tracker.finish(0)
    # A resumed run logs step 20 again.
    resumed = Tracker(TrackingConfig(mode="disabled"), str(tmp_path), {}, is_main=True)
    resumed.log(20, {"train/loss": 2.5, "norm/mean/1": 2.2})
    resumed.finish(0)
    for line in open(tmp_path / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    records = read_metrics(str(tmp_path))
    assert [(r["step"], r["train/loss"]) for r in records] == [(10, 3.0), (20, 2.5)]
    assert per_loop_series(records, "norm/mean") == {1: ([10, 20], [1.0, 2.2])}
    assert math.isnan(read_metrics_nan(tmp_path))


def read_metrics_nan(tmp_path) -> float:
    first_20 = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][1]
    return float(first_20["train/loss"])


def test_plot_writes_a_png_for_several_runs(tmp_path, capsys):
    from looptrain.plot import add_plot_arguments, run_plot

    run_dirs = []
    for name, growth in (("rmsnorm", 1.5), ("final_only", 1.0)):
        run_dir = tmp_path / name
        tracker = Tracker(TrackingConfig(mode="disabled"), str(run_dir), {}, is_main=True)
        for step in range(0, 100, 10):
            m = _step_metrics(step)
            for k in range(1, 5):
                m[f"norm/mean/{k}"] = k * growth ** (step / 10)
            tracker.log(step, m)
        tracker.finish(0)
        run_dirs.append(str(run_dir))
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    out = tmp_path / "plots" / "loops.png"
    assert run_plot(parser.parse_args([*run_dirs, "-o", str(out)])) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert run_plot(parser.parse_args([run_dirs[0], str(tmp_path / "missing")])) == 2
    assert "no metrics.jsonl in " + str(tmp_path / "missing") in capsys.readouterr().err
