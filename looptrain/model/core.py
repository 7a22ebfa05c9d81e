"""The looped core: one call of `LoopCore` is one full loop iteration.

Keeping the whole loop body in a single module call lets activation
checkpointing wrap `model.core` for loop granularity, while block granularity
and FSDP wrap `core.layers[i]` from outside.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.block import TransformerBlock
from looptrain.model.choices import choose
from looptrain.model.injection import build_injection
from looptrain.model.positions import POSITIONS
from looptrain.model.recurrence import build_skip_decay
from looptrain.model.rotary import RotaryTables


class LoopCore(nn.Module):
    """h_k = core(h_{k-1}, e): inject e, run the shared layers, apply the skip decay.

    The RoPE tables live here (the core runs every loop) and are lent to the
    prelude and coda by the model, so there is one copy per model.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.injection = build_injection(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.core_layers))
        self.skip_decay = build_skip_decay(cfg)
        rotary = choose(POSITIONS, cfg, "positions").rotary
        self.rotary = RotaryTables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if rotary else None

    def rope(self, seq_len: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return None if self.rotary is None else self.rotary(seq_len)

    def forward(self, h: torch.Tensor, inject: Optional[torch.Tensor]) -> torch.Tensor:
        rope = self.rope(h.shape[1])
        x = self.injection(h, inject)
        y = x
        for layer in self.layers:
            y = layer(y, rope)
        if self.skip_decay is None:
            return y
        # a * x + (y - x): the loop's update y - x is kept whole, its skip path decays.
        return y - (1.0 - self.skip_decay().to(x.dtype)) * x
