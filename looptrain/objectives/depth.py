"""How many loops a training step runs.

Every rank must run the same depth in a step (sharded parameters are gathered
per block call), so the sampler draws from its own generator seeded
identically on all ranks and advanced once per step; its state is part of the
checkpoint so that a resumed run draws the same depths.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from looptrain.config.schema import DepthConfig


class DepthSampler:
    def __init__(self, cfg: DepthConfig, loops: int, seed: int = 0):
        self.cfg = cfg
        self.min = cfg.min
        self.max = cfg.max if cfg.max is not None else loops
        self.loops = loops
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def sample(self) -> int:
        return DEPTH_MODES[self.cfg.mode](self)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _fixed(sampler: DepthSampler) -> int:
    return sampler.loops


def _uniform(sampler: DepthSampler) -> int:
    return int(torch.randint(sampler.min, sampler.max + 1, (1,), generator=sampler.generator))


def _poisson_lognormal(sampler: DepthSampler) -> int:
    """Poisson with a log-normal rate whose mean is cfg.mean (Huginn-style), clipped to [min, max]."""
    sigma = sampler.cfg.sigma
    mu = math.log(sampler.cfg.mean) - 0.5 * sigma * sigma
    rate = math.exp(mu + sigma * float(torch.randn((), generator=sampler.generator)))
    n = int(torch.poisson(torch.tensor([rate]), generator=sampler.generator))
    return max(sampler.min, min(sampler.max, n))


# objective.depth.mode -> one draw of the step's depth.
DEPTH_MODES: dict[str, Callable[[DepthSampler], int]] = {
    "fixed": _fixed, "uniform": _uniform, "poisson_lognormal": _poisson_lognormal,
}
