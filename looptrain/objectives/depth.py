"""How many loops a training step runs.

Every rank must run the same depth in a step (sharded parameters are gathered
per block call), so the sampler draws from its own generator seeded
identically on all ranks and advanced once per step; its state is part of the
checkpoint so that a resumed run draws the same depths.
"""

from __future__ import annotations

import math

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
        mode = self.cfg.mode
        if mode == "fixed":
            return self.loops
        if mode == "uniform":
            return int(torch.randint(self.min, self.max + 1, (1,), generator=self.generator))
        # Poisson with a log-normal rate whose mean is cfg.mean (Huginn-style).
        sigma = self.cfg.sigma
        mu = math.log(self.cfg.mean) - 0.5 * sigma * sigma
        rate = math.exp(mu + sigma * float(torch.randn((), generator=self.generator)))
        n = int(torch.poisson(torch.tensor([rate]), generator=self.generator))
        return max(self.min, min(self.max, n))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
