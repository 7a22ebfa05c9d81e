"""The grid: the paper's seven conditions, the reduced scale, and one training job per condition and seed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from looptrain.exit_codes import HALTED, OK  # plain constants: importing them loads no torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
PAPER_RECIPES = os.path.join("recipes", "paper", "44m")
DEFAULT_OUT = os.path.join("reports", "repro_small")
TOLERANCE = 0.01  # early exit: perplexity at most 1 % above full depth
MARKER = "repro.json"  # written into a run directory when its training process has ended
PLOT_DPI = 100


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

