"""The Slurm launcher: profiles, sweeps, sbatch scripts and status (fast), and real jobs on the
local two-node cluster (slow): multi-node FSDP2 training, requeue after the preemption signal,
a sweep as a job array with a halted run, dry runs, bad profiles and cancel.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from looptrain import exit_codes
from looptrain.cli import build_parser, main
from looptrain.config import load_recipe, recipe_to_dict
from looptrain.launch import records
from looptrain.launch.job import RequeueDecision, TaskInfo, decide_requeue
from looptrain.launch.profile import LaunchError, load_profile, profile_from_dict
from looptrain.launch.sbatch import render_sbatch
from looptrain.launch.slurm import check_world, submitit_parameters
from looptrain.launch.status import RunRef, collect_status, format_status, run_status
from looptrain.launch.sweep import load_sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO_ROOT / "recipes" / "quickstart.yaml")
LOCAL_PROFILE = str(REPO_ROOT / "slurm" / "local.yaml")
DONE = {"finished", "halted", "failed", "stopped", "cancelled"}


def tiny(data_dir: str | Path, out_dir: str | Path, *, steps: int) -> list[str]:
    """A looped LM small enough that a Slurm job is mostly start-up (d 64, vocab 512, seq 64)."""
    return [
        "model.d_model=64", "model.n_heads=4", "model.vocab_size=512", "model.max_seq_len=64", "model.core_layers=2",
        f"train.steps={steps}", "train.micro_batch_size=4", "train.log_every=1", "train.val_every=0",
        "optim.schedule.warmup_steps=2", "tracking.mode=disabled", f"data.dir={data_dir}", f"out_dir={out_dir}",
        # Fixed canonical nodes: the sample order is then the same on 1 node x 2 ranks and 2 nodes x 1 rank.
        "data.num_canonical_nodes=2",
    ]


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ===================================================================== profiles


def test_shipped_profiles_load():
    local = load_profile(LOCAL_PROFILE)
    assert (local.partition, local.nodes, local.ranks_per_node) == ("debug", 2, 1)
    gpu = load_profile(REPO_ROOT / "slurm" / "gpu-cluster.example.yaml")
    assert gpu.ranks_per_node == gpu.gpus_per_node == 8  # tasks_per_node: null -> one rank per GPU


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"partition": "debug", "time_limit": 30},
         ["unknown profile key 'time_limit'", "did you mean 'time_limit_min'"]),
        ({"partitoin": "debug"}, ["unknown profile key 'partitoin'", "did you mean 'partition'"]),
        ({"nodes": 2}, ["missing required key 'partition'"]),
        ({"partition": "debug", "nodes": "two"}, ["nodes: expected int, got 'two'"]),
        ({"partition": "debug", "mem_gb": "lots"}, ["mem_gb: expected float (or null)"]),
        ({"partition": "debug", "setup": "module load cuda"}, ["setup: expected a list of str"]),
        ({"partition": "gpu", "gpus_per_node": 4, "tasks_per_node": 2}, ["one rank per GPU", "tasks_per_node: 4"]),
        ({"partition": "debug", "time_limit_min": 1, "signal_delay_s": 90},
         ["signal_delay_s", "before the job starts"]),
        ({"partition": "debug", "mem_gb": 8, "mem_per_task_gb": 2}, ["not both"]),
        ({"partition": "debug", "sbatch_extra": {"--exclusive": True}}, ["without dashes"]),
    ],
)
def test_profile_errors_name_the_key_and_the_fix(data, expected):
    with pytest.raises(LaunchError) as err:
        profile_from_dict(data, source="p.yaml")
    for text in expected:
        assert text in str(err.value)
    assert str(err.value).startswith("p.yaml: ")


def test_profile_becomes_submitit_parameters():
    profile = profile_from_dict({
        "partition": "gpu", "account": "proj", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 6,
        "mem_per_task_gb": 16, "time_limit_min": 120, "signal_delay_s": 300, "setup": ["module load cuda"],
        "sbatch_extra": {"exclusive": True, "mail-type": "END"}, "max_requeues": 5,
    })
    params = submitit_parameters(profile, job_name="looptrain-x")
    assert params["ntasks_per_node"] == 4  # one rank per GPU
    assert params["gpus_per_node"] == 4 and params["nodes"] == 2 and params["cpus_per_task"] == 6
    assert params["mem"] == 64  # GB per node: 16 per task x 4 tasks
    assert params["time"] == 120 and params["signal_delay_s"] == 300 and params["account"] == "proj"
    assert params["srun_args"] == ["--kill-on-bad-exit=1"]
    assert params["additional_parameters"] == {"requeue": True, "exclusive": True, "mail-type": "END"}
    assert params["setup"][0] == "module load cuda"
    # The rendezvous port is picked free on the first node, not derived from the job id.
    port = subprocess.run(["bash", "-c", params["setup"][1] + '; echo "$LOOPTRAIN_MASTER_PORT"'],
                          capture_output=True, text=True, check=True).stdout
    assert 0 < int(port) < 65536
    assert "qos" not in params and "constraint" not in params  # null: left to the cluster
    cpu = submitit_parameters(profile_from_dict({"partition": "cpu"}), job_name="j")
    assert "gpus_per_node" not in cpu and cpu["ntasks_per_node"] == 1


def test_world_and_batch_are_checked_before_submitting():
    two_nodes = load_profile(LOCAL_PROFILE)
    with pytest.raises(LaunchError, match="parallel.backend=single runs one process"):
        check_world(load_recipe(QUICKSTART), two_nodes)
    check_world(load_recipe(QUICKSTART, ["parallel.backend=fsdp2"]), two_nodes)
    with pytest.raises(LaunchError, match="set train.grad_accum=2"):
        check_world(load_recipe(QUICKSTART, ["parallel.backend=fsdp2", "train.global_batch_size=64"]), two_nodes)


def test_overrides_may_follow_the_options():
    args = build_parser().parse_args(["launch", "r.yaml", "--cluster", "p.yaml", "--dry-run", "a.b=1", "c=2"])
    assert (args.recipe, args.cluster, args.dry_run, args.overrides) == ("r.yaml", "p.yaml", True, ["a.b=1", "c=2"])
    args = build_parser().parse_args(["sweep", "s.yaml", "x=1", "--nodes", "1", "y=2"])
    assert (args.sweep, args.nodes, args.overrides) == ("s.yaml", 1, ["x=1", "y=2"])


# ======================================================================= sweeps


def test_sweep_expands_runs_times_grid(tmp_path):
    sweep_file = write_yaml(tmp_path / "s.yaml", {
        "name": "ablation",
        "base": QUICKSTART,
        "out_dir": "sweeps",
        "overrides": ["train.steps=10"],
        "runs": [{"name": "rms"}, {"name": "raw", "overrides": ["model.readout=raw"]}],
        "grid": {"train.seed": [0, 1], "optim.lr": [0.001]},
    })
    sweep = load_sweep(str(sweep_file), ["train.log_every=5"], workdir=str(tmp_path))
    names = [r.name for r in sweep.runs]
    assert names == ["rms-seed0-lr0.001", "rms-seed1-lr0.001", "raw-seed0-lr0.001", "raw-seed1-lr0.001"]
    assert sweep.sweep_dir == tmp_path / "sweeps" / "ablation"
    for run in sweep.runs:
        r = run.recipe
        assert Path(r.run_dir) == sweep.sweep_dir / run.name
        assert (r.tracking.group, r.tracking.name) == ("ablation", run.name)
        assert (r.train.steps, r.train.log_every, r.optim.lr) == (10, 5, 0.001)
    assert [r.recipe.train.seed for r in sweep.runs] == [0, 1, 0, 1]
    assert [r.recipe.model.readout for r in sweep.runs] == ["rmsnorm", "rmsnorm", "raw", "raw"]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"name": "s", "base": QUICKSTART, "grid": {"train.seed": [0]}, "parallelism": 2},
         "unknown sweep key 'parallelism'; did you mean 'array_parallelism'?"),
        ({"name": "s", "base": QUICKSTART, "runs": [{"name": "a", "overides": []}]},
         "unknown sweep key 'overides'; did you mean 'overrides'?"),
        ({"name": "s", "base": QUICKSTART, "runs": [{"name": "a"}, {"name": "a"}]}, "both named 'a'"),
        ({"name": "s", "base": QUICKSTART, "runs": [{"name": "a", "overrides": ["model.loops=0"]}]},
         "run a: "),
        ({"name": "s", "base": QUICKSTART, "runs": [{"name": "a", "overrides": ["model.lops=2"]}]},
         "did you mean 'model.loops'"),
        ({"name": "s", "runs": [{"name": "a"}]}, "no recipe"),
        ({"name": "s", "base": QUICKSTART}, "needs `runs:`, `grid:` or both"),
        ({"name": "a/b", "base": QUICKSTART, "grid": {"train.seed": [0]}}, "name:"),
        ({"name": "s", "base": QUICKSTART, "grid": {"train.seed": []}}, "non-empty list"),
    ],
)
def test_sweep_errors(tmp_path, data, expected):
    with pytest.raises(LaunchError) as err:
        load_sweep(str(write_yaml(tmp_path / "s.yaml", data)), workdir=str(tmp_path))
    assert expected in str(err.value)


def test_paper_sweep_example_is_seven_conditions_times_three_seeds(tmp_path):
    sweep = load_sweep(str(REPO_ROOT / "slurm" / "sweeps" / "paper_44m_grid.yaml"), workdir=str(tmp_path))
    assert len(sweep.runs) == 21
    conditions = {(r.recipe.objective.supervision, r.recipe.model.readout, r.recipe.objective.norm_penalty.weight)
                  for r in sweep.runs}
    assert len(conditions) == 7
    assert sorted({r.recipe.train.seed for r in sweep.runs}) == [0, 1, 2]
    profile = load_profile(sweep.cluster)
    for run in sweep.runs:
        check_world(run.recipe, profile)  # the global batch of 64 divides over 8 GPUs


# ================================================================ sbatch script


def _render(tmp_path: Path, *, max_requeues: int = 2, signal_delay_s: int = 60) -> tuple[Path, Path]:
    profile = profile_from_dict({
        "partition": "debug", "nodes": 2, "time_limit_min": 10, "signal_delay_s": signal_delay_s,
        "max_requeues": max_requeues, "setup": ["export LOOPTRAIN_SETUP_RAN=1"], "sbatch_extra": {"exclusive": True},
    })
    run_dir = tmp_path / "runs" / "x"
    text = render_sbatch(profile, recipe_path=QUICKSTART, overrides=["train.steps=5", "name=x"], run_name="x",
                         run_dir=str(run_dir), workdir=str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(text)
    return script, run_dir


def test_sbatch_script_is_rendered_completely(tmp_path):
    script, run_dir = _render(tmp_path)
    text = script.read_text()
    assert "@@" not in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for flag in ("--partition=debug", "--nodes=2", "--ntasks-per-node=1", "--time=10", "--signal=B:USR2@60",
                 "--requeue", "--exclusive", "--open-mode=append", f"--chdir={tmp_path}"):
        assert f"#SBATCH {flag}" in directives
    assert "--kill-on-bad-exit=1" in text
    assert f"-m looptrain.cli train {QUICKSTART} train.steps=5 name=x" in text
    assert "export LOOPTRAIN_SETUP_RAN=1" in text
    # sbatch reads directives only up to the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(text.splitlines().index(d) < first_command for d in directives)


def test_sbatch_template_ships_inside_the_package():
    """`--emit-sbatch` must work from a wheel: the template is package data, not a repository file."""
    import tomllib

    import looptrain.launch
    from looptrain.launch.sbatch import TEMPLATE

    assert TEMPLATE.is_file() and TEMPLATE.parent == Path(looptrain.launch.__file__).resolve().parent
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert TEMPLATE.name in package_data["looptrain.launch"]


def _fake_slurm(bin_dir: Path, srun_body: str) -> None:
    """Stand-ins for srun/scontrol/squeue, to run the script's requeue logic without a cluster."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/bash\n" + srun_body,
        "scontrol": '#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n',
        # Running, started 100 s ago, with a limit of FAKE_LEFT + 100 s ([D-]HH:MM:SS as squeue prints it).
        "squeue": '#!/bin/bash\nt=$((FAKE_LEFT + 100))\n'
                  'printf "RUNNING|%s|0-%02d:%02d:%02d\\n" "$(date -d @$(( $(date +%s) - 100 )) +%Y-%m-%dT%H:%M:%S)" '
                  '$((t / 3600)) $((t % 3600 / 60)) $((t % 60))\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_script(tmp_path: Path, script: Path, *, rc: int, left_s: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "FAKE_RC": str(rc), "FAKE_LEFT": str(left_s), "FAKE_LOG": str(tmp_path / "scontrol.log")}
    env.pop("SLURM_RESTART_COUNT", None)
    env.pop("SLURM_ARRAY_JOB_ID", None)
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


@pytest.mark.parametrize(
    "rc, left_s, earlier_timeouts, outcome, kind, requeued",
    [
        (18, 600, 5, "requeued", "preemption", True),  # preemptions are not capped
        (18, 30, 1, "requeued", "timeout", True),
        (18, 30, 2, "stopped", "timeout", False),  # max_requeues=2 reached
        (17, 30, 0, "halted", None, False),
        (1, 30, 0, "failed", None, False),
        (0, 30, 0, "finished", None, False),
    ],
)
def test_sbatch_script_requeues_only_checkpointed_runs(tmp_path, rc, left_s, earlier_timeouts, outcome, kind, requeued):
    script, run_dir = _render(tmp_path, max_requeues=2)
    _fake_slurm(tmp_path / "bin", 'exit "$FAKE_RC"\n')
    for _ in range(earlier_timeouts):
        records.append_attempt(run_dir, event="end", job_id="42", restart=0, outcome="requeued", exit_code=18,
                               requeue_kind="timeout", launcher="sbatch")
    proc = _run_script(tmp_path, script, rc=rc, left_s=left_s)
    out, _ = proc.communicate(timeout=30)
    ends = [a for a in records.read_attempts(run_dir, "42") if a.event == "end"][earlier_timeouts:]
    assert [(a.outcome, a.exit_code, a.requeue_kind) for a in ends] == [(outcome, rc, kind)], out
    calls = (tmp_path / "scontrol.log").read_text().splitlines() if (tmp_path / "scontrol.log").exists() else []
    assert [c for c in calls if c.startswith("requeue")] == (["requeue 42"] if requeued else []), out
    # Slurm's accounting says FAILED for a halt and an error alike: the job comment tells them apart.
    assert any(c.startswith(f"update JobId=42 Comment=looptrain: {outcome} (exit {rc})") for c in calls), calls


def test_sbatch_script_forwards_the_warning_signal_to_the_ranks(tmp_path):
    """USR2 reaches the batch shell (--signal=B:USR2); it must reach srun's ranks, and a kill status
    after it (srun --kill-on-bad-exit) still means: checkpointed, requeue."""
    script, run_dir = _render(tmp_path)
    marker = tmp_path / "srun-started"
    _fake_slurm(tmp_path / "bin", f"""
trap 'echo got-usr2 > {tmp_path}/srun-got-usr2; exit 137' USR2
touch {marker}
for i in $(seq 1 300); do sleep 0.1; done
exit 3
""")
    proc = _run_script(tmp_path, script, rc=0, left_s=600)
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert (tmp_path / "srun-got-usr2").exists(), out
    ends = [a for a in records.read_attempts(run_dir, "42") if a.event == "end"]
    assert [(a.outcome, a.requeue_kind) for a in ends] == [("requeued", "preemption")], out
    assert [c for c in (tmp_path / "scontrol.log").read_text().splitlines() if c.startswith("requeue")] == [
        "requeue 42"]


# ==================================================================== requeue policy


def test_slurm_time_limits_parse_to_seconds():
    from looptrain.launch.job import parse_slurm_duration

    assert parse_slurm_duration("1-02:03:04") == 93784
    assert parse_slurm_duration("1:30:00") == 5400 and parse_slurm_duration("09:08") == 548
    assert parse_slurm_duration("10") == 600  # plain minutes
    assert parse_slurm_duration("UNLIMITED") is None and parse_slurm_duration("NOT_SET") is None


def test_requeue_decision_caps_time_limits_not_preemptions(tmp_path):
    run = str(tmp_path / "run")
    task = TaskInfo(job_id="7", raw_job_id="7", restart=0, rank=0, node=0)

    def decide(left, state="RUNNING"):
        return decide_requeue(run, task, max_requeues=1, signal_delay_s=60, job_state=state, seconds_left=left)

    assert decide(100) == RequeueDecision(True, records.TIMEOUT, "")
    records.append_attempt(run, event="end", job_id="7", restart=0, outcome=records.REQUEUED, exit_code=18,
                           requeue_kind=records.TIMEOUT)
    capped = decide(100)
    assert not capped.requeue and "cap reached" in capped.reason and capped.outcome == records.STOPPED
    assert decide(None).requeue is False  # unknown time left counts as a time limit
    assert decide(3000) == RequeueDecision(True, records.PREEMPTION, "")  # preemptions are not counted
    ending = decide(3000, state="COMPLETING")  # scancel: the ranks got SIGTERM and checkpointed
    assert not ending.requeue and ending.outcome == records.CANCELLED
    records.request_cancel(run, ["7"])
    assert decide(3000).outcome == records.CANCELLED
    other_job = TaskInfo(job_id="8", raw_job_id="8", restart=0, rank=0, node=0)
    assert decide_requeue(run, other_job, max_requeues=1, signal_delay_s=60, job_state="RUNNING",
                          seconds_left=100).requeue  # counts and cancels belong to one job


def test_task_environment_comes_from_slurm_not_from_the_submitting_shell(tmp_path, monkeypatch):
    import socket
    import tempfile

    from looptrain.launch.job import prepare_task_environment

    monkeypatch.setattr(tempfile, "tempdir", None)
    for name, value in {
        "SLURM_JOB_ID": "77", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "n1,n2",
        "SLURMD_NODENAME": socket.gethostname().split(".")[0], "SLURM_RESTART_COUNT": "3", "SLURM_CPUS_PER_TASK": "3",
        "RANK": "5", "WORLD_SIZE": "9", "MASTER_PORT": "1", "TMPDIR": str(tmp_path),  # exported at submission
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)  # undone after the test, like everything set here
    task = TaskInfo.from_env()
    assert (task.job_id, task.restart, task.rank, task.node) == ("77", 3, 1, 1)
    tmp = prepare_task_environment(task)
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "2", "0", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("n1", "20077")
    assert tmp == env["TMPDIR"] == str(tmp_path / "looptrain-77-r3") and Path(tmp).is_dir()
    assert tempfile.gettempdir() == tmp
    assert env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert TaskInfo.from_env().job_id == "70_4" and TaskInfo.from_env().raw_job_id == "77"


# ======================================================================= status


def test_status_file_names_match_their_writers():
    from looptrain.launch import status
    from looptrain.monitor.halt import HALT_FILE
    from looptrain.tracking.metrics_file import METRICS_FILE

    assert (status.METRICS_FILE, status.HALT_FILE) == (METRICS_FILE, HALT_FILE)


def _fake_run(root: Path, name: str, job: str, *, attempts=(), metrics=(), halted=None, err_log=None) -> RunRef:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    for fields in attempts:
        records.append_attempt(run_dir, job_id=job, **fields)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in metrics:
            f.write(json.dumps(record) + "\n")
    if halted is not None:
        (run_dir / "HALTED.json").write_text(json.dumps(halted))
    log_dir = root / "slurm"
    log_dir.mkdir(exist_ok=True)
    if err_log is not None:
        (log_dir / f"{job}_0_log.err").write_text(err_log)
    return RunRef(name, run_dir, job, log_dir, 10)


def test_status_reads_states_and_progress_from_run_files(tmp_path):
    norms = {f"norm/rms/{k}": 1.5 * k for k in range(1, 5)} | {f"norm/mean/{k}": 12.0 * k for k in range(1, 5)}
    finished = _fake_run(tmp_path, "done", "5_0", attempts=[
        {"event": "start", "restart": 0},
        {"event": "end", "restart": 0, "outcome": "requeued", "exit_code": 18, "requeue_kind": "preemption"},
        {"event": "start", "restart": 1},
        {"event": "end", "restart": 1, "outcome": "finished", "exit_code": 0},
    ], metrics=[
        {"step": 5, "train/loss": 6.0, **norms},
        {"step": 10, "train/loss": 5.0, **{k: v * 2 for k, v in norms.items()}},
        {"step": 10, "val/loss/1": 5.9, "val/loss/4": 5.25},
        {"step": 10, "train/loss": 5.0, **{k: v * 2 for k, v in norms.items()}},  # re-logged after a resume
        '{"step": 11, "train/lo',  # cut by a killed writer
    ])
    halted = _fake_run(tmp_path, "halted", "5_1", attempts=[
        {"event": "start", "restart": 0}, {"event": "end", "restart": 0, "outcome": "halted", "exit_code": 17},
    ], metrics=[{"step": 2, **norms}], halted={"rule": "final_rms", "step": 2, "message": "RMS 3 above 1"})
    failed = _fake_run(tmp_path, "failed", "5_2", attempts=[
        {"event": "start", "restart": 0}, {"event": "end", "restart": 0, "outcome": "failed", "exit_code": 1},
    ], err_log="submitit INFO starting\nlooptrain: rank 0 failed:\nTraceback (most recent call last):\n"
               '  File "x.py", line 1\nRuntimeError: CUDA out of memory\n'
               "looptrain.launch.job.RunStopped: training failed with exit status 1\n")
    pending = _fake_run(tmp_path, "pending", "5_3", attempts=[
        {"event": "start", "restart": 0},
        {"event": "end", "restart": 0, "outcome": "requeued", "exit_code": 18, "requeue_kind": "timeout"},
    ])
    crashed = _fake_run(tmp_path, "crashed", "5_4", attempts=[{"event": "start", "restart": 0}],
                        err_log="slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026 DUE TO TIME LIMIT ***\n")
    queued = _fake_run(tmp_path, "queued", "5_5")

    rows = {r.name: r for r in (
        run_status(finished, "COMPLETED"), run_status(halted, "FAILED"), run_status(failed, "FAILED"),
        run_status(pending, "PENDING"), run_status(crashed, "TIMEOUT"), run_status(queued, "PENDING"),
    )}
    done = rows["done"]
    assert (done.state, done.requeues, done.step, done.loop) == ("finished", 1, 10, 4)
    assert (done.rms, done.mean, done.val_loss) == (12.0, 96.0, 5.25)
    assert (rows["halted"].state, rows["halted"].requeues) == ("halted", 0)
    assert "final_rms" in rows["halted"].note and "RMS 3 above 1" in rows["halted"].note
    assert rows["failed"].state == "failed" and rows["failed"].note == "RuntimeError: CUDA out of memory"
    assert (rows["pending"].state, rows["pending"].requeues) == ("pending", 1)
    assert rows["crashed"].state == "failed" and "TIMEOUT" in rows["crashed"].note
    assert "TIME LIMIT" in rows["crashed"].note
    assert rows["queued"].state == "pending" and rows["queued"].step is None

    table = format_status(list(rows.values()))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["RUN", "JOB", "STATE", "REQUEUES", "STEP"]
    assert any(line.startswith("done") and "10/10" in line and "5.25" in line for line in lines)
    assert lines[-1] == "6 run(s): 2 failed, 1 finished, 1 halted, 2 pending"


def test_pending_array_ranges_are_spelled_out():
    from looptrain.launch.status import _expand_job_ids

    assert _expand_job_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand_job_ids("12_3") == ["12_3"] and _expand_job_ids("12") == ["12"]


def test_status_of_a_directory_without_records_says_what_it_needs(tmp_path):
    with pytest.raises(LaunchError, match="neither launch.json nor sweep.json"):
        collect_status(tmp_path)


# ================================================================ the real cluster


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step, the last record of a step winning (a resumed run may re-log a step)."""
    from looptrain.tracking import read_metrics

    return {int(r["step"]): r["train/loss"] for r in read_metrics(str(run_dir)) if "train/loss" in r}


def wait_until_done(directory: Path, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        _kind, rows = collect_status(directory)
        if all(r.state in DONE for r in rows):
            return rows
        if time.monotonic() > deadline:
            logs = "".join(
                f"\n--- {p}\n" + p.read_text()[-3000:] for p in sorted(directory.rglob("*_log.err"))[:4]
            )
            raise AssertionError(f"not done after {timeout_s} s:\n{format_status(rows)}{logs}")
        time.sleep(1)


def wait_for_steps(run_dir: Path, steps: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"{run_dir}: fewer than {steps} logged steps after {timeout_s} s"
        time.sleep(0.2)


def launch(capsys, *args: str, profile: str = LOCAL_PROFILE) -> dict:
    assert main(["launch", QUICKSTART, "--cluster", profile, *args]) == exit_codes.OK
    out = capsys.readouterr().out
    run_dir = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("run directory:")))
    return json.loads((run_dir / records.LAUNCH_FILE).read_text())


def no_job_named(cluster, name: str) -> bool:
    queued = cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.strip()
    accounted = cluster.run("sacct", "-n", "-X", "--name", name, "-o", "JobID").stdout.strip()
    return queued == "" and accounted == ""


@pytest.fixture(scope="module")
def tiny_data(bible_data) -> Path:
    return Path(bible_data).resolve()


REFERENCE_STEPS = 50


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted local run both Slurm runs must reproduce: 2 processes, FSDP2 over gloo."""
    out = tmp_path_factory.mktemp("launch-reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "looptrain.cli", "train", QUICKSTART, *tiny(tiny_data, out, steps=REFERENCE_STEPS),
         "parallel.backend=fsdp2", "name=reference", "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "reference"


@pytest.mark.slow
def test_two_node_fsdp2_job_trains_like_a_local_two_process_run(slurm_cluster, tiny_data, reference_run, tmp_path,
                                                                capsys):
    record = launch(capsys, *tiny(tiny_data, tmp_path, steps=REFERENCE_STEPS), "parallel.backend=fsdp2",
                    "name=two-nodes")
    assert (record["nodes"], record["world_size"]) == (2, 2)
    run_dir = Path(record["run_dir"])
    (row,) = wait_until_done(run_dir, timeout_s=150)
    assert (row.state, row.step, row.requeues) == ("finished", REFERENCE_STEPS, 0), format_status([row])
    slurm_cluster.wait_for_job_state(record["job_id"], "COMPLETED")
    # One rank on each emulated node, each with its own log in the run directory.
    for rank, (out, _err) in enumerate(record["logs"]):
        text = Path(out).read_text()
        assert f"global_rank={rank}(2)" in text and f"node={rank}(2)" in text
    manifest = json.loads((run_dir / "checkpoints" / f"step_{REFERENCE_STEPS:08d}" / "manifest.json").read_text())
    assert (manifest["reason"], manifest["world_size"], manifest["backend"]) == ("final", 2, "fsdp2")
    ours, reference = losses(run_dir), losses(reference_run)
    assert sorted(ours) == list(range(1, REFERENCE_STEPS + 1))
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_matches_the_uninterrupted_run(
    slurm_cluster, tiny_data, reference_run, tmp_path, capsys
):
    # Both nodes' CPUs taken, so that a job of the higher-priority partition must preempt this one:
    # Slurm sends the job's --signal (USR2), waits its grace time, then requeues it.
    whole_nodes = {**yaml.safe_load(Path(LOCAL_PROFILE).read_text()), "cpus_per_task": slurm_cluster.cpus_per_node}
    profile = write_yaml(tmp_path / "whole-nodes.yaml", whole_nodes)
    record = launch(capsys, *tiny(tiny_data, tmp_path, steps=REFERENCE_STEPS), "parallel.backend=fsdp2",
                    "name=preempted", "tracking.mode=offline", profile=str(profile))
    run_dir, job = Path(record["run_dir"]), record["job_id"]
    wait_for_steps(run_dir, 3, timeout_s=90)
    urgent = slurm_cluster.run("sbatch", "--parsable", f"--partition={slurm_cluster.preempting_partition}", "-N1",
                               "-n1", "--time=1", "--output=/dev/null", "--wrap=sleep 1").stdout.strip()
    (row,) = wait_until_done(run_dir, timeout_s=180)
    assert (row.state, row.step, row.requeues) == ("finished", REFERENCE_STEPS, 1), format_status([row])
    slurm_cluster.wait_for_job_state(job, "COMPLETED")
    slurm_cluster.wait_for_job_state(urgent, "COMPLETED")

    attempts = [(a.event, a.restart, a.outcome, a.requeue_kind) for a in records.read_attempts(run_dir, job)]
    assert attempts == [("start", 0, None, None), ("end", 0, "requeued", "preemption"),
                        ("start", 1, None, None), ("end", 1, "finished", None)]
    manifests = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("step_*/manifest.json"))]
    preempt = [m for m in manifests if m["reason"] == "preempt"]
    assert len(preempt) == 1 and 3 <= preempt[0]["step"] < REFERENCE_STEPS
    # Resumed from that checkpoint: same losses as never stopping, one W&B run throughout.
    assert losses(run_dir) == pytest.approx(losses(reference_run), rel=1e-6, abs=1e-7)
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2
    assert len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1, wandb_runs


@pytest.mark.slow
def test_sweep_runs_as_a_job_array_and_status_reports_each_run(slurm_cluster, tiny_data, tmp_path, capsys):
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {
        "name": "tiny-sweep",
        "base": QUICKSTART,
        "out_dir": str(tmp_path / "sweeps"),
        # Two runs at once on one machine: their streaming shared memory must not collide.
        "array_parallelism": 2,
        "overrides": [*tiny(tiny_data, tmp_path, steps=4), "train.log_every=2", "train.val_every=4",
                      "train.val_batches=2"],
        "runs": [
            {"name": "rmsnorm"},
            {"name": "raw", "overrides": ["model.readout=raw"]},
            {"name": "final-only", "overrides": ["model.readout=final_only"]},
            {"name": "halts", "overrides": ["monitor.final_rms.warn=null", "monitor.final_rms.halt=1e-6",
                                            "monitor.final_rms.patience=1"]},
        ],
        "grid": {"train.seed": [3]},
    })
    assert main(["sweep", str(sweep_file), "--cluster", LOCAL_PROFILE, "--nodes", "1"]) == exit_codes.OK
    sweep_dir = tmp_path / "sweeps" / "tiny-sweep"
    record = json.loads((sweep_dir / records.SWEEP_FILE).read_text())
    array = record["array_job_id"]
    assert [r["job_id"] for r in record["runs"]] == [f"{array}_{i}" for i in range(4)]
    rows = {r.name: r for r in wait_until_done(sweep_dir, timeout_s=300)}
    assert list(rows) == ["rmsnorm-seed3", "raw-seed3", "final-only-seed3", "halts-seed3"]

    for name in ("rmsnorm-seed3", "raw-seed3", "final-only-seed3"):
        row = rows[name]
        assert (row.state, row.step, row.total_steps, row.requeues) == ("finished", 4, 4, 0), format_status([row])
        assert row.loop == 4 and math.isfinite(row.rms) and math.isfinite(row.mean) and math.isfinite(row.val_loss)
        saved = yaml.safe_load((sweep_dir / name / "recipe.yaml").read_text())
        assert (saved["tracking"]["group"], saved["tracking"]["name"], saved["train"]["seed"]) == (
            "tiny-sweep", name, 3)
    halted = rows["halts-seed3"]
    assert (halted.state, halted.step, halted.requeues) == ("halted", 2, 0), format_status([halted])
    assert "final_rms" in halted.note
    halted_attempts = records.read_attempts(sweep_dir / "halts-seed3")
    assert [(a.event, a.outcome) for a in halted_attempts] == [("start", None), ("end", "halted")]

    for run in record["runs"]:
        slurm_cluster.wait_for_job_state(run["job_id"], "FAILED" if run["name"] == "halts-seed3" else "COMPLETED")
    assert slurm_cluster.run("squeue", "-h", "-j", array).stdout.strip() == ""  # nothing requeued

    assert main(["status", str(sweep_dir)]) == exit_codes.OK
    table = capsys.readouterr().out
    assert "4 run(s): 3 finished, 1 halted" in table
    assert all(name in table for name in rows)


@pytest.mark.slow
def test_dry_run_and_bad_profiles_submit_nothing(slurm_cluster, tiny_data, tmp_path, capsys):
    overrides = [*tiny(tiny_data, tmp_path, steps=5), "parallel.backend=fsdp2"]
    assert main(["launch", QUICKSTART, "--cluster", LOCAL_PROFILE, "--dry-run", *overrides, "name=dry"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --signal=USR2@60", "#SBATCH --requeue", "#SBATCH --account=looptrain"):
        assert line in out.splitlines()
    assert "--kill-on-bad-exit=1" in out
    printed = yaml.safe_load(out.split("# ---- resolved recipe\n", 1)[1])
    assert printed == recipe_to_dict(load_recipe(QUICKSTART, [*overrides, "name=dry"]))
    assert not (tmp_path / "dry").exists()
    assert no_job_named(slurm_cluster, "looptrain-dry")

    good = yaml.safe_load(Path(LOCAL_PROFILE).read_text())
    broken = {
        "typo": ({**good, "time_limit": 5}, "did you mean 'time_limit_min'"),
        "missing": ({k: v for k, v in good.items() if k != "partition"}, "missing required key 'partition'"),
        "wrong-type": ({**good, "nodes": "two"}, "nodes: expected int, got 'two'"),
    }
    for name, (data, message) in broken.items():
        profile = write_yaml(tmp_path / f"{name}.yaml", data)
        code = main(["launch", QUICKSTART, "--cluster", str(profile), *overrides, f"name=bad-{name}"])
        err = capsys.readouterr().err
        assert code == exit_codes.BAD_INPUT and message in err and str(profile) in err
        assert not (tmp_path / f"bad-{name}").exists()
        assert no_job_named(slurm_cluster, f"looptrain-bad-{name}")


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_it_does_not_requeue(slurm_cluster, tiny_data, tmp_path, capsys):
    # With W&B on: scancel's SIGTERM reaches W&B's service too, and the run must checkpoint regardless.
    record = launch(capsys, *tiny(tiny_data, tmp_path, steps=5000), "--nodes", "1", "name=cancelled",
                    "tracking.mode=offline")
    run_dir, job = Path(record["run_dir"]), record["job_id"]
    wait_for_steps(run_dir, 2, timeout_s=90)
    assert main(["cancel", str(run_dir)]) == exit_codes.OK
    assert f"cancelled job(s) {job}" in capsys.readouterr().out
    (row,) = wait_until_done(run_dir, timeout_s=60)
    assert row.state == "cancelled" and row.requeues == 0, format_status([row])
    slurm_cluster.wait_for_job_state(job, "CANCELLED")
    deadline = time.monotonic() + 30  # the ranks checkpoint on SIGTERM, then the job leaves the queue
    while slurm_cluster.run("squeue", "-h", "-j", job).stdout.strip():
        assert time.monotonic() < deadline, "cancelled job still in the queue"
        time.sleep(0.5)
    ends = [a for a in records.read_attempts(run_dir, job) if a.event == "end"]
    assert [a.outcome for a in ends] == ["cancelled"] and ends[0].exit_code == exit_codes.PREEMPTED
    assert [m["reason"] for m in (json.loads(p.read_text()) for p in (run_dir / "checkpoints").glob(
        "step_*/manifest.json"))] == ["preempt"]
    time.sleep(3)  # a requeued job would be back in the queue by now
    assert slurm_cluster.run("squeue", "-h", "-j", job).stdout.strip() == ""


@pytest.mark.slow
def test_emitted_sbatch_script_trains_two_tasks_on_one_host_and_halts_visibly(slurm_cluster, tiny_data,
                                                                              reference_run, tmp_path, capsys):
    """`--emit-sbatch` then `sbatch`: two nodes that are one machine (two streaming local leaders
    on one /dev/shm) train like the local two-process run; a halt then reads as a halt in the job
    comment, not as a bare FAILED."""
    script = tmp_path / "job.sh"
    overrides = [*tiny(tiny_data, tmp_path, steps=REFERENCE_STEPS), "parallel.backend=fsdp2", "name=plain-sbatch",
                 "monitor.final_rms.warn=null", "monitor.final_rms.halt=1e-6", "monitor.final_rms.patience=10"]
    assert main(["launch", QUICKSTART, "--cluster", LOCAL_PROFILE, "--emit-sbatch", str(script), *overrides]) == 0
    capsys.readouterr()
    # Submitted from a shell that carries another launcher's rank variables (sbatch exports the
    # environment): each task must still take its rank from Slurm.
    stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "1"}
    job = subprocess.run(["sbatch", "--parsable", str(script)], env={**os.environ, **slurm_cluster.env, **stale},
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip().split(";")[0]
    run_dir = tmp_path / "plain-sbatch"
    deadline = time.monotonic() + 120
    while not records.attempts_path(run_dir).exists():  # the batch script's first line of records
        assert time.monotonic() < deadline, slurm_cluster.run("scontrol", "show", "job", job).stdout
        time.sleep(0.5)
    (row,) = wait_until_done(run_dir, timeout_s=240)
    assert (row.state, row.step) == ("halted", 10), format_status([row])
    assert losses(run_dir) == pytest.approx({k: v for k, v in losses(reference_run).items() if k <= 10},
                                            rel=1e-6, abs=1e-7)
    comment = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert "Comment=looptrain: halted (exit 17): monitor rule final_rms at step 10" in comment, comment


@pytest.mark.parametrize("loader, kind", [(load_profile, "cluster profile"), (load_sweep, "sweep file")])
def test_profile_and_sweep_files_report_yaml_problems_in_one_line(tmp_path, loader, kind):
    path = tmp_path / "x.yaml"
    with pytest.raises(LaunchError, match=f"{kind} not found"):
        loader(str(path))
    path.write_text("runs: [1\n")
    with pytest.raises(LaunchError, match=r"x\.yaml: line 2, column 1: malformed YAML"):
        loader(str(path))
    path.write_text("- 1\n")
    with pytest.raises(LaunchError, match=f"a {kind} must be a YAML mapping"):
        loader(str(path))
