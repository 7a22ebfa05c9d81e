"""The monitor rules, declared once: one record per rule.

Everything else derives from `MONITOR_RULES`: the defaults of the recipe's
`monitor.<name>` keys (`schema.MonitorConfig`), the order in which
`looptrain.monitor.rules.TrainingMonitor` applies the rules (its check for a
rule is its method `_check_<name>`), and the README's rule table
(`looptrain.monitor.rules.rule_table`, which a test compares with the README).

The records live in `config` rather than `monitor` because the recipe schema,
one layer below the monitor, takes its defaults from them; they import nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MonitorRule:
    """One divergence rule: its recipe key `monitor.<name>`, the metric it
    watches, what it protects against, and its default `RuleConfig` fields."""

    name: str
    watches: str
    protects_against: str
    defaults: dict[str, Any]  # RuleConfig fields: warn, halt, patience, action
    # (label, MonitorConfig key) of the rule's own settings, in steps, shown with its defaults.
    settings: tuple[tuple[str, str], ...] = field(default=())


# In the order the monitor applies them (and the order of its events in one check).
MONITOR_RULES: tuple[MonitorRule, ...] = (
    MonitorRule(
        "nonfinite",
        watches="train/loss, train/grad_norm",
        protects_against="NaN/inf: the run has diverged; halts at once",
        defaults=dict(patience=1, action="halt"),
    ),
    MonitorRule(
        "final_rms",
        watches="norm/rms/{K}",
        protects_against="the final loop's raw state growing without bound while a scale-invariant readout hides "
        "it from the loss",
        defaults=dict(warn=100.0, halt=1000.0, patience=2),
    ),
    MonitorRule(
        "growth",
        watches="norm/rms/{K} now / growth_window steps ago",
        protects_against="a steady drift of the state scale, caught long before it reaches an absolute threshold",
        defaults=dict(warn=5.0, halt=50.0, patience=2, action="alert"),
        settings=(("window", "growth_window"),),
    ),
    MonitorRule(
        "loop_ratio",
        watches="max_k norm/ratio/{k}",
        protects_against="a recurrence that inflates the state from one loop to the next (deeper inference would "
        "explode)",
        defaults=dict(warn=4.0, halt=None, patience=3, action="alert"),
    ),
    MonitorRule(
        "loss_spike",
        watches="z-score of train/loss vs its running mean/std (after spike_warmup steps)",
        protects_against="sudden loss spikes from bad batches, too high a learning rate or an instability starting",
        defaults=dict(warn=6.0, halt=None, patience=1, action="alert"),
        settings=(("warmup", "spike_warmup"),),
    ),
)

MONITOR_RULE_BY_NAME: dict[str, MonitorRule] = {rule.name: rule for rule in MONITOR_RULES}
