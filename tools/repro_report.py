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

This file is the entry point (arguments, then the steps in order); the parts
live in tools/repro/: grid (conditions, scale, jobs), run (training and
evaluation processes), collect (numbers over seeds), verdicts, plots, render.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from typing import Optional, Sequence

# The parts live in tools/repro/ next to this script; put that directory on the
# path also when this file is loaded by path (tests) rather than run.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

from repro.collect import ConditionSummary, Spread, summarise  # noqa: E402
from looptrain.exit_codes import HALTED, OK  # noqa: E402
from repro.grid import (  # noqa: E402
    BY_KEY, DEFAULT_OUT, DEFAULT_SCALE, QUICK_CONDITIONS, QUICK_SCALE, REPO, Condition, Job, RunOutcome, Scale,
)
from repro.plots import plot_norms, plot_pareto, plot_ppl  # noqa: E402
from repro.render import ReportContext, render_report, write_results_json  # noqa: E402
from repro.run import ensure_dataset, evaluate_all, finish_job, read_marker, train_all  # noqa: E402
from repro.verdicts import Verdict, ppl_verdict, scale_verdict  # noqa: E402

__all__ = [  # what tests and other scripts use from here
    "BY_KEY", "HALTED", "OK", "QUICK_SCALE", "Condition", "ConditionSummary", "Job", "RunOutcome", "Scale", "Spread",
    "Verdict", "finish_job", "main", "parse_args", "ppl_verdict", "read_marker", "scale_verdict",
]


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
