"""Parameter counts and model FLOPs of a `LoopedLM`.

FLOPs follow the usual convention (Kaplan et al., PaLM): a matmul with a weight
of N entries costs 2N FLOPs per token forward and 3x that forward + backward;
attention scores and the weighted sum cost 2 * 2 * T * d per layer per token
forward, counted over the full T x T square (no causal halving), so the
numbers compare directly with PaLM-style MFU figures. Embedding lookups, norms
and element-wise ops are not counted. A looped model pays the core, the coda,
the injection and the exit gate once per executed loop, the LM head once per
exit that is read (every loop under per-loop supervision, the last one under
terminal supervision), the prelude once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import nn

if TYPE_CHECKING:
    from looptrain.model.looped_lm import LoopedLM


def _numel(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _matmul_weights(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def parameter_counts(model: "LoopedLM") -> dict[str, int]:
    """embeddings (token + learned positions), prelude, core (the looped layers),
    coda, head (0 when tied), other (readout, carry norm, injection, skip decay,
    exit gate), total (unique parameters: a tied head counts once)."""
    counts = {
        "embeddings": _numel(model.tok_embed) + _numel(model.pos_embed),
        "prelude": _numel(model.prelude),
        "core": _numel(model.core.layers),
        "coda": _numel(model.coda),
        "head": _numel(model.head),
    }
    total = sum(p.numel() for p in model.parameters())
    counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def flops_per_token(
    model: "LoopedLM",
    depth: Optional[int] = None,
    seq_len: Optional[int] = None,
    training: bool = True,
    backprop_loops: Optional[int] = None,
    exits: Optional[int] = None,
) -> float:
    """Model FLOPs per token for one forward (training=False) or one training step.

    depth defaults to `model.loops`, seq_len to `model.max_seq_len`. Under
    truncated backprop (`backprop_loops=n`) the first depth-n loops run forward
    only (1x instead of 3x). `exits` is how many of the last loops feed the LM
    head (default: all; terminal supervision: 1).
    """
    cfg = model.cfg
    depth = cfg.loops if depth is None else depth
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    exits = depth if exits is None else min(exits, depth)
    attention = 4 * seq_len * cfg.d_model  # QK^T and AV, per layer per token
    once = 2 * _matmul_weights(model.prelude) + attention * len(model.prelude)
    per_loop = (
        2 * (_matmul_weights(model.core) + _matmul_weights(model.coda) + _matmul_weights(model.exit_gate))
        + attention * (len(model.core.layers) + len(model.coda))
    )
    head = 2 * model.head_weight.numel()
    if not training:
        return float(once + depth * per_loop + exits * head)
    forward_only = 0 if backprop_loops is None else max(depth - backprop_loops, 0)
    backprop_exits = min(exits, depth - forward_only)
    return float(
        3 * once
        + (3 * (depth - forward_only) + forward_only) * per_loop
        + (3 * backprop_exits + (exits - backprop_exits)) * head
    )
