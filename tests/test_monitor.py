"""Norm statistics, monitor rules and halt records."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch

from dataclasses import fields
from pathlib import Path

from looptrain.config.monitor_rules import MONITOR_RULES, MonitorRule
from looptrain.config.schema import MonitorConfig, RuleConfig
from looptrain.exit_codes import HALTED
from looptrain.monitor import (
    LoopNormAccumulator,
    MonitorEvent,
    RunHalted,
    TrainingMonitor,
    read_halt_record,
    rule_table,
    write_halt_record,
)
from looptrain.monitor import rules as rules_module
from looptrain.monitor.stats import HIST_BIN_RATIO

D = 32


def _states(gen: torch.Generator, depth: int, scales: list[float], dtype=torch.float32) -> list[torch.Tensor]:
    return [(torch.randn(3, 17, D, generator=gen) * scales[i]).to(dtype) for i in range(depth)]


def _direct(updates: list[list[torch.Tensor]], max_loops: int) -> dict[int, torch.Tensor]:
    """Token norms per loop over all updates, computed plainly in fp64."""
    norms: dict[int, list[torch.Tensor]] = {}
    for states in updates:
        for i, s in enumerate(states):
            norms.setdefault(i + 1, []).append(s.double().norm(dim=-1).flatten())
    return {k: torch.cat(v) for k, v in norms.items() if k <= max_loops}


# --------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulator_matches_direct_computation_with_varying_depth(dtype):
    gen = torch.Generator().manual_seed(0)
    scales = [0.5, 3.0, 40.0, 900.0]
    # Depth varies per step: loop 4 runs once, loop 1 in every step.
    updates = [_states(gen, depth, scales, dtype) for depth in (3, 1, 4, 2, 3)]
    acc = LoopNormAccumulator(max_loops=5, d_model=D, device="cpu")
    for states in updates:
        acc.update(states)
    metrics = acc.read()
    direct = _direct([[s.float() for s in states] for states in updates], 5)

    assert set(direct) == {1, 2, 3, 4}
    assert not any(key.endswith("/5") for key in metrics), "a loop that never ran must not be reported"
    for k, n in direct.items():
        assert metrics[f"norm/mean/{k}"] == pytest.approx(n.mean().item(), rel=1e-5)
        assert metrics[f"norm/max/{k}"] == pytest.approx(n.max().item(), rel=1e-5)
        assert metrics[f"norm/rms/{k}"] == pytest.approx(math.sqrt((n.square().mean() / D).item()), rel=1e-5)
        exact_p99 = torch.quantile(n, 0.99).item()
        p99 = metrics[f"norm/p99/{k}"]
        assert exact_p99 / HIST_BIN_RATIO <= p99 <= exact_p99 * HIST_BIN_RATIO, (k, p99, exact_p99)
        assert p99 <= metrics[f"norm/max/{k}"]
    for k in (2, 3, 4):
        expected = direct[k].mean() / direct[k - 1].mean()
        assert metrics[f"norm/ratio/{k}"] == pytest.approx(expected.item(), rel=1e-5)
    assert "norm/ratio/1" not in metrics
    # read() resets: the next interval starts empty.
    assert acc.read() == {}


def test_accumulator_p99_tracks_a_heavy_tail():
    """1.5 % of tokens 100x larger: the p99 must sit in the tail, not the bulk."""
    x = torch.ones(1000, D)
    x[:15] *= 100.0
    acc = LoopNormAccumulator(1, D)
    acc.update([x])
    m = acc.read()
    tail = 100.0 * math.sqrt(D)
    assert tail / HIST_BIN_RATIO <= m["norm/p99/1"] <= tail
    assert m["norm/rms/1"] == pytest.approx(math.sqrt((15 * 100.0**2 + 985) / 1000), rel=1e-6)


def test_accumulator_reports_non_finite_states():
    x = torch.ones(2, 4, D)
    x[0, 0, 0] = float("inf")
    acc = LoopNormAccumulator(2, D)
    acc.update([torch.ones(2, 4, D), x])
    m = acc.read()
    assert m["norm/mean/1"] == pytest.approx(math.sqrt(D))
    assert math.isinf(m["norm/max/2"]) and not math.isfinite(m["norm/rms/2"])


def test_accumulator_rejects_bad_input():
    acc = LoopNormAccumulator(2, D)
    with pytest.raises(ValueError, match="max_loops=2"):
        acc.update([torch.ones(1, 1, D)] * 3)
    with pytest.raises(ValueError, match="d_model"):
        acc.update([torch.ones(1, 1, D + 1)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(100 + rank)
    acc = LoopNormAccumulator(3, D)
    acc.update(_states(gen, 3 - rank, [1.0, 5.0 * (rank + 1), 20.0]))
    metrics = acc.read()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(metrics, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_accumulator_merges_ranks_with_one_reduction(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1], "every rank must see the same merged statistics"
    updates = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(100 + rank)
        updates.append(_states(gen, 3 - rank, [1.0, 5.0 * (rank + 1), 20.0]))
    direct = _direct(updates, 3)
    for k, n in direct.items():
        assert results[0][f"norm/mean/{k}"] == pytest.approx(n.mean().item(), rel=1e-5)
        assert results[0][f"norm/max/{k}"] == pytest.approx(n.max().item(), rel=1e-5)
    assert direct[3].numel() == 3 * 17  # loop 3 ran on rank 0 only


# --------------------------------------------------------------------------- rules


def _cfg(**kw) -> MonitorConfig:
    cfg = MonitorConfig(alert_cooldown_steps=100, spike_warmup=20, growth_window=50)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _norms(rms_final: float, loops: int = 4) -> dict[str, float]:
    m = {f"norm/rms/{k}": rms_final * k / loops for k in range(1, loops + 1)}
    m.update({f"norm/ratio/{k}": k / (k - 1) for k in range(2, loops + 1)})
    return m


def _only(events: list[MonitorEvent], rule: str) -> list[MonitorEvent]:
    return [e for e in events if e.rule == rule]


def test_final_rms_needs_patience_then_warns_then_halts():
    mon = TrainingMonitor(_cfg(final_rms=RuleConfig(warn=100.0, halt=1000.0, patience=2, action="halt")), loops=4)
    assert _only(mon.check(10, _norms(50.0)), "final_rms") == []
    assert _only(mon.check(20, _norms(150.0)), "final_rms") == []  # 1 of 2 checks
    (warn,) = _only(mon.check(30, _norms(150.0)), "final_rms")
    assert (warn.level, warn.action) == ("WARN", "alert")
    assert "150" in warn.message and "100" in warn.message and "k=4" in warn.message
    assert "model.readout=final_only" in warn.message and "objective.norm_penalty.weight=0.01" in warn.message
    assert warn.values["rms"] == pytest.approx(150.0) and warn.values["loop"] == 4
    (still_warn,) = _only(mon.check(40, _norms(2000.0)), "final_rms")  # halt streak 1 of 2
    assert still_warn.level == "WARN"
    (halt,) = _only(mon.check(50, _norms(2000.0)), "final_rms")
    assert (halt.level, halt.action) == ("ERROR", "halt")
    assert "2000" in halt.message and "1000" in halt.message


def test_final_rms_uses_the_deepest_loop_that_ran():
    mon = TrainingMonitor(_cfg(final_rms=RuleConfig(warn=10.0, halt=None, patience=1)), loops=4)
    # Only 2 loops ran this interval: loop 2 is the final one.
    (ev,) = _only(mon.check(10, {"norm/rms/1": 1.0, "norm/rms/2": 12.0}), "final_rms")
    assert ev.values["loop"] == 2


@pytest.mark.parametrize("action, expected", [("alert", "alert"), ("log", "log")])
def test_halt_threshold_only_alerts_or_logs_when_the_rule_says_so(action, expected):
    mon = TrainingMonitor(_cfg(final_rms=RuleConfig(warn=100.0, halt=1000.0, patience=1, action=action)), loops=4)
    (ev,) = _only(mon.check(10, _norms(5000.0)), "final_rms")
    assert ev.level == "ERROR" and ev.action == expected


def test_alert_cooldown_rate_limits_but_never_suppresses_a_halt():
    mon = TrainingMonitor(
        _cfg(alert_cooldown_steps=100, final_rms=RuleConfig(warn=100.0, halt=1000.0, patience=1, action="halt")),
        loops=4,
    )
    actions = []
    for step in range(10, 130, 10):
        (ev,) = _only(mon.check(step, _norms(200.0)), "final_rms")
        actions.append((step, ev.action))
    # One alert at step 10, logged events while cooling down, the next alert at 110.
    assert [s for s, a in actions if a == "alert"] == [10, 110]
    assert all(a == "log" for s, a in actions if s not in (10, 110))
    (halt,) = _only(mon.check(130, _norms(5000.0)), "final_rms")
    assert halt.action == "halt", "a halt must never be rate limited"


def test_more_severe_alert_passes_the_cooldown():
    mon = TrainingMonitor(_cfg(final_rms=RuleConfig(warn=100.0, halt=1000.0, patience=1, action="alert")), loops=4)
    assert _only(mon.check(10, _norms(200.0)), "final_rms")[0].action == "alert"
    assert _only(mon.check(20, _norms(200.0)), "final_rms")[0].action == "log"
    escalated = _only(mon.check(30, _norms(2000.0)), "final_rms")[0]
    assert (escalated.level, escalated.action) == ("ERROR", "alert")
    assert _only(mon.check(40, _norms(2000.0)), "final_rms")[0].action == "log"


def test_growth_compares_with_the_value_a_window_ago():
    mon = TrainingMonitor(
        _cfg(growth_window=50, growth=RuleConfig(warn=5.0, halt=50.0, patience=2, action="halt")), loops=4
    )
    fired = {}
    for step in range(0, 200, 10):
        rms = 1.05**step  # x11.5 over 50 steps
        for ev in _only(mon.check(step, {"norm/rms/4": rms}), "growth"):
            fired[step] = ev
    # The first comparison is possible at step 50, patience 2 -> first event at 60.
    assert min(fired) == 60
    ev = fired[60]
    assert ev.level == "WARN" and ev.action == "alert"
    assert ev.values["ratio"] == pytest.approx(1.05**50, rel=1e-6)
    assert ev.values["step_before"] == 10
    # A flat norm never fires.
    flat = TrainingMonitor(_cfg(growth_window=50), loops=4)
    assert not any(_only(flat.check(s, {"norm/rms/4": 300.0}), "growth") for s in range(0, 300, 10))


def test_loop_ratio_fires_on_the_worst_loop_after_patience():
    mon = TrainingMonitor(_cfg(loop_ratio=RuleConfig(warn=4.0, halt=None, patience=3, action="alert")), loops=4)
    metrics = {"norm/ratio/2": 1.2, "norm/ratio/3": 6.0, "norm/ratio/4": 1.1}
    assert _only(mon.check(10, metrics), "loop_ratio") == []
    assert _only(mon.check(20, metrics), "loop_ratio") == []
    (ev,) = _only(mon.check(30, metrics), "loop_ratio")
    assert ev.level == "WARN" and ev.values["loop"] == 3 and "loop 3" in ev.message
    assert "model.recurrence=rmsnorm" in ev.message
    # A check under the threshold resets the patience.
    mon.check(40, {"norm/ratio/2": 1.0})
    assert _only(mon.check(50, metrics), "loop_ratio") == []


@pytest.mark.parametrize(
    "metrics", [{"train/loss": float("nan")}, {"train/loss": 3.0, "train/grad_norm": float("inf")}]
)
def test_nonfinite_halts_at_once(metrics):
    mon = TrainingMonitor(_cfg(), loops=4)
    assert mon.check(1, {"train/loss": 3.0, "train/grad_norm": 1.0}) == []
    (ev,) = _only(mon.check(2, metrics), "nonfinite")
    assert (ev.level, ev.action) == ("ERROR", "halt")
    assert "diverged" in ev.message


def _noisy_losses(n: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (3.0 + 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)).tolist()


def test_loss_spike_after_warmup_and_not_on_noise():
    mon = TrainingMonitor(_cfg(spike_warmup=20, alert_cooldown_steps=10), loops=4)
    losses = _noisy_losses(300)
    # Noise, and a spike before the warmup is over, stay quiet.
    for step, loss in enumerate(losses[:200]):
        if step == 5:
            loss = 10.0
        assert _only(mon.check(step, {"train/loss": loss}), "loss_spike") == [], step
    (ev,) = _only(mon.check(200, {"train/loss": 4.0}), "loss_spike")
    assert ev.level == "WARN" and ev.action == "alert" and ev.values["z"] > 6
    # The spike stayed out of the statistics: a second spike right after it is
    # still seen, and the noise after them is quiet.
    (again,) = _only(mon.check(201, {"train/loss": 4.0}), "loss_spike")
    assert again.values["z"] == pytest.approx(ev.values["z"])
    for step, loss in enumerate(losses[202:260], start=202):
        assert _only(mon.check(step, {"train/loss": loss}), "loss_spike") == [], step


def test_state_dict_round_trip_keeps_patience_and_history():
    cfg = _cfg(
        growth_window=30,
        final_rms=RuleConfig(warn=100.0, halt=1000.0, patience=3, action="halt"),
        growth=RuleConfig(warn=3.0, halt=None, patience=1, action="alert"),
    )
    a = TrainingMonitor(cfg, loops=4)
    for step, rms in ((0, 20.0), (10, 150.0), (20, 160.0)):  # final_rms warn streak 2 of 3
        a.check(step, {"train/loss": 3.0, **_norms(rms)})
    b = TrainingMonitor(cfg, loops=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    step_metrics = {"train/loss": 3.0, **_norms(170.0)}
    events_a, events_b = a.check(30, step_metrics), b.check(30, step_metrics)
    assert [e.to_dict() for e in events_a] == [e.to_dict() for e in events_b]
    # Both the patience (final_rms) and the history (growth: 170 vs 20 at step 0) carried over.
    assert {e.rule for e in events_b} == {"final_rms", "growth"}
    fresh = TrainingMonitor(cfg, loops=4)
    assert fresh.check(30, step_metrics) == []


def test_disabled_monitor_and_rules_stay_quiet():
    off = TrainingMonitor(_cfg(enabled=False), loops=4)
    assert off.check(1, {"train/loss": float("nan"), **_norms(1e6)}) == []
    cfg = _cfg()
    cfg.nonfinite.enabled = False
    assert _only(TrainingMonitor(cfg, loops=4).check(1, {"train/loss": float("nan")}), "nonfinite") == []


def test_bad_rule_config_is_rejected():
    with pytest.raises(ValueError, match="warn threshold .* above halt"):
        TrainingMonitor(_cfg(final_rms=RuleConfig(warn=10.0, halt=5.0)), loops=4)
    with pytest.raises(ValueError, match="patience"):
        TrainingMonitor(_cfg(growth=RuleConfig(patience=0)), loops=4)


def test_config_defaults_and_checks_derive_from_the_rule_records():
    names = [record.name for record in MONITOR_RULES]
    assert len(set(names)) == len(names)
    rule_fields = [f.name for f in fields(MonitorConfig) if f.type in (RuleConfig, "RuleConfig")]
    assert sorted(rule_fields) == sorted(names)
    defaults = MonitorConfig()
    for record in MONITOR_RULES:
        assert getattr(defaults, record.name) == RuleConfig(**record.defaults)
        assert record.watches and record.protects_against
        assert all(isinstance(getattr(defaults, key), int) for _, key in record.settings)
    assert list(TrainingMonitor.rule_checks()) == names  # dispatch follows the records, in their order


def test_a_rule_record_without_a_check_is_refused(monkeypatch):
    extra = MonitorRule("made_up", watches="x", protects_against="y", defaults={})
    monkeypatch.setattr(rules_module, "MONITOR_RULES", (*MONITOR_RULES, extra))
    with pytest.raises(TypeError, match=r"without a check method \['_check_made_up'\]"):
        TrainingMonitor(MonitorConfig(), loops=4)


def test_readme_rule_table_is_the_generated_one():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    header = "| rule | watches | default | protects against |"
    assert readme.count(header) == 1
    start = readme.index(header)
    end = readme.find("\n\n", start)
    assert readme[start:end] == rule_table(), "README's monitor rule table is stale: paste rule_table() into it"
    table = rule_table()
    assert table.count("\n") == len(MONITOR_RULES) + 1
    assert "| `monitor.final_rms` | `norm/rms/{K}` | warn 100, halt 1000, patience 2, action halt |" in table


def test_rule_table_shows_a_recipes_own_settings():
    cfg = MonitorConfig(growth_window=30, growth=RuleConfig(warn=2.0, halt=None, patience=4, action="log"))
    row = next(line for line in rule_table(cfg).splitlines() if line.startswith("| `monitor.growth`"))
    assert "| warn 2, patience 4, action log, window 30 steps |" in row


# --------------------------------------------------------------------------- halt


def test_halt_record_round_trip(tmp_path):
    event = MonitorEvent(
        step=120, rule="nonfinite", level="ERROR", action="halt", message="train/loss=nan", values={"train/loss": math.nan}
    )
    assert read_halt_record(str(tmp_path)) is None
    path = write_halt_record(str(tmp_path), event, step=120, extra={"checkpoint": "ckpt/step_120"})
    assert os.path.basename(path) == "HALTED.json"
    assert os.listdir(tmp_path) == ["HALTED.json"], "no temporary file may be left behind"
    json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    record = read_halt_record(str(tmp_path))
    assert record["rule"] == "nonfinite" and record["step"] == 120 and record["exit_status"] == HALTED == 17
    assert record["message"] == "train/loss=nan" and math.isnan(float(record["values"]["train/loss"]))
    assert record["extra"] == {"checkpoint": "ckpt/step_120"} and record["time"]

    err = RunHalted(event)
    assert err.event is event and err.exit_code == 17 and "nonfinite" in str(err)
