"""Evaluation results of several runs as JSON, CSV and Markdown.

The inputs are the dicts of `looptrain.eval.run.evaluate_model` /
`evaluate_run`. JSON keeps everything (infinite thresholds become the string
"Infinity"); the CSV files are flat tables for spreadsheets; the Markdown is
what `looptrain eval` prints.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

from looptrain.monitor.jsonsafe import json_safe

DEPTH_COLUMNS = ("run", "depth", "loss", "ppl", "exit_loss", "norm_mean", "norm_p99", "norm_max", "norm_rms")
EXIT_COLUMNS = ("run", "policy", "threshold", "mean_loops", "loss", "ppl", "picked")


def write_json(results: Sequence[dict], path: str | os.PathLike) -> str:
    with open(path, "w") as f:
        json.dump(json_safe(list(results)), f, indent=1)
        f.write("\n")
    return str(path)


def depth_rows(results: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per run and evaluated depth, with the norms of that loop."""
    rows = []
    for r in results:
        d = r["depth"]
        norms = {n["loop"]: n for n in d["norms"]}
        for i, depth in enumerate(d["depths"]):
            n = norms.get(depth, {})
            rows.append({
                "run": r["name"], "depth": depth, "loss": d["loss"][i], "ppl": d["ppl"][i],
                "exit_loss": d["exit_loss"][i], "norm_mean": n.get("mean"), "norm_p99": n.get("p99"),
                "norm_max": n.get("max"), "norm_rms": n.get("rms"),
            })
    return rows


def exit_rows(results: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per run, policy and swept threshold."""
    rows = []
    for r in results:
        for policy, p in r["exits"]["policies"].items():
            for point in p["curve"]:
                rows.append({
                    "run": r["name"], "policy": policy, "threshold": point["threshold"],
                    "mean_loops": point["mean_loops"], "loss": point["loss"], "ppl": point["ppl"],
                    "picked": point == p["pick"],
                })
    return rows


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: str | os.PathLike) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return str(path)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: Sequence[dict]) -> str:
    """Perplexity per depth (runs as columns), RMS per loop, early-exit picks, diagnostics."""
    names = [r["name"] for r in results]
    two_readouts = [r for r in results if exit_readout_differs(r)]
    lines = [
        "## Perplexity by inference depth", "",
        "Depth k: the model run for k loops and read out by its final readout (the last exit's), "
        "i.e. what `model(tokens, depth=k)` returns. `*` marks each run's trained depth.",
    ]
    if two_readouts:
        lines.append(
            "Runs whose intermediate exits have a readout of their own (`final_only`: raw at exits 1..K-1) "
            "get a second column, `(exit k readout)`: exit k of the deepest pass read by that exit's readout, "
            "the numbers the early-exit table uses."
        )
    lines.append("")
    all_depths = sorted({k for r in results for k in r["depth"]["depths"]})
    header = ["depth"]
    for r in results:
        header.append(r["name"])
        if r in two_readouts:
            header.append(f"{r['name']} (exit k readout)")
    rows = []
    for k in all_depths:
        row = [str(k)]
        for r in results:
            d = r["depth"]
            cell = _num(d["ppl"][d["depths"].index(k)]) if k in d["depths"] else "-"
            row.append(cell + ("*" if k == r["trained_depth"] and cell != "-" else ""))
            if r in two_readouts:
                row.append(_num(_perplexity(d["exit_loss"][d["depths"].index(k)])) if k in d["depths"] else "-")
        rows.append(row)
    lines += _table(header, rows)

    lines += ["", "## RMS of the raw state per loop", ""]
    loops = sorted({n["loop"] for r in results for n in r["depth"]["norms"]})
    rows = []
    for k in loops:
        row = [str(k)]
        for r in results:
            norms = {n["loop"]: n for n in r["depth"]["norms"]}
            row.append(_num(norms[k]["rms"]) if k in norms else "-")
        rows.append(row)
    lines += _table(["loop", *names], rows)

    lines += ["", "## Early exit: fewest loops within tolerance of full-depth perplexity", ""]
    rows = []
    for r in results:
        e = r["exits"]
        for policy, p in e["policies"].items():
            pick = p["pick"]
            rows.append([
                r["name"], policy, _num(pick["threshold"]), f"{pick['mean_loops']:.3g} / {e['depth']}",
                _num(pick["ppl"]), _num(e["full_ppl"]), f"{100 * p['saved_fraction']:.1f}%",
            ])
    tol = results[0]["exits"]["tolerance"] if results else 0.0
    lines += [
        f"Tolerance: perplexity at most {100 * tol:.3g}% above full depth (`full ppl`: the final readout at the "
        "last exit). A token that stops at an earlier exit is read by that exit's own readout.", "",
    ]
    lines += _table(["run", "policy", "threshold", "mean loops", "ppl", "full ppl", "loops saved"], rows)

    diag = [r for r in results if r.get("diagnostics")]
    if diag:
        lines += ["", "## Scale diagnostics (last loop)", ""]
        rows = []
        for r in diag:
            g = r["diagnostics"]
            rows.append([
                r["name"], _num(g["radial"]["exit_loss"][-1]), _num(g["radial"]["total_loss"][-1]),
                _num(g["clamp"]["loss"][-1]), _num(g["clamp"]["loss_clamped"][-1]),
                f"{100 * g['clamp']['rel_change'][-1]:+.2f}%",
            ])
        lines += _table(
            ["run", "radial share (exit loss)", "radial share (all exits)", "loss", "loss, radial clamp", "change"],
            rows,
        )
    return "\n".join(lines) + "\n"


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # as looptrain.eval.depth.perplexity, without importing torch


def exit_readout_differs(result: dict) -> bool:
    """True when exit k's own readout and the final readout after k loops give different losses (final_only)."""
    d = result["depth"]
    return any(a != b for a, b in zip(d["loss"], d["exit_loss"]))


def write_reports(results: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, str]:
    """results.json, results.csv (depths), exits.csv (exit curves), results.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": write_json(results, os.path.join(out_dir, "results.json")),
        "csv": write_csv(depth_rows(results), DEPTH_COLUMNS, os.path.join(out_dir, "results.csv")),
        "exits_csv": write_csv(exit_rows(results), EXIT_COLUMNS, os.path.join(out_dir, "exits.csv")),
    }
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(results))
    paths["md"] = md_path
    return paths
