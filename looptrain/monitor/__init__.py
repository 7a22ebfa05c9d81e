"""Per-loop norm statistics, divergence rules, alerts and halting."""

from looptrain.monitor.halt import HALT_FILE, RunHalted, read_halt_record, write_halt_record
from looptrain.monitor.rules import MonitorEvent, TrainingMonitor, rule_table


def __getattr__(name: str):
    # Lazy for start-up time: the statistics need torch; the rules, halt records
    # and events (read by `looptrain plot` and `status`) do not.
    if name == "LoopNormAccumulator":
        from looptrain.monitor.stats import LoopNormAccumulator

        return LoopNormAccumulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HALT_FILE",
    "LoopNormAccumulator",
    "MonitorEvent",
    "RunHalted",
    "TrainingMonitor",
    "read_halt_record",
    "rule_table",
    "write_halt_record",
]
