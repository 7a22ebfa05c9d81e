"""Per-loop norm statistics, divergence rules, alerts and halting."""

from looptrain.monitor.halt import HALT_FILE, RunHalted, read_halt_record, write_halt_record
from looptrain.monitor.rules import MonitorEvent, NormMonitor, rule_docs, rule_docs_markdown
from looptrain.monitor.stats import LoopNormAccumulator

__all__ = [
    "HALT_FILE",
    "LoopNormAccumulator",
    "MonitorEvent",
    "NormMonitor",
    "RunHalted",
    "read_halt_record",
    "rule_docs",
    "rule_docs_markdown",
    "write_halt_record",
]
