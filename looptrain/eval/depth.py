"""Loss and perplexity at every inference depth, and the scale of every loop.

A looped model can be run at any depth. Its quality at the trained depth K
says little about whether it degrades gracefully below K or keeps improving
(or blows up) beyond it, and the readout blind spot shows up exactly there:
a state whose norm keeps growing can look fine at K and fall apart at 2K.
One pass at the deepest depth D gives every k <= D (see
`looptrain.eval.collect`); the raw state's token norms of the same pass give
the per-loop scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from looptrain.eval.collect import DEFAULT_CHUNK_TOKENS, ExitData, collect_exit_data

NORM_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
PPL_CAP = 50.0  # exp() of a CE above this is reported as exp(50), not inf


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PPL_CAP))


@dataclass
class LoopNorms:
    """Token-wise ||h_k|| of the raw state after loop k on the evaluation data.

    rms is per coordinate, sqrt(mean over tokens of ||h||^2 / d): width
    independent, the number the norm monitor's final_rms rule watches.
    quantiles maps "p01", "p25", ... to token-norm quantiles (for plots).
    """

    loop: int
    mean: float
    max: float
    p99: float
    rms: float
    quantiles: dict[str, float] = field(default_factory=dict)


@dataclass
class DepthResult:
    """Loss per inference depth (one entry per depth in `depths`) and norms per loop.

    loss[i]:      mean CE over target tokens of the model run at depth depths[i].
    exit_loss[i]: CE at exit depths[i] of the deepest pass; equals loss[i] except
                  for final_only readouts (see looptrain.eval.collect).
    norms:        one LoopNorms per loop 1..max(depths).
    """

    depths: list[int]
    loss: list[float]
    ppl: list[float]
    exit_loss: list[float]
    norms: list[LoopNorms]
    tokens: int
    trained_depth: int

    def loss_at(self, depth: int) -> float:
        if depth not in self.depths:
            raise KeyError(f"depth {depth} was not evaluated (evaluated: {self.depths})")
        return self.loss[self.depths.index(depth)]

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile_key(q: float) -> str:
    return f"p{round(q * 100):02d}"


def loop_norm_stats(token_norms: Tensor, d_model: int) -> list[LoopNorms]:
    """Per-loop summary of a (D, M) tensor of token norms."""
    norms = token_norms.double()
    qs = torch.tensor(NORM_QUANTILES, dtype=torch.float64)
    out = []
    for k in range(norms.shape[0]):
        row = norms[k]
        quant = _quantiles(row, qs)
        out.append(
            LoopNorms(
                loop=k + 1,
                mean=float(row.mean()),
                max=float(row.max()),
                p99=float(quant[NORM_QUANTILES.index(0.99)]),
                rms=float(torch.sqrt(row.pow(2).mean() / d_model)),
                quantiles={_quantile_key(q): float(v) for q, v in zip(NORM_QUANTILES, quant)},
            )
        )
    return out


def _quantiles(values: Tensor, qs: Tensor) -> Tensor:
    """Linear-interpolation quantiles of any length (torch.quantile caps its input size)."""
    ordered = values.sort().values
    pos = qs * (ordered.numel() - 1)
    low = pos.floor().long()
    high = pos.ceil().long()
    frac = pos - low
    return ordered[low] * (1 - frac) + ordered[high] * frac


def depth_result(data: ExitData, depths: Optional[Sequence[int]] = None) -> DepthResult:
    """Reduce collected per-token numbers to the depth curve and the loop norms."""
    depths = sorted(set(depths)) if depths else list(range(1, data.depth + 1))
    if depths[0] < 1 or depths[-1] > data.depth:
        raise ValueError(f"depths {depths} must lie in 1..{data.depth}, the depth of the collected pass")
    loss = data.ce_final.double().mean(dim=1)
    exit_loss = data.ce_exit.double().mean(dim=1)
    losses = [float(loss[k - 1]) for k in depths]
    return DepthResult(
        depths=list(depths),
        loss=losses,
        ppl=[perplexity(v) for v in losses],
        exit_loss=[float(exit_loss[k - 1]) for k in depths],
        norms=loop_norm_stats(data.token_norms, data.d_model),
        tokens=data.tokens,
        trained_depth=data.trained_depth,
    )


def evaluate_depths(
    model,
    batches: Iterable[Tensor],
    depths: Sequence[int],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> DepthResult:
    """Loss at every depth in `depths` from one forward at max(depths)."""
    if not depths:
        raise ValueError("depths is empty; pass e.g. [1, 2, 3, 4]")
    data = collect_exit_data(
        model, batches, max(depths), chunk_tokens=chunk_tokens, device=device, precision=precision, with_scores=False
    )
    return depth_result(data, depths)
