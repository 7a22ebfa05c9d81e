"""Per-loop statistics of the raw hidden-state norm, accumulated on device.

Why: the readout blind spot lets ||h_k|| grow without the loss noticing, so the
norms themselves must be watched. They are accumulated every micro-step
without a host sync (only in-place tensor ops on a few small device buffers),
and read once per log interval with one SUM and one MAX all-reduce followed by
a single transfer to the host.

The high quantile (p99) comes from a fixed log-spaced histogram of token
norms: histograms add across micro-steps and ranks, so the merged histogram
gives the quantile of all tokens of the interval on all ranks, to within one
bin (a relative width of `HIST_BIN_RATIO - 1`, about 7.5 %).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# Token norms outside [HIST_LOW, HIST_HIGH] land in the edge bins.
HIST_LOW = 1e-3
HIST_HIGH = 1e9
HIST_BINS_PER_DECADE = 32
HIST_BINS = HIST_BINS_PER_DECADE * round(math.log10(HIST_HIGH / HIST_LOW))
HIST_BIN_RATIO = 10.0 ** (1.0 / HIST_BINS_PER_DECADE)  # upper / lower edge of one bin

QUANTILE = 0.99


class LoopNormAccumulator:
    """Accumulates count, sum, sum of squares, max and a histogram of the
    token-wise L2 norm ||h_k|| for each loop k of the raw (pre-norm) state.

    `update` is cheap and sync-free; `read` is a collective when
    torch.distributed is initialised: every rank must call it at the same step.
    """

    def __init__(self, max_loops: int, d_model: int, device: torch.device | str = "cpu"):
        if max_loops < 1:
            raise ValueError(f"max_loops must be >= 1, got {max_loops}")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.max_loops = max_loops
        self.d_model = d_model
        self.device = torch.device(device)
        L = max_loops
        # One float64 buffer reduced with SUM: [count | sum | sumsq | hist(L*bins)];
        # float64 keeps counts exact and sums precise over long intervals.
        self._sums = torch.zeros(3 * L + L * HIST_BINS, dtype=torch.float64, device=self.device)
        self._max = torch.zeros(L, dtype=torch.float64, device=self.device)  # norms are >= 0
        self._log_low = math.log(HIST_LOW)
        self._inv_log_step = HIST_BINS_PER_DECADE / math.log(10.0)
        # Offsets that send loop k's bin b to position k*bins + b of the flat histogram.
        self._hist_offsets = torch.arange(L, device=self.device).mul_(HIST_BINS).unsqueeze(1)
        self._ones_cache = torch.ones(0, dtype=torch.float64, device=self.device)

    # ----------------------------------------------------------------- views
    @property
    def _count(self) -> torch.Tensor:
        return self._sums[: self.max_loops]

    @property
    def _sum(self) -> torch.Tensor:
        return self._sums[self.max_loops : 2 * self.max_loops]

    @property
    def _sumsq(self) -> torch.Tensor:
        return self._sums[2 * self.max_loops : 3 * self.max_loops]

    @property
    def _hist(self) -> torch.Tensor:
        return self._sums[3 * self.max_loops :]

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, states: Sequence[torch.Tensor]) -> None:
        """Add one micro-step's per-loop raw states (each (..., D), any dtype).

        `states[i]` is the state after loop i+1; a step that ran fewer loops
        passes fewer states and the loops it skipped are left untouched.
        """
        n = len(states)
        if n == 0:
            return
        if n > self.max_loops:
            raise ValueError(
                f"got {n} loop states but the accumulator was built for max_loops={self.max_loops}; "
                "build it with the largest depth the run can execute"
            )
        for s in states:
            if s.shape[-1] != self.d_model:
                raise ValueError(f"state width {s.shape[-1]} does not match d_model={self.d_model}")
        # (n, tokens) fp32 norms; vector_norm upcasts inside the reduction, so a
        # bf16 state is never copied to fp32 in full.
        norms = torch.stack(
            [torch.linalg.vector_norm(s.detach().reshape(-1, self.d_model), dim=-1, dtype=torch.float32) for s in states]
        )
        tokens = norms.shape[1]
        self._count[:n] += tokens
        self._sum[:n] += norms.sum(dim=1, dtype=torch.float64)
        self._sumsq[:n] += norms.square().sum(dim=1, dtype=torch.float64)
        self._max[:n] = torch.maximum(self._max[:n], norms.amax(dim=1).double())
        # Log-spaced bin of each token norm; non-finite norms go to the top bin.
        bins = norms.clamp_min(HIST_LOW).log_().sub_(self._log_low).mul_(self._inv_log_step)
        bins = torch.nan_to_num(bins, nan=HIST_BINS - 1, posinf=HIST_BINS - 1)
        bins = bins.clamp_(0, HIST_BINS - 1).long()
        bins += self._hist_offsets[:n]
        self._hist.index_add_(0, bins.flatten(), self._ones(bins.numel()))

    def _ones(self, n: int) -> torch.Tensor:
        """A cached vector of ones (the histogram increments), grown when needed."""
        if self._ones_cache.numel() < n:
            self._ones_cache = torch.ones(n, dtype=torch.float64, device=self.device)
        return self._ones_cache[:n]

    # ------------------------------------------------------------------ read
    def read(self, group: Optional[object] = None) -> dict[str, float]:
        """Reduce across ranks, return the `norm/*` metrics and reset.

        Keys (1-based loop k, only loops that ran in the interval):
        norm/mean/k, norm/max/k, norm/p99/k (token-wise ||h_k||),
        norm/rms/k (sqrt(mean ||h_k||^2 / d): the per-coordinate RMS),
        norm/ratio/k (mean ||h_k|| / mean ||h_{k-1}||, k >= 2).
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        values = torch.cat([self._sums, self._max]).tolist()
        self.reset()

        L = self.max_loops
        count, total, total_sq = values[:L], values[L : 2 * L], values[2 * L : 3 * L]
        hist_flat = values[3 * L : 3 * L + L * HIST_BINS]
        maxima = values[3 * L + L * HIST_BINS :]
        metrics: dict[str, float] = {}
        means: dict[int, float] = {}
        for i in range(L):
            if count[i] <= 0:
                continue
            k = i + 1
            means[k] = total[i] / count[i]
            metrics[f"norm/mean/{k}"] = means[k]
            metrics[f"norm/max/{k}"] = maxima[i]
            metrics[f"norm/p99/{k}"] = min(
                histogram_quantile(hist_flat[i * HIST_BINS : (i + 1) * HIST_BINS], QUANTILE), maxima[i]
            )
            metrics[f"norm/rms/{k}"] = math.sqrt(max(total_sq[i], 0.0) / count[i] / self.d_model)
        for k in means:
            if k - 1 in means:
                prev = means[k - 1]
                metrics[f"norm/ratio/{k}"] = means[k] / prev if prev > 0 else math.inf
        return metrics

    def finite(self) -> bool:
        """Whether every state accumulated since the last read had a finite norm
        (one host sync; called when a checkpoint is judged, not per step)."""
        return bool(torch.isfinite(self._sums).all() and torch.isfinite(self._max).all())

    def reset(self) -> None:
        self._sums.zero_()
        self._max.zero_()


def histogram_quantile(hist: Sequence[float], q: float) -> float:
    """The q-quantile of values binned by the fixed log-spaced histogram,
    interpolated geometrically inside the bin that holds it."""
    total = float(sum(hist))
    if total <= 0:
        return math.nan
    target = q * total
    cumulative = 0.0
    for b, c in enumerate(hist):
        if c > 0 and cumulative + c >= target:
            fraction = (target - cumulative) / c
            return HIST_LOW * HIST_BIN_RATIO ** (b + fraction)
        cumulative += c
    return HIST_LOW * HIST_BIN_RATIO ** len(hist)
