"""Divergence rules over the logged metrics: warn early, halt a run that is lost.

Each rule turns the metrics of one check into a value, compares it with the
rule's `warn` and `halt` thresholds from the recipe, and acts once the
threshold has held for `patience` consecutive checks:

  halt crossing -> level ERROR; action halt (rule action "halt"),
                   alert (rule action "alert") or log (rule action "log")
  warn crossing -> level WARN;  action alert (rule action "halt"/"alert") or log

Alerts are rate limited to one per rule per `alert_cooldown_steps`; an alert
inside the cooldown is downgraded to a logged event, unless it is more severe
than the rule's last alert (an ERROR after a WARN still alerts). A halt is
never suppressed. The monitor keeps a little state (patience counters, a short
history of the final-loop RMS, running loss statistics) that `state_dict`
saves as plain JSON so that a resumed run carries on where it stopped.

The rules themselves are declared once, in `looptrain.config.monitor_rules`
(name, metric, purpose, defaults); a rule's check is the method
`_check_<name>` here, applied in the records' order.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional

from looptrain.config.monitor_rules import MONITOR_RULES
from looptrain.config.schema import MonitorConfig, RuleConfig

Level = Literal["INFO", "WARN", "ERROR"]
Action = Literal["log", "alert", "halt"]

_LEVEL_RANK = {"INFO": 0, "WARN": 1, "ERROR": 2}

# Running loss statistics for the spike rule: EMA weight of a new check, the
# checks needed before z-scores mean anything, and how many consecutive spike
# checks are taken as a lasting level shift (the statistics then restart).
SPIKE_EMA_ALPHA = 0.1
SPIKE_MIN_OBSERVATIONS = 8
SPIKE_REBASE_CHECKS = 5

SCALE_CONTROLS = "model.readout=final_only, objective.norm_penalty.weight=0.01 or model.recurrence=rmsnorm"


@dataclass
class MonitorEvent:
    """One rule decision: what happened, how bad, what the run should do."""

    step: int
    rule: str
    level: Level
    action: Action
    message: str
    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MonitorEvent":
        return cls(
            step=int(d["step"]),
            rule=str(d["rule"]),
            level=d["level"],
            action=d["action"],
            message=str(d["message"]),
            values=dict(d.get("values", {})),
        )


@dataclass
class _RuleState:
    warn_streak: int = 0
    halt_streak: int = 0
    last_alert_step: Optional[int] = None
    last_alert_level: Optional[str] = None


def _exceeds(value: float, threshold: Optional[float]) -> bool:
    """Over the threshold; NaN counts as over (a NaN norm is a diverged state)."""
    return threshold is not None and (math.isnan(value) or value > threshold)


def _loop_metrics(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    """{k: value} of the metrics named `prefix/k`."""
    pattern = re.compile(re.escape(prefix) + r"/(\d+)$")
    out = {}
    for key, value in metrics.items():
        m = pattern.match(key)
        if m:
            out[int(m.group(1))] = float(value)
    return out


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


class TrainingMonitor:
    """Applies the recipe's monitor rules (hidden-state norms, non-finite
    values, loss spikes) to the metrics of each check."""

    def __init__(self, cfg: MonitorConfig, loops: int):
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        if cfg.growth_window < 1:
            raise ValueError(f"monitor.growth_window must be >= 1 step, got {cfg.growth_window}")
        self._checks = self.rule_checks()
        for name in self._checks:
            rule: RuleConfig = getattr(cfg, name)
            if rule.patience < 1:
                raise ValueError(f"monitor.{name}.patience must be >= 1 check, got {rule.patience}")
            if rule.warn is not None and rule.halt is not None and rule.warn > rule.halt:
                raise ValueError(
                    f"monitor.{name}: warn threshold {rule.warn} is above halt threshold {rule.halt}; "
                    "warn must be the lower one"
                )
        self.cfg = cfg
        self.loops = loops
        self._rules = {name: _RuleState() for name in self._checks}
        # Final-loop RMS history for the growth rule: loop k -> [[step, rms], ...].
        self._history: dict[int, list[list[float]]] = {}
        # Running loss statistics for the spike rule.
        self._loss_mean = 0.0
        self._loss_var = 0.0
        self._loss_n = 0
        self._spike_run = 0

    @classmethod
    def rule_checks(cls) -> dict[str, str]:
        """{rule name: its check method's name} in MONITOR_RULES order; every
        record needs a check and every check a record."""
        checks = {rule.name: f"_check_{rule.name}" for rule in MONITOR_RULES}
        missing = [method for method in checks.values() if not hasattr(cls, method)]
        unlisted = sorted(set(n for n in dir(cls) if n.startswith("_check_")) - set(checks.values()))
        if missing or unlisted:
            raise TypeError(
                f"monitor rules and checks differ: records without a check method {missing}, check methods "
                f"without a record in looptrain/config/monitor_rules.py {unlisted}"
            )
        return checks

    # ------------------------------------------------------------------ check
    def check(self, step: int, metrics: dict[str, float]) -> list[MonitorEvent]:
        """Apply every enabled rule to this check's metrics; return the events
        (empty when nothing is over a threshold)."""
        if not self.cfg.enabled:
            return []
        events: list[MonitorEvent] = []
        for name, method in self._checks.items():
            if getattr(self.cfg, name).enabled:
                event = getattr(self, method)(step, metrics)
                if event is not None:
                    events.append(event)
        return events

    def _judge(
        self,
        name: str,
        step: int,
        value: float,
        describe: Callable[[str, float, int], str],
        values: dict[str, float],
        *,
        always_halt_level: bool = False,
    ) -> Optional[MonitorEvent]:
        """Update the rule's patience counters with this check's value and
        decide the event, if any. `describe(level_name, threshold, streak)`
        writes the message."""
        rule: RuleConfig = getattr(self.cfg, name)
        state = self._rules[name]
        over_halt = always_halt_level or _exceeds(value, rule.halt)
        over_warn = over_halt or _exceeds(value, rule.warn)
        state.halt_streak = state.halt_streak + 1 if over_halt else 0
        state.warn_streak = state.warn_streak + 1 if over_warn else 0

        if state.halt_streak >= rule.patience:
            level: Level = "ERROR"
            threshold = rule.halt if rule.halt is not None else math.nan
            streak = state.halt_streak
            action: Action = {"halt": "halt", "alert": "alert", "log": "log"}[rule.action]
        elif state.warn_streak >= rule.patience:
            level = "WARN"
            threshold = rule.warn if rule.warn is not None else math.nan
            streak = state.warn_streak
            action = "log" if rule.action == "log" else "alert"
        else:
            return None

        if action == "alert":
            in_cooldown = (
                state.last_alert_step is not None
                and 0 <= step - state.last_alert_step < self.cfg.alert_cooldown_steps
                and _LEVEL_RANK[level] <= _LEVEL_RANK.get(state.last_alert_level or "INFO", 0)
            )
            if in_cooldown:
                action = "log"
            else:
                state.last_alert_step = step
                state.last_alert_level = level
        label = "halt" if level == "ERROR" else "warn"
        message = describe(label, threshold, streak)
        return MonitorEvent(step=step, rule=name, level=level, action=action, message=message, values=values)

    # ------------------------------------------------------------------ rules
    def _check_nonfinite(self, step: int, metrics: dict[str, float]) -> Optional[MonitorEvent]:
        watched = {k: float(metrics[k]) for k in ("train/loss", "train/grad_norm") if k in metrics}
        if not watched:
            return None
        bad = {k: v for k, v in watched.items() if not math.isfinite(v)}
        if not bad:
            state = self._rules["nonfinite"]
            state.warn_streak = state.halt_streak = 0
            return None

        def describe(label: str, threshold: float, streak: int) -> str:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            return (
                f"{what} at step {step}: training diverged. Resume from the last good checkpoint with a lower "
                f"optim.lr or optim.clip_grad_norm=1.0, and add a scale control ({SCALE_CONTROLS})."
            )

        return self._judge("nonfinite", step, math.inf, describe, watched, always_halt_level=True)

    def _check_final_rms(self, step: int, metrics: dict[str, float]) -> Optional[MonitorEvent]:
        rms = _loop_metrics(metrics, "norm/rms")
        if not rms:
            return None
        k = max(rms)
        value = rms[k]

        def describe(label: str, threshold: float, streak: int) -> str:
            return (
                f"final-loop (k={k}) RMS of the raw state is {value:.4g}, above the {label} threshold "
                f"{threshold:g} for {streak} check(s): the hidden-state scale grows unchecked, which a "
                f"scale-invariant readout cannot see. Add a scale control: {SCALE_CONTROLS}."
            )

        return self._judge("final_rms", step, value, describe, {"loop": float(k), "rms": value})

    def _check_growth(self, step: int, metrics: dict[str, float]) -> Optional[MonitorEvent]:
        rms = _loop_metrics(metrics, "norm/rms")
        if not rms:
            return None
        k = max(rms)
        value = rms[k]
        if not math.isfinite(value):
            return None  # final_rms already reports a non-finite state
        window = self.cfg.growth_window
        history = self._history.setdefault(k, [])
        reference = None
        for entry in history:
            if entry[0] <= step - window:
                reference = entry
        # Keep the newest entry at least a window old, and everything newer.
        cut = 0
        for i, entry in enumerate(history):
            if entry[0] <= step - window:
                cut = i
        del history[:cut]
        history.append([float(step), value])
        if reference is None or reference[1] <= 0:
            return None
        ref_step, ref_value = int(reference[0]), reference[1]
        ratio = value / ref_value

        def describe(label: str, threshold: float, streak: int) -> str:
            return (
                f"final-loop (k={k}) RMS grew {ratio:.3g}x in {step - ref_step} steps ({ref_value:.4g} at step "
                f"{ref_step} -> {value:.4g}), above the {label} threshold {threshold:g}x for {streak} check(s): "
                f"the state scale is drifting. Add a scale control: {SCALE_CONTROLS}."
            )

        values = {"loop": float(k), "ratio": ratio, "rms": value, "rms_before": ref_value, "step_before": float(ref_step)}
        return self._judge("growth", step, ratio, describe, values)

    def _check_loop_ratio(self, step: int, metrics: dict[str, float]) -> Optional[MonitorEvent]:
        ratios = _loop_metrics(metrics, "norm/ratio")
        if not ratios:
            return None
        # The worst loop; a NaN ratio is the worst of all.
        k = max(ratios, key=lambda j: math.inf if math.isnan(ratios[j]) else ratios[j])
        value = ratios[k]

        def describe(label: str, threshold: float, streak: int) -> str:
            return (
                f"loop {k} state norm is {value:.3g}x loop {k - 1}'s, above the {label} threshold {threshold:g}x "
                f"for {streak} check(s): each loop inflates the state. Remove scale from the recurrence "
                f"(model.recurrence=rmsnorm or contractive) or add objective.norm_penalty.weight=0.01."
            )

        return self._judge("loop_ratio", step, value, describe, {"loop": float(k), "ratio": value})

    def _check_loss_spike(self, step: int, metrics: dict[str, float]) -> Optional[MonitorEvent]:
        loss = metrics.get("train/loss")
        if not _finite(loss):
            return None  # absent, or the nonfinite rule's business
        loss = float(loss)
        rule = self.cfg.loss_spike
        ready = step >= self.cfg.spike_warmup and self._loss_n >= SPIKE_MIN_OBSERVATIONS
        if not ready:
            self._observe_loss(loss)
            return None
        mean = self._loss_mean
        std = max(math.sqrt(self._loss_var), 1e-3 * abs(mean), 1e-8)
        z = (loss - mean) / std
        lowest = min(t for t in (rule.warn, rule.halt, math.inf) if t is not None)
        if z > lowest:
            # A spike: keep it out of the statistics so that it does not hide the
            # next one, unless it lasts long enough to be the new level.
            self._spike_run += 1
            if self._spike_run > rule.patience + SPIKE_REBASE_CHECKS:
                self._restart_loss_stats(loss)
        else:
            self._spike_run = 0
            self._observe_loss(loss)

        def describe(label: str, threshold: float, streak: int) -> str:
            return (
                f"train/loss {loss:.4g} is {z:.1f} std above its running mean {mean:.4g} (std {std:.3g}), above "
                f"the {label} threshold {threshold:g} for {streak} check(s): check the data near step {step}, "
                f"lower optim.lr or tighten optim.clip_grad_norm."
            )

        values = {"loss": loss, "z": z, "mean": mean, "std": std}
        return self._judge("loss_spike", step, z, describe, values)

    def _observe_loss(self, loss: float) -> None:
        if self._loss_n == 0:
            self._loss_mean, self._loss_var = loss, 0.0
        else:
            delta = loss - self._loss_mean
            self._loss_mean += SPIKE_EMA_ALPHA * delta
            self._loss_var = (1 - SPIKE_EMA_ALPHA) * (self._loss_var + SPIKE_EMA_ALPHA * delta * delta)
        self._loss_n += 1

    def _restart_loss_stats(self, loss: float) -> None:
        self._loss_n = 0
        self._spike_run = 0
        self._observe_loss(loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: patience counters, cooldowns, histories."""
        return {
            "version": 1,
            "rules": {name: asdict(state) for name, state in self._rules.items()},
            "history": {str(k): [list(e) for e in v] for k, v in self._history.items()},
            "loss_stats": {
                "mean": self._loss_mean,
                "var": self._loss_var,
                "n": self._loss_n,
                "spike_run": self._spike_run,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown monitor state version {state.get('version')!r}; expected 1")
        for name, rule_state in state.get("rules", {}).items():
            if name in self._rules:
                self._rules[name] = _RuleState(**rule_state)
        self._history = {int(k): [[float(s), float(v)] for s, v in entries] for k, entries in state["history"].items()}
        stats = state["loss_stats"]
        self._loss_mean = float(stats["mean"])
        self._loss_var = float(stats["var"])
        self._loss_n = int(stats["n"])
        self._spike_run = int(stats["spike_run"])


# ------------------------------------------------------------------ documentation


def rule_table(cfg: Optional[MonitorConfig] = None) -> str:
    """The rules as a Markdown table: what each watches, its settings in `cfg`
    (default: the defaults) and what it protects against. The README's table is
    this text for the defaults (a test keeps them equal); pass a recipe's
    `monitor` section to see the rules as that run applies them."""
    cfg = cfg or MonitorConfig()
    lines = ["| rule | watches | default | protects against |", "|---|---|---|---|"]
    for record in MONITOR_RULES:
        rule: RuleConfig = getattr(cfg, record.name)
        parts = []
        if rule.warn is not None:
            parts.append(f"warn {rule.warn:g}")
        if rule.halt is not None:
            parts.append(f"halt {rule.halt:g}")
        parts += [f"patience {rule.patience}", f"action {rule.action}"]
        parts += [f"{label} {getattr(cfg, key)} steps" for label, key in record.settings]
        cells = [f"`monitor.{record.name}`", f"`{record.watches}`", ", ".join(parts), record.protects_against]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
