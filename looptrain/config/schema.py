"""The recipe schema: every key a recipe may set, with its type and default.

Each section is a plain dataclass so that code receives typed, documented
objects rather than dictionaries. `looptrain.config.loader` turns YAML (with
`base:` inheritance and dotted overrides) into a `Recipe`, checking every key
and type against these classes; `Recipe.validate()` then rejects combinations
that cannot work, with a message that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class RecipeError(ValueError):
    """A recipe is wrong. The message names the key and what to do about it."""


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The looped LM: prelude layers (once) -> core layers (looped) -> coda layers.

    The paper's AR-LoopLM is prelude 0, core N, coda 0, no injection, state
    starting at the token+position embeddings, learned positions, tied head.
    """

    vocab_size: int = 20000
    d_model: int = 512
    n_heads: int = 8
    prelude_layers: int = 0
    core_layers: int = 8
    coda_layers: int = 0
    loops: int = 4  # trained depth K: how many times the core runs
    max_seq_len: int = 256
    mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * d_model
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    block_style: Literal["prenorm", "sandwich"] = "prenorm"
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    tied_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    init_std: float = 0.02
    # normal: N(0, init_std) for linears and embeddings. torch_default: PyTorch's
    # own initialisers (embeddings N(0, 1), linears U(+-1/sqrt(fan_in))), as the
    # paper's code does -- it changes how fast the hidden-state norm grows.
    init: Literal["normal", "torch_default"] = "normal"
    # How the input embedding enters each loop.
    injection: Literal["none", "add", "concat", "contractive"] = "none"
    # What the carried state starts as before the first loop.
    initial_state: Literal["embeddings", "zeros", "noise"] = "embeddings"
    initial_state_std: float = 1.0  # std of the noise initial state
    # Scale control 1: how each exit reads the state.
    readout: Literal["rmsnorm", "raw", "final_only", "alpha"] = "rmsnorm"
    alpha_init: float = 0.5  # alpha readout: output scale s_ref^(1-a) * s^a
    alpha_ref_rms: float = 1.0  # s_ref of the alpha readout
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

        for key in ("vocab_size", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.loops < 1:
            bad("loops", f"the loop count must be >= 1, got {self.loops}")
        if self.core_layers < 1:
            bad("core_layers", f"the looped core needs at least one layer, got {self.core_layers}")
        if self.prelude_layers < 0 or self.coda_layers < 0:
            bad("prelude_layers/coda_layers", "must be >= 0")
        if self.d_model % self.n_heads:
            bad("n_heads", f"{self.n_heads} heads do not divide d_model={self.d_model}; pick a divisor of d_model")
        if self.positions == "rope" and self.head_dim % 2:
            bad("positions", f"rope needs an even head dimension, got d_model/n_heads={self.head_dim}")
        if self.mlp_hidden < 1:
            bad("mlp_ratio", f"gives a SwiGLU hidden width of {self.mlp_hidden}; use a larger ratio")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.alpha_init <= 1.0:
            bad("alpha_init", f"must be in [0, 1], got {self.alpha_init}")
        if self.init_std <= 0:
            bad("init_std", f"must be > 0, got {self.init_std}")
        for key, allowed in _MODEL_CHOICES.items():
            if getattr(self, key) not in allowed:
                bad(key, f"unknown value {getattr(self, key)!r}; use one of {', '.join(allowed)}")
        if self.initial_state != "embeddings" and self.injection == "none":
            bad(
                "injection",
                f"with initial_state={self.initial_state} and no injection the tokens never reach the core; "
                "set model.injection to add, concat or contractive, or model.initial_state=embeddings",
            )


# Checked again at run time: a ModelConfig built in code bypasses the loader's Literal checks.
_MODEL_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "block_style": ("prenorm", "sandwich"),
    "positions": ("learned", "rope"),
    "injection": ("none", "add", "concat", "contractive"),
    "initial_state": ("embeddings", "zeros", "noise"),
    "readout": ("rmsnorm", "raw", "final_only", "alpha"),
    "recurrence": ("residual", "rmsnorm", "contractive"),
    "init": ("normal", "torch_default"),
}


# ------------------------------------------------------------------- objective


@dataclass
class NormPenaltyConfig:
    """Scale control 2: a penalty on the raw pre-norm state after each loop.

    mean_sq: weight * mean_k mean(h_k^2)   (the paper, weight 0.01)
    anchor:  weight * mean_k (RMS(h_k) - target)^2
    """

    weight: float = 0.0
    form: Literal["mean_sq", "anchor"] = "mean_sq"
    target: float = 1.0


@dataclass
class DepthConfig:
    """How many loops run in a training step.

    fixed: always model.loops. uniform: integer in [min, max] each step.
    poisson_lognormal: Huginn-style, n ~ Poisson(exp(N(log(mean) - sigma^2/2, sigma))),
    clipped to [min, max].
    """

    mode: Literal["fixed", "uniform", "poisson_lognormal"] = "fixed"
    min: int = 1
    max: Optional[int] = None  # default: model.loops
    mean: float = 4.0
    sigma: float = 0.5


@dataclass
class ObjectiveConfig:
    supervision: Literal["terminal", "per_loop", "exit_gated"] = "per_loop"
    loop_weights: Optional[list[float]] = None  # per_loop: one weight per exit
    gate_entropy_beta: float = 0.05  # exit_gated: the beta of -beta * H(p)
    norm_penalty: NormPenaltyConfig = field(default_factory=NormPenaltyConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    backprop_loops: Optional[int] = None  # truncate backprop to the last n loops
    ce_chunk_tokens: int = 8192  # tokens per chunk of the per-exit cross-entropy


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
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None


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
    shuffle_seed: int = 1234
    num_workers: int = 0
    num_canonical_nodes: Optional[int] = None
    predownload: Optional[int] = None
    streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None
    download_timeout: float = 60.0


# ---------------------------------------------------------------------- optim


@dataclass
class ScheduleConfig:
    """constant | warmup_cosine | wsd (warmup, stable, decay)."""

    name: Literal["constant", "warmup_cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_norms_and_embeddings: bool = False
    clip_grad_norm: Optional[float] = 1.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ----------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    # Sequences per optimizer step over all ranks. When set it must equal
    # micro_batch_size * grad_accum * data-parallel size; it keeps the global
    # batch fixed when the world size changes.
    global_batch_size: Optional[int] = None
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10
    # Peak TFLOP/s per device that MFU is reported against. Default: the
    # vendor's dense number for a known GPU, a measured matmul peak on CPU.
    peak_tflops: Optional[float] = None
    val_every: int = 200
    val_batches: int = 20
    seed: int = 0
    deterministic: bool = False


# -------------------------------------------------------------------- parallel


@dataclass
class ParallelConfig:
    backend: Literal["single", "fsdp2", "deepspeed"] = "single"
    replicate: int = 1  # fsdp2: HSDP replica groups (2-D mesh) when > 1
    zero_stage: int = 2  # deepspeed
    activation_checkpointing: Literal["none", "block", "loop"] = "none"
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp2 mixed precision compute dtype
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # fsdp2: re-gather looped blocks at every call (saves memory) instead of keeping
    # them gathered from first use to the end of the step (one all-gather per step).
    reshard_looped_blocks: bool = False
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DS config
    timeout_minutes: int = 30


# ------------------------------------------------------------------ checkpoint


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end and on halt/preemption
    keep_last: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this
    save_async: bool = False
    resume: str = "auto"  # auto | none | PATH
    save_final: bool = True


# --------------------------------------------------------------------- monitor


@dataclass
class RuleConfig:
    """One monitor rule: a threshold, how many consecutive checks it must
    hold (patience) and what to do (log | alert | halt)."""

    enabled: bool = True
    warn: Optional[float] = None
    halt: Optional[float] = None
    patience: int = 1
    action: Literal["log", "alert", "halt"] = "halt"


@dataclass
class MonitorConfig:
    enabled: bool = True  # rules are checked at every log interval (train.log_every)
    # Final-loop RMS of the raw state (per coordinate, width independent).
    final_rms: RuleConfig = field(default_factory=lambda: RuleConfig(warn=100.0, halt=1000.0, patience=2))
    # Growth of the final-loop RMS over a window of steps (ratio).
    growth: RuleConfig = field(default_factory=lambda: RuleConfig(warn=5.0, halt=50.0, patience=2, action="alert"))
    growth_window: int = 200
    # Loop-to-loop growth ratio ||h_k|| / ||h_{k-1}|| (max over k).
    loop_ratio: RuleConfig = field(default_factory=lambda: RuleConfig(warn=4.0, halt=None, patience=3, action="alert"))
    # Non-finite loss or gradient norm.
    nonfinite: RuleConfig = field(default_factory=lambda: RuleConfig(patience=1, action="halt"))
    # Loss spike: z-score of the loss against an running mean / std.
    loss_spike: RuleConfig = field(default_factory=lambda: RuleConfig(warn=6.0, halt=None, patience=1, action="alert"))
    spike_warmup: int = 50
    alert_cooldown_steps: int = 500  # rate limit: one alert per rule per this many steps


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
        m, o, t = self.model, self.objective, self.train

        def bad(key: str, why: str) -> None:
            raise RecipeError(f"{key}: {why}")

        m.validate()

        if o.supervision == "exit_gated" and not m.exit_gate:
            bad("objective.supervision", "exit_gated needs a learned exit gate: set model.exit_gate=true")
        max_depth = o.depth.max if o.depth.max is not None else m.loops
        if o.depth.min < 1:
            bad("objective.depth.min", f"must be >= 1, got {o.depth.min}")
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
            if any(w < 0 for w in o.loop_weights) or sum(o.loop_weights) <= 0:
                bad("objective.loop_weights", "weights must be >= 0 with a positive sum")
        if o.backprop_loops is not None and not 1 <= o.backprop_loops <= max_depth:
            bad(
                "objective.backprop_loops",
                f"truncated backprop over {o.backprop_loops} loops must be between 1 and the loop count ({max_depth})",
            )
        if o.norm_penalty.weight < 0:
            bad("objective.norm_penalty.weight", f"must be >= 0, got {o.norm_penalty.weight}")
        if o.ce_chunk_tokens < 1:
            bad("objective.ce_chunk_tokens", "must be >= 1")

        for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "val_batches"):
            if getattr(t, key) < 1:
                bad(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
        if t.peak_tflops is not None and not t.peak_tflops > 0:
            bad("train.peak_tflops", f"must be > 0 (TFLOP/s per device), got {t.peak_tflops}")
        if t.val_every < 0:
            bad("train.val_every", "must be >= 0 (0 disables validation)")
        if self.optim.lr <= 0:
            bad("optim.lr", f"must be > 0, got {self.optim.lr}")
        if len(self.optim.betas) != 2:
            bad("optim.betas", "needs two values [beta1, beta2]")
        if self.parallel.replicate < 1:
            bad("parallel.replicate", "must be >= 1")
        if self.parallel.zero_stage not in (0, 1, 2, 3):
            bad("parallel.zero_stage", f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {self.parallel.zero_stage}")
        if self.checkpoint.keep_last < 1:
            bad("checkpoint.keep_last", "must be >= 1 so that a run can always resume")
        if not self.name or "/" in self.name:
            bad("name", f"a run name must be non-empty without '/', got {self.name!r}")
        return self


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
