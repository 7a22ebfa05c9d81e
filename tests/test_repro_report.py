"""tools/repro_report.py: the small-scale reproduction of the paper's grid.

The slow test runs the script's --quick grid end to end (real data
preparation, two real training processes, evaluation, plots, report). The
fast tests check the parts whose mistakes would silently mislead a reader:
the verdict rules and the reuse of finished runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "repro_report.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script():
    spec = importlib.util.spec_from_file_location("repro_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["repro_report"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rr = load_script()


def summary(key: str, norms: list[float], ppl_k: list[float], loops: int = 4):
    """A condition summary with the given per-seed final norms and perplexities at every depth."""
    spread = rr.Spread.of
    return rr.ConditionSummary(
        condition=rr.BY_KEY[key], runs=[], final_norm=spread(norms), final_rms=spread([n / 10 for n in norms]),
        deep_norm=spread([2 * n for n in norms]), ppl={k: spread(ppl_k) for k in range(1, 2 * loops + 1)},
        saved={},
    )


def test_scale_verdict_follows_the_numbers():
    blind = summary("perloop_rmsnorm", [2000.0, 3000.0], [50.0, 52.0])
    tens = {k: summary(k, [20.0, 30.0], [40.0, 41.0]) for k in ("perloop_raw", "perloop_final_only",
                                                                    "perloop_penalty")}
    verdict = rr.scale_verdict({"perloop_rmsnorm": blind, **tens}, 4, 96)
    assert verdict.outcome == "agrees"
    assert any("100x" in line for line in verdict.evidence)

    close = {k: summary(k, [1500.0, 2500.0], [40.0, 41.0]) for k in tens}  # ranges overlap the blind spot's
    assert rr.scale_verdict({"perloop_rmsnorm": blind, **close}, 4, 96).outcome == "disagrees"

    threefold = {k: summary(k, [700.0, 800.0], [40.0, 41.0]) for k in tens}
    assert rr.scale_verdict({"perloop_rmsnorm": blind, **threefold}, 4, 96).outcome == "partly agrees"

    assert rr.scale_verdict({"perloop_rmsnorm": blind}, 4, 96).outcome == "not run"


def test_ppl_verdict_needs_separated_seed_ranges():
    base = summary("perloop_rmsnorm", [2000.0, 3000.0], [50.0, 52.0])
    lower = summary("perloop_raw", [20.0, 30.0], [40.0, 41.0])
    higher = summary("perloop_final_only", [20.0, 30.0], [60.0, 61.0])
    overlapping = summary("perloop_penalty", [20.0, 30.0], [49.0, 53.0])

    assert rr.ppl_verdict({"perloop_rmsnorm": base, "perloop_raw": lower}, 4).outcome == "agrees"
    assert rr.ppl_verdict({"perloop_rmsnorm": base, "perloop_final_only": higher}, 4).outcome == "disagrees"
    assert rr.ppl_verdict({"perloop_rmsnorm": base, "perloop_penalty": overlapping}, 4).outcome == "inconclusive"
    mixed = rr.ppl_verdict({"perloop_rmsnorm": base, "perloop_raw": lower, "perloop_penalty": overlapping,
                            "perloop_final_only": lower}, 4)
    assert mixed.outcome == "partly agrees"
    assert any(line.endswith("overlap (lower at 0 of depths 1..4, higher at 0)") for line in mixed.evidence)


def test_finished_runs_are_reused_only_with_the_same_recipe(tmp_path):
    job = rr.Job(rr.BY_KEY["perloop_raw"], 0, str(tmp_path / "runs"), str(tmp_path / "data"), rr.QUICK_SCALE)
    assert rr.read_marker(job) is None
    rr.finish_job(job, rr.OK, 12.5)
    assert rr.read_marker(job)["wall_s"] == 12.5
    longer = replace(job, scale=replace(rr.QUICK_SCALE, steps=rr.QUICK_SCALE.steps + 1))
    assert rr.read_marker(longer) is None
    other_seed = replace(job, seed=1)
    assert rr.read_marker(other_seed) is None


def test_unknown_condition_is_refused_with_the_valid_names():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--conditions", "perloop_rmsnrom"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "unknown condition(s) perloop_rmsnrom" in proc.stderr
    assert "perloop_rmsnorm" in proc.stderr


@pytest.mark.slow
def test_quick_grid_writes_report_and_plots(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    readme = (out / "README.md").read_text()
    for section in ("## Regenerate", "## Setup", "## Results", "### Final hidden-state scale",
                    "### Training cross-entropy", "### Validation perplexity by inference depth", "### Early exit",
                    "### Every run", "## Agreement with the paper", "**Claim 1:", "**Claim 2:", "## Figures",
                    "## Caveats"):
        assert section in readme, section
    assert f"python tools/repro_report.py --quick --out {out}" in readme
    for label in ("per-loop + RMSNorm (blind spot)", "per-loop + raw"):
        assert readme.count(f"| {label} |") == 4  # scale, training CE, perplexity and early-exit tables
    assert "| k=1 | k=2* | k=3 | k=4 |" in readme  # depths 1..2K with K=2 marked
    assert "Halted by the monitor: none. Failed: none." in readme

    for name in ("norms.png", "ppl_vs_depth.png", "early_exit_pareto.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC), name
        assert f"]({name})" in readme

    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["perloop_rmsnorm-s0", "perloop_raw-s0"]
    for run in results["runs"]:
        assert run["status"] == "ok"
        assert run["depths"] == [1, 2, 3, 4]
        assert all(p > 1 for p in run["ppl"])
        assert len(run["norm_mean_per_loop"]) == 4 and run["final_norm"] == run["norm_mean_per_loop"][1]
        assert os.path.isfile(os.path.join(out, "runs", run["name"], "repro.json"))
