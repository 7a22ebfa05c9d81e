"""One transformer block: attention then SwiGLU, each in a residual branch.

prenorm:  h = h + attn(norm(h));        h = h + mlp(norm(h))
sandwich: h = h + norm(attn(norm(h)));  h = h + norm(mlp(norm(h)))   (Huginn / Ouro)

Because each branch reads a normalised input, its output is bounded whatever
the size of h: a residual recurrence therefore adds a bounded, but never
self-cancelling, update to the state every loop.
"""

from __future__ import annotations

import torch
from torch import nn

from looptrain.config.schema import ModelConfig
from looptrain.model.attention import CausalSelfAttention, RopeTables
from looptrain.model.choices import choose
from looptrain.model.mlp import SwiGLU
from looptrain.model.norms import build_norm

# model.block_style -> whether each branch's output is normalised too (sandwich).
NORMALISED_BRANCH_OUTPUTS = {"prenorm": False, "sandwich": True}


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.bias)
        normalise_outputs = choose(NORMALISED_BRANCH_OUTPUTS, cfg, "block_style")
        self.attn_out_norm = build_norm(cfg) if normalise_outputs else nn.Identity()
        self.mlp_out_norm = build_norm(cfg) if normalise_outputs else nn.Identity()
        # Residual dropout on the MLP branch only, as in the AR-LoopLM reference
        # model (its attention branch drops attention probabilities instead).
        self.mlp_dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, rope: RopeTables = None) -> torch.Tensor:
        h = h + self.attn_out_norm(self.attn(self.attn_norm(h), rope))
        return h + self.mlp_dropout(self.mlp_out_norm(self.mlp(self.mlp_norm(h))))
