"""The recipe schema: every key a recipe may set, with its type and default.

Each section is a plain dataclass so that code receives typed, documented
objects rather than dictionaries. `looptrain.config.loader` turns YAML (with
`base:` inheritance and dotted overrides) into a `Recipe`, checking every key
and type against these classes; `Recipe.validate()` then rejects combinations
that cannot work, with a message that says why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from looptrain.config.monitor_rules import MONITOR_RULE_BY_NAME


class RecipeError(ValueError):
    """A recipe is wrong. The message names the key and what to do about it."""


# ---------------------------------------------------------------- value ranges

# Upper bounds on sizes that allocate memory: a width of 1e20 passes any type
# check and fails much later, inside the model's constructor.
MAX_WIDTH = 2**17
MAX_LAYERS = 10_000
MAX_TOKENS = 2**24  # vocabulary size, sequence length
MAX_SEED = 2**32 - 1  # numpy and mosaicml-streaming take 32-bit seeds


@dataclass(frozen=True)
class Range:
    """The values a numeric recipe key accepts: optional bounds, and always finite.

    Declared once per field, in the field's metadata (see `bounded`); for a list
    field it applies to every item, and None passes where the field is Optional.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    why: str = ""  # what the bound protects, appended to the message

    def describe(self, integer: bool) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        kind = "an integer" if integer else "a finite number"
        if low and high:
            return f"{kind} in {low}, {high}"
        if low:
            return f"{kind} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{kind} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return kind

    def holds(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def bounded(default: Any = None, *, factory: Any = None, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None, why: str = "") -> Any:
    """A dataclass field whose value (or each item of it) must lie in a `Range`."""
    meta = {"range": Range(ge=ge, gt=gt, le=le, lt=lt, why=why)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_ranges(config: Any, prefix: str) -> None:
    """Check every numeric field of `config` and its nested sections against its `Range`.

    Every float is checked finite, ranged or not; the message names the key,
    the value and the values allowed.
    """
    for f in fields(config):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(config, f.name)
        if is_dataclass(value):
            check_ranges(value, key)
            continue
        if isinstance(value, (list, tuple)) and value and all(is_dataclass(item) for item in value):
            for i, item in enumerate(value):  # e.g. data.streams
                check_ranges(item, f"{key}[{i}]")
            continue
        rng = f.metadata.get("range", Range())
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not rng.holds(item):
                where = f"{key}[{i}]" if items is value else key
                why = f" ({rng.why})" if rng.why else ""
                raise RecipeError(f"{where}: must be {rng.describe(isinstance(item, int))}{why}, got {item!r}")


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The looped LM: prelude layers (once) -> core layers (looped) -> coda layers.

    The paper's AR-LoopLM is prelude 0, core N, coda 0, no injection, state
    starting at the token+position embeddings, learned positions, tied head.
    """

    vocab_size: int = bounded(20000, ge=1, le=MAX_TOKENS)
    d_model: int = bounded(512, ge=1, le=MAX_WIDTH)
    n_heads: int = bounded(8, ge=1, le=MAX_WIDTH)
    prelude_layers: int = bounded(0, ge=0, le=MAX_LAYERS)
    core_layers: int = bounded(8, ge=1, le=MAX_LAYERS, why="the looped core needs at least one layer")
    coda_layers: int = bounded(0, ge=0, le=MAX_LAYERS)
    loops: int = bounded(4, ge=1, le=MAX_LAYERS, why="the loop count")  # trained depth K: how many times the core runs
    max_seq_len: int = bounded(256, ge=1, le=MAX_TOKENS)
    mlp_ratio: float = bounded(4.0, gt=0, le=256)  # SwiGLU hidden = mlp_ratio * d_model
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = bounded(1e-5, gt=0, le=1)
    block_style: Literal["prenorm", "sandwich"] = "prenorm"
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = bounded(10000.0, gt=0)
    tied_embeddings: bool = True
    dropout: float = bounded(0.0, ge=0, lt=1)
    bias: bool = False
    init_std: float = bounded(0.02, gt=0)
    # normal: N(0, init_std) for linears and embeddings. torch_default: PyTorch's
    # own initialisers (embeddings N(0, 1), linears U(+-1/sqrt(fan_in))), as the
    # paper's code does -- it changes how fast the hidden-state norm grows.
    init: Literal["normal", "torch_default"] = "normal"
    # How the input embedding enters each loop.
    injection: Literal["none", "add", "concat", "contractive"] = "none"
    # What the carried state starts as before the first loop.
    initial_state: Literal["embeddings", "zeros", "noise"] = "embeddings"
    initial_state_std: float = bounded(1.0, ge=0)  # std of the noise initial state
    # Scale control 1: how each exit reads the state.
    readout: Literal["rmsnorm", "raw", "final_only", "alpha"] = "rmsnorm"
    alpha_init: float = bounded(0.5, ge=0, le=1)  # alpha readout: output scale s_ref^(1-a) * s^a
    alpha_ref_rms: float = bounded(1.0, gt=0)  # s_ref of the alpha readout
    # Scale control 3: what happens to the carried state between loops.
    recurrence: Literal["residual", "rmsnorm", "contractive"] = "residual"
    # Exit gate (Ouro-style), needed by objective.supervision == exit_gated.
    exit_gate: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    def validate(self) -> None:
        """Reject model configs that cannot build or cannot learn, naming the key and the fix.

        Called for every recipe and again by the model's constructor, so that a
        config built in code gets the same messages as one read from YAML.
        """

        def bad(key: str, why: str) -> None:
            raise RecipeError(f"model.{key}: {why}")

        check_ranges(self, "model")
        if self.d_model % self.n_heads:
            bad("n_heads", f"{self.n_heads} heads do not divide d_model={self.d_model}; pick a divisor of d_model")
        if self.positions == "rope" and self.head_dim % 2:
            bad("positions", f"rope needs an even head dimension, got d_model/n_heads={self.head_dim}")
        if self.mlp_hidden < 1:
            bad("mlp_ratio", f"gives a SwiGLU hidden width of {self.mlp_hidden}; use a larger ratio")
        for key, allowed in _MODEL_CHOICES.items():
            if getattr(self, key) not in allowed:
                bad(key, f"unknown value {getattr(self, key)!r}; use one of {', '.join(allowed)}")
        if self.initial_state != "embeddings" and self.injection == "none":
            bad(
                "injection",
                f"with initial_state={self.initial_state} and no injection the tokens never reach the core; "
                "set model.injection to add, concat or contractive, or model.initial_state=embeddings",
            )


def literal_choices(config: type) -> dict[str, tuple[Any, ...]]:
    """{key: allowed values} for every `Literal` key of a config dataclass.

    The `Literal` types above are the one list of each set of choices: the
    loader checks recipes against them, `validate` checks configs built in
    code, and the model's builder tables are tested against them.
    """
    hints = get_type_hints(config)
    return {key: get_args(hint) for key, hint in hints.items() if get_origin(hint) is Literal}


# Checked again at run time: a ModelConfig built in code bypasses the loader's Literal checks.
_MODEL_CHOICES = literal_choices(ModelConfig)


# ------------------------------------------------------------------- objective


@dataclass
class NormPenaltyConfig:
    """Scale control 2: a penalty on the raw pre-norm state after each loop.

    mean_sq: weight * mean_k mean(h_k^2)   (the paper, weight 0.01)
    anchor:  weight * mean_k (RMS(h_k) - target)^2
    """

    weight: float = bounded(0.0, ge=0)
    form: Literal["mean_sq", "anchor"] = "mean_sq"
    target: float = bounded(1.0, ge=0)


@dataclass
class DepthConfig:
    """How many loops run in a training step.

    fixed: always model.loops. uniform: integer in [min, max] each step.
    poisson_lognormal: Huginn-style, n ~ Poisson(exp(N(log(mean) - sigma^2/2, sigma))),
    clipped to [min, max].
    """

    mode: Literal["fixed", "uniform", "poisson_lognormal"] = "fixed"
    min: int = bounded(1, ge=1, le=MAX_LAYERS)
    max: Optional[int] = bounded(None, ge=1, le=MAX_LAYERS)  # default: model.loops
    mean: float = bounded(4.0, gt=0)
    sigma: float = bounded(0.5, ge=0)


@dataclass
class ObjectiveConfig:
    supervision: Literal["terminal", "per_loop", "exit_gated"] = "per_loop"
    loop_weights: Optional[list[float]] = bounded(None, ge=0)  # per_loop: one weight per exit
    gate_entropy_beta: float = bounded(0.05, ge=0)  # exit_gated: the beta of -beta * H(p)
    norm_penalty: NormPenaltyConfig = field(default_factory=NormPenaltyConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    backprop_loops: Optional[int] = bounded(None, ge=1)  # truncate backprop to the last n loops
    ce_chunk_tokens: int = bounded(8192, ge=1)  # tokens per chunk of the per-exit cross-entropy


# ------------------------------------------------------------------------ data


@dataclass
class StreamConfig:
    """One prepared dataset of a mixture: a local directory or a remote URI (s3://, gs://, hf://, ...).

    At most one weight: `proportion` (share of each epoch; all streams or
    none, summing to 1), `repeat` (epochs of this stream per epoch) or
    `choose` (samples per epoch). `name` labels its validation metrics
    (default: the last path component).
    """

    path: str = ""
    name: Optional[str] = None
    proportion: Optional[float] = bounded(None, gt=0, le=1)
    repeat: Optional[float] = bounded(None, gt=0)
    choose: Optional[int] = bounded(None, ge=1)


@dataclass
class DataConfig:
    """A prepared dataset directory (made by `looptrain prepare`), or a mixture of streams.

    Layout: DIR/tokenizer.model, DIR/dataset.json, DIR/train/ and DIR/val/
    MDS shards of token sequences of length model.max_seq_len + 1.
    `streams`, when given, replaces `dir` (which is the one-stream shorthand).
    Remote streams are cached in `cache_dir` (default: a directory per job
    under TMPDIR).
    """

    dir: str = "data/quickstart"
    shuffle: bool = True
    shuffle_seed: int = bounded(1234, ge=0, le=MAX_SEED)
    num_workers: int = bounded(0, ge=0, le=1024)
    num_canonical_nodes: Optional[int] = bounded(None, ge=1)
    predownload: Optional[int] = bounded(None, ge=1)
    streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None
    download_timeout: float = bounded(60.0, gt=0, why="seconds")


# ---------------------------------------------------------------------- optim


@dataclass
class ScheduleConfig:
    """constant | warmup_cosine | wsd (warmup, stable, decay)."""

    name: Literal["constant", "warmup_cosine", "wsd"] = "constant"
    warmup_steps: int = bounded(0, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio
    decay_fraction: float = bounded(0.2, ge=0, le=1)  # wsd: share of steps spent decaying


@dataclass
class OptimConfig:
    lr: float = bounded(3e-4, gt=0)
    betas: list[float] = bounded(factory=lambda: [0.9, 0.95], ge=0, lt=1)
    eps: float = bounded(1e-8, ge=0)
    weight_decay: float = bounded(0.01, ge=0)
    decay_norms_and_embeddings: bool = False
    clip_grad_norm: Optional[float] = bounded(1.0, ge=0, why="0 or null: no clipping")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ----------------------------------------------------------------------- train


@dataclass
class ProfileConfig:
    """A torch.profiler trace of steps start+1 .. start+steps on every rank (steps 0: off)."""

    start: int = bounded(10, ge=0)  # steps to run before the traced window
    steps: int = bounded(0, ge=0, why="0 disables profiling")


@dataclass
class TrainConfig:
    steps: int = bounded(1000, ge=1)
    micro_batch_size: int = bounded(8, ge=1)  # sequences per device per micro-step
    grad_accum: int = bounded(1, ge=1)
    # Sequences per optimizer step over all ranks. When set it must equal
    # micro_batch_size * grad_accum * data-parallel size; it keeps the global
    # batch fixed when the world size changes.
    global_batch_size: Optional[int] = bounded(None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = bounded(10, ge=1)
    # Peak TFLOP/s per device that MFU is reported against. Default: the
    # vendor's dense number for a known GPU; no MFU on CPU unless set.
    peak_tflops: Optional[float] = bounded(None, gt=0, why="TFLOP/s per device")
    # Intra-op CPU threads per rank: auto (OMP_NUM_THREADS, else Slurm's CPUs
    # per task, else available cores / local ranks; see looptrain.threads) or N.
    threads: Union[Literal["auto"], int] = bounded("auto", ge=1, why="or auto")
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # RUN_DIR/profile/
    memory_snapshot: bool = False  # RUN_DIR/memory/: CUDA snapshot (GPU) or peak report (CPU)
    val_every: int = bounded(200, ge=0, why="0 disables validation")
    val_batches: int = bounded(20, ge=1)
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    deterministic: bool = False  # bit-identical reruns at some speed cost: see looptrain/determinism.py


# -------------------------------------------------------------------- parallel


@dataclass
class ParallelConfig:
    backend: Literal["single", "fsdp2", "deepspeed"] = "single"
    replicate: int = bounded(1, ge=1)  # fsdp2: HSDP replica groups (2-D mesh) when > 1
    zero_stage: int = bounded(2, ge=0, le=3, why="the DeepSpeed ZeRO stage")  # deepspeed
    activation_checkpointing: Literal["none", "block", "loop"] = "none"
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp2 mixed precision compute dtype
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # fsdp2: re-gather looped blocks at every call (saves memory) instead of keeping
    # them gathered from first use to the end of the step (one all-gather per step).
    reshard_looped_blocks: bool = False
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DS config
    timeout_minutes: int = bounded(30, ge=1)


# ------------------------------------------------------------------ checkpoint


@dataclass
class CheckpointConfig:
    every: int = bounded(0, ge=0)  # steps between checkpoints; 0 = only at the end and on halt/preemption
    keep_last: int = bounded(2, ge=1, why="so that a run can always resume")
    keep_every: int = bounded(0, ge=0)  # also keep every checkpoint whose step is a multiple of this
    save_async: bool = False
    resume: str = "auto"  # auto | none | PATH
    save_final: bool = True


# --------------------------------------------------------------------- monitor


@dataclass
class RuleConfig:
    """One monitor rule: a threshold, how many consecutive checks it must
    hold (patience) and what to do (log | alert | halt)."""

    enabled: bool = True
    warn: Optional[float] = bounded(None, ge=0)
    halt: Optional[float] = bounded(None, ge=0)
    patience: int = bounded(1, ge=1, why="consecutive checks before the action")
    action: Literal["log", "alert", "halt"] = "halt"


def _rule_field(name: str) -> Any:
    """The field of monitor rule `name`, with the defaults of its record in MONITOR_RULES."""
    return field(default_factory=lambda: RuleConfig(**MONITOR_RULE_BY_NAME[name].defaults))


@dataclass
class MonitorConfig:
    enabled: bool = True  # rules are checked at every log interval (train.log_every)
    # One RuleConfig per rule of config/monitor_rules.py, which declares what it watches and its defaults.
    final_rms: RuleConfig = _rule_field("final_rms")
    growth: RuleConfig = _rule_field("growth")
    growth_window: int = bounded(200, ge=1)
    loop_ratio: RuleConfig = _rule_field("loop_ratio")
    nonfinite: RuleConfig = _rule_field("nonfinite")
    loss_spike: RuleConfig = _rule_field("loss_spike")
    spike_warmup: int = bounded(50, ge=0)
    alert_cooldown_steps: int = bounded(500, ge=0)  # rate limit: one alert per rule per this many steps


# -------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "looptrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> str:
        import os

        return os.path.join(self.out_dir, self.name)

    def validate(self) -> "Recipe":
        """Reject combinations that cannot work, saying why."""
        m, o = self.model, self.objective

        def bad(key: str, why: str) -> None:
            raise RecipeError(f"{key}: {why}")

        check_ranges(self, "")
        check_run_name(self.name)
        m.validate()

        if o.supervision == "exit_gated" and not m.exit_gate:
            bad("objective.supervision", "exit_gated needs a learned exit gate: set model.exit_gate=true")
        max_depth = o.depth.max if o.depth.max is not None else m.loops
        if max_depth < o.depth.min:
            bad("objective.depth.max", f"max depth {max_depth} is below min depth {o.depth.min}")
        if o.depth.mode == "fixed" and o.depth.max is not None and o.depth.max != m.loops:
            bad("objective.depth.max", "a fixed depth always runs model.loops loops; drop depth.max or use mode=uniform")
        if o.loop_weights is not None:
            if o.supervision != "per_loop":
                bad("objective.loop_weights", "only per_loop supervision uses loop weights")
            if len(o.loop_weights) != m.loops or o.depth.mode != "fixed":
                bad(
                    "objective.loop_weights",
                    f"needs exactly one weight per exit ({m.loops}) and a fixed depth; got {len(o.loop_weights)} weights",
                )
            if sum(o.loop_weights) <= 0:
                bad("objective.loop_weights", "weights must be >= 0 with a positive sum")
        if o.backprop_loops is not None and not 1 <= o.backprop_loops <= max_depth:
            bad(
                "objective.backprop_loops",
                f"truncated backprop over {o.backprop_loops} loops must be between 1 and the loop count ({max_depth})",
            )
        if len(self.optim.betas) != 2:
            bad("optim.betas", f"needs two values [beta1, beta2], got {self.optim.betas}")
        for rule_name, rule in vars(self.monitor).items():
            thresholds = (rule.warn, rule.halt) if isinstance(rule, RuleConfig) else (None, None)
            if None not in thresholds and rule.warn > rule.halt:
                bad(f"monitor.{rule_name}.warn", f"warn threshold {rule.warn} is above halt threshold {rule.halt}; "
                    "warn must be the lower one")
        return self


_SAFE_NAME = re.compile(r"[A-Za-z0-9._+=,@%-]+")


def check_run_name(name: str) -> None:
    """A run name becomes one directory under out_dir: it must be a single, plain path component.

    `..`, `a/b` or `/abs` would put the run (and whatever `--overwrite`-like
    retention later deletes) outside out_dir.
    """
    if name in ("", ".", "..") or not _SAFE_NAME.fullmatch(name) or name.startswith("-"):
        raise RecipeError(
            f"name: {name!r} is not a single directory name; use letters, digits and . _ - + = , @ % "
            f"(not '.', '..' or a leading '-', no '/'), e.g. name=run1"
        )


def check_world_size(recipe: "Recipe", world: int, where: str = "") -> None:
    """Reject a recipe that cannot run on `world` ranks (all data-parallel).

    Called before workers start or jobs are queued (`train --nproc`, `launch`)
    and again by the trainer with the real world size. `where` says where the
    ranks come from (e.g. "2 node(s) x 4 rank(s)"), for the message.
    """
    ranks = f"{where} = {world} ranks" if where else f"{world} ranks"
    if world > 1 and recipe.parallel.backend == "single":
        raise RecipeError(
            f"{ranks}, but parallel.backend=single runs one process: add parallel.backend=fsdp2 "
            "(or deepspeed), or run one rank"
        )
    t = recipe.train
    got = t.micro_batch_size * t.grad_accum * world
    if t.global_batch_size is not None and t.global_batch_size != got:
        per_rank, rest = divmod(t.global_batch_size, world)
        if rest:
            fix = f"pick a train.global_batch_size divisible by {world} ranks"
        elif per_rank % t.micro_batch_size == 0:
            fix = f"set train.grad_accum={per_rank // t.micro_batch_size}"
        else:
            fix = f"set train.micro_batch_size={per_rank} train.grad_accum=1"
        raise RecipeError(
            f"train.global_batch_size={t.global_batch_size} but micro_batch_size {t.micro_batch_size} x grad_accum "
            f"{t.grad_accum} x {world} ranks = {got}: {fix}"
        )
