"""AdamW parameter groups and learning-rate schedules.

Schedules are pure functions of the step, so resuming needs only the step
counter, and every backend sets the same lr on its optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from looptrain.config.schema import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only, unless decay_norms_and_embeddings is set.

    Norm gains, biases, scalars and embeddings (token and position) are not
    decayed by default: decaying them pulls gains towards zero and embeddings
    towards the origin for no benefit. A tied head shares the embedding, so it
    follows the embedding's group.
    """
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if cfg.decay_norms_and_embeddings or (param.ndim >= 2 and id(param) not in embedding_ids):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimConfig, *, fused: bool | None = None) -> torch.optim.AdamW:
    kwargs = {}
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs
    )


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for the optimizer step `step` (0-based) of `total_steps`."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return base_lr
    min_lr = base_lr * cfg.min_lr_ratio
    if cfg.name == "warmup_cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd: warmup, stable at base_lr, then linear decay over the last decay_fraction of steps.
    decay_steps = max(1, int(round(total_steps * cfg.decay_fraction)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return base_lr + (min_lr - base_lr) * progress
