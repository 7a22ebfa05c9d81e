"""The looped language model: embed -> prelude (once) -> core (looped) -> exits.

At every loop k the model records the raw state h_k, reads it out through the
coda and the readout into exit features for the shared LM head, and then
carries it (possibly normalised) into the next loop. Losses, norm penalties
and monitors are computed elsewhere from the returned `LoopOutput`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model import accounting
from looptrain.model.block import TransformerBlock
from looptrain.model.choices import choose
from looptrain.model.core import LoopCore
from looptrain.model.init import initialize
from looptrain.model.positions import POSITIONS
from looptrain.model.readout import build_readout
from looptrain.model.recurrence import build_carry_norm


@dataclass
class LoopOutput:
    """What one forward pass exposes, one entry per executed loop.

    states:      raw carried state h_k (B, T, D) right after loop k, before any
                 inter-loop norm or readout: what norm penalties and monitors see.
    features:    exit-k features (B, T, D), coda + readout applied, ready for the
                 LM head (`logits = features @ head_weight.T`).
    gate_logits: exit-gate logits (B, T) per exit when `model.exit_gate`, else None.
    """

    states: list[torch.Tensor]
    features: list[torch.Tensor]
    gate_logits: Optional[list[torch.Tensor]]


# model.initial_state -> the carried state before the first loop, from the embeddings e
# and model.initial_state_std.
INITIAL_STATES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "embeddings": lambda e, std: e,
    "zeros": lambda e, std: torch.zeros_like(e),
    "noise": lambda e, std: torch.randn_like(e) * std,
}


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        learned_positions = choose(POSITIONS, cfg, "positions").learned_table
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d) if learned_positions else None
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.prelude = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.prelude_layers))
        self.core = LoopCore(cfg)
        self.coda = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.coda_layers))
        self.readout = build_readout(cfg)
        self.carry_norm = build_carry_norm(cfg)
        self.exit_gate = nn.Linear(d, 1) if cfg.exit_gate else None
        self.head = None if cfg.tied_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)

    # ----------------------------------------------------------------- weights

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after `to_empty` from meta."""
        initialize(self, self.cfg.init_std, self.cfg.init)

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, D) LM-head weight; the token embedding itself when the head is tied."""
        return self.tok_embed.weight if self.head is None else self.head.weight

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of exit features (for evaluation and tests; training
        computes chunked cross-entropy from features and `head_weight`)."""
        return F.linear(features, self.head_weight)

    # ----------------------------------------------------------------- forward

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings through the prelude: the e injected into loops."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a (batch, seq) tensor of ids, got shape {tuple(tokens.shape)}")
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or feed shorter sequences"
            )
        x = self.tok_embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(seq_len, device=tokens.device))
        x = self.embed_dropout(x)
        rope = self.core.rope(seq_len)
        for block in self.prelude:
            x = block(x, rope)
        return x

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return choose(INITIAL_STATES, self.cfg, "initial_state")(e, self.cfg.initial_state_std)

    def exit_features(self, h: torch.Tensor, last_exit: bool) -> torch.Tensor:
        """readout(coda(h)): the features the LM head reads at this exit."""
        x = h
        if len(self.coda):
            rope = self.core.rope(h.shape[1])
            for block in self.coda:
                x = block(x, rope)
        return self.readout(x, last_exit)

    def forward(
        self,
        tokens: torch.Tensor,
        depth: Optional[int] = None,
        backprop_loops: Optional[int] = None,
    ) -> LoopOutput:
        """Run `depth` loops (default `model.loops`; more extrapolates).

        With `backprop_loops=n` the first depth-n loops run under `torch.no_grad()`
        (truncated backprop): their states and exits carry no graph, and gradients
        reach the weights only through the last n loops.
        """
        depth = self.cfg.loops if depth is None else depth
        if depth < 1:
            raise ValueError(f"depth must be >= 1 loop, got {depth}")
        if backprop_loops is not None and backprop_loops < 1:
            raise ValueError(f"backprop_loops must be >= 1 (or None for full backprop), got {backprop_loops}")
        detached_loops = 0 if backprop_loops is None else max(depth - backprop_loops, 0)

        e = self.embed(tokens)
        inject = None if self.cfg.injection == "none" else e
        h = self.initial_state(e)
        states: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        gate_logits: Optional[list[torch.Tensor]] = [] if self.exit_gate is not None else None
        for k in range(depth):
            with torch.no_grad() if k < detached_loops else contextlib.nullcontext():
                h = self.core(h, inject)
                states.append(h)
                feats = self.exit_features(h, last_exit=k == depth - 1)
                features.append(feats)
                if gate_logits is not None:
                    gate_logits.append(self.exit_gate(feats).squeeze(-1))
                if self.carry_norm is not None:
                    h = self.carry_norm(h)
        return LoopOutput(states=states, features=features, gate_logits=gate_logits)

    # ------------------------------------------------------------- accounting

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: embeddings, prelude, core, coda, head (0 if tied), other, total."""
        return accounting.parameter_counts(self)

    def flops_per_token(
        self,
        depth: Optional[int] = None,
        seq_len: Optional[int] = None,
        training: bool = True,
        backprop_loops: Optional[int] = None,
        exits: Optional[int] = None,
    ) -> float:
        """Model FLOPs per token; see `looptrain.model.accounting.flops_per_token`."""
        return accounting.flops_per_token(self, depth, seq_len, training, backprop_loops, exits)


def build_model(cfg: ModelConfig) -> LoopedLM:
    """An initialised `LoopedLM` (on the current default device, `meta` included)."""
    model = LoopedLM(cfg)
    model.init_weights()
    return model
