"""Per-loop supervision, norm penalties, depth sampling."""

from looptrain.objectives.chunked_ce import IGNORE_INDEX, chunked_cross_entropy, weighted_exits_cross_entropy
from looptrain.objectives.depth import DepthSampler
from looptrain.objectives.supervision import (
    ObjectiveResult,
    compute_objective,
    exit_distribution,
    head_exits,
    mean_token_ce,
    norm_penalty,
)

__all__ = [
    "IGNORE_INDEX", "DepthSampler", "ObjectiveResult", "chunked_cross_entropy", "compute_objective",
    "exit_distribution", "head_exits", "mean_token_ce", "norm_penalty", "weighted_exits_cross_entropy",
]
