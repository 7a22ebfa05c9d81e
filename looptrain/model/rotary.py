"""Rotary position embeddings (RoPE): precomputed cos/sin tables applied to q and k."""

from __future__ import annotations

import torch
from torch import nn


class RotaryTables(nn.Module):
    """cos/sin tables of shape (max_seq_len, head_dim/2), kept as non-persistent
    buffers: they are a pure function of the config, so checkpoints need not
    carry them, and `reset_parameters` rebuilds them after a meta-device build."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"model.positions: rope needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.cos.device
        half = self.head_dim // 2
        inv_freq = self.theta ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+half}) of x: (B, H, T, head_dim) by the angles of each position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
