"""Causal multi-head self-attention on `F.scaled_dot_product_attention`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from looptrain.model.rotary import apply_rotary

RopeTables = Optional[tuple[torch.Tensor, torch.Tensor]]


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection, optional RoPE on q and k, causal SDPA, output projection.

    Dropout acts on the attention probabilities (SDPA's `dropout_p`) while training.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.n_heads: {n_heads} heads do not divide d_model={d_model}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, rope: RopeTables = None) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))
