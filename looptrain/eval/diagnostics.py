"""Scale diagnostics: can the loss see the state's norm, and does the norm matter?

Radial gradient share
    For a scale-invariant readout (RMSNorm), <dL/dh, h> = 0: the gradient has
    no component along h, so training cannot shrink ||h||. The share of the
    gradient that is radial, |<g, h>| / (||g|| ||h||) averaged over tokens, is
    measured at every loop for two losses: the CE of that loop's own exit
    (~0 for an RMSNorm readout, up to its eps: about eps / (mean(h^2) + eps))
    and the mean CE over all exits, whose gradient also flows through the
    later loops (a residual recurrence makes those scale-sensitive again).

Radial clamp
    An inference-time intervention: re-run the loops and remove from each
    loop's update u = core(h) - h the component parallel to the loop input h,
    so the loops can rotate the state but not stretch or shrink it. The loss
    change per depth says how much the model relies on the radial part of its
    updates. When the recurrence and the readout both discard scale, removing
    a small radial part is close to a rescaling that nothing downstream sees.
    The first loop (embeddings -> first state) is left alone by default, as in
    the published intervention; there the "update" builds the state rather than
    refining it. The anchor is the loop's input (the carried state after any
    inter-loop norm), which for a residual recurrence is the previous raw state.

Norm histograms
    Log-spaced histograms of the token-wise ||h_k|| per loop, from the same
    pass as the depth curve.

The loops are re-run here with the model's own parts (`embed`,
`initial_state`, `core`, `exit_features`, `carry_norm`) in the order of
`LoopedLM.forward`; `run_loops(..., clamp=False)` reproduces the model's own
forward exactly, which the tests check, so a change to the forward that is
not mirrored here fails loudly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from looptrain.eval.collect import (
    DEFAULT_CHUNK_TOKENS,
    autocast_context,
    exit_token_numbers,
    final_readout_features,
)
from looptrain.model import LoopOutput
from looptrain.objectives import IGNORE_INDEX, mean_token_ce
from looptrain.train_module import split_batch

_TINY = 1e-30


# ------------------------------------------------------------------ radial share


@dataclass
class RadialShares:
    """Mean over tokens of |cos(dL/dh_k, h_k)| for every loop k = 1..depth."""

    exit_loss: list[float]  # L = CE at exit k
    total_loss: list[float]  # L = mean CE over all exits (the per-loop objective)
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def radial_cosines(grad: Tensor, state: Tensor) -> Tensor:
    """Token-wise |<g, h>| / (||g|| ||h||), flattened; NaN where g or h is zero."""
    g = grad.double().reshape(-1, grad.shape[-1])
    h = state.double().reshape(-1, state.shape[-1])
    denom = g.norm(dim=-1) * h.norm(dim=-1)
    cos = (g * h).sum(dim=-1).abs() / denom.clamp_min(_TINY)
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))


def radial_gradient_shares(
    model,
    batches: Iterable[Tensor],
    depth: Optional[int] = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: str | torch.device = "cpu",
) -> RadialShares:
    """Radial share of dL/dh_k per loop, for the exit-k loss and the all-exit loss.

    Runs in fp32 with gradients enabled; only the states' gradients are
    computed (parameters are left untouched).
    """
    depth = depth or model.cfg.loops
    device = torch.device(device)
    model.eval()
    sums = torch.zeros(2, depth, dtype=torch.float64)
    counts = torch.zeros(2, depth, dtype=torch.float64)
    tokens_seen = 0
    for batch in batches:
        tokens, targets = split_batch(batch)
        tokens, targets = tokens.to(device), targets.to(device)
        with torch.enable_grad():
            out = model(tokens, depth=depth)
            losses = [mean_token_ce(f, model.head_weight, targets, chunk_tokens) for f in out.features]
            own = [
                torch.autograd.grad(loss, h, retain_graph=True)[0] for loss, h in zip(losses, out.states)
            ]
            total = torch.autograd.grad(torch.stack(losses).mean(), out.states)
        valid = (targets != IGNORE_INDEX).reshape(-1).cpu()
        tokens_seen += int(valid.sum())
        for row, grads in enumerate((own, total)):
            for k, (g, h) in enumerate(zip(grads, out.states)):
                cos = radial_cosines(g.detach(), h.detach()).cpu()
                keep = valid & ~torch.isnan(cos)
                sums[row, k] += cos[keep].sum()
                counts[row, k] += keep.sum()
    if tokens_seen == 0:
        raise ValueError("no evaluation tokens: the batches are empty")
    means = (sums / counts.clamp_min(1)).tolist()
    return RadialShares(exit_loss=means[0], total_loss=means[1], tokens=tokens_seen)


# ------------------------------------------------------------------ radial clamp


def remove_radial(h_in: Tensor, h_out: Tensor) -> Tensor:
    """h_in + (u minus its component along h_in), u = h_out - h_in; per token, in fp32.

    Tokens whose input is exactly zero (a zero initial state) have no radial
    direction and keep their update.
    """
    x = h_in.float()
    u = h_out.float() - x
    sq = x.pow(2).sum(dim=-1, keepdim=True)
    coef = (u * x).sum(dim=-1, keepdim=True) / sq.clamp_min(_TINY)
    coef = torch.where(sq > 0, coef, torch.zeros_like(coef))
    return (x + u - coef * x).to(h_out.dtype)


def run_loops(
    model,
    tokens: Tensor,
    depth: Optional[int] = None,
    *,
    clamp: bool = False,
    clamp_first_loop: bool = False,
) -> LoopOutput:
    """The model's forward, loop by loop, optionally with the radial clamp on each loop's update."""
    cfg = model.cfg
    depth = depth or cfg.loops
    e = model.embed(tokens)
    inject = None if cfg.injection == "none" else e
    h = model.initial_state(e)
    states: list[Tensor] = []
    features: list[Tensor] = []
    gate_logits: Optional[list[Tensor]] = [] if model.exit_gate is not None else None
    for k in range(depth):
        h_out = model.core(h, inject)
        if clamp and (k > 0 or clamp_first_loop):
            h_out = remove_radial(h, h_out)
        states.append(h_out)
        feats = model.exit_features(h_out, last_exit=k == depth - 1)
        features.append(feats)
        if gate_logits is not None:
            gate_logits.append(model.exit_gate(feats).squeeze(-1))
        h = model.carry_norm(h_out) if model.carry_norm is not None else h_out
    return LoopOutput(states=states, features=features, gate_logits=gate_logits)


@dataclass
class ClampResult:
    """Loss at every inference depth 1..D with and without the radial clamp."""

    depths: list[int]
    loss: list[float]
    loss_clamped: list[float]
    rel_change: list[float]  # (clamped - plain) / plain
    norm_mean: list[float]  # mean token ||h_k|| per loop, plain
    norm_mean_clamped: list[float]
    clamp_first_loop: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def radial_clamp_effect(
    model,
    batches: Iterable[Tensor],
    depth: Optional[int] = None,
    *,
    clamp_first_loop: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> ClampResult:
    depth = depth or model.cfg.loops
    device = torch.device(device)
    model.eval()
    sums = torch.zeros(2, depth, dtype=torch.float64)
    norm_sums = torch.zeros(2, depth, dtype=torch.float64)
    n_tokens = 0
    n_positions = 0
    for batch in batches:
        tokens, targets = split_batch(batch)
        tokens, targets = tokens.to(device), targets.to(device)
        for row, clamp in enumerate((False, True)):
            with autocast_context(device, precision):
                out = run_loops(model, tokens, depth, clamp=clamp, clamp_first_loop=clamp_first_loop)
                final = final_readout_features(model, out.states, out.features)
            _, ce_final, _ = exit_token_numbers(model, out.features, final, targets, chunk_tokens, with_scores=False)
            sums[row] += ce_final.double().sum(dim=1).cpu()
            norm_sums[row] += torch.stack([h.float().norm(dim=-1).double().sum() for h in out.states]).cpu()
            if row == 0:
                n_tokens += ce_final.shape[1]
                n_positions += tokens.numel()
    if n_tokens == 0:
        raise ValueError("no evaluation tokens: the batches are empty")
    loss = (sums[0] / n_tokens).tolist()
    clamped = (sums[1] / n_tokens).tolist()
    return ClampResult(
        depths=list(range(1, depth + 1)),
        loss=loss,
        loss_clamped=clamped,
        rel_change=[(c - p) / p if p else float("nan") for p, c in zip(loss, clamped)],
        norm_mean=(norm_sums[0] / n_positions).tolist(),
        norm_mean_clamped=(norm_sums[1] / n_positions).tolist(),
        clamp_first_loop=clamp_first_loop,
    )


# -------------------------------------------------------------------- histograms


@dataclass
class NormHistogram:
    """Counts of token norms per loop in log-spaced bins shared by all loops."""

    edges: list[float]  # bins + 1 edges
    counts: list[list[int]]  # one row of `bins` counts per loop

    def to_dict(self) -> dict:
        return asdict(self)


def norm_histograms(token_norms: Tensor, bins: int = 48) -> NormHistogram:
    """Histogram a (D, M) tensor of token norms; zero norms land in the first bin."""
    norms = token_norms.double()
    positive = norms[norms > 0]
    if positive.numel() == 0:
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    else:
        low, high = float(positive.min()), float(positive.max())
        if high <= low:
            low, high = low * 0.5, high * 2.0
        edges = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), bins + 1,
                               dtype=torch.float64)
    counts = []
    for row in norms:
        idx = torch.bucketize(row, edges[1:-1], right=True)
        counts.append(torch.bincount(idx, minlength=bins).tolist())
    return NormHistogram(edges=edges.tolist(), counts=counts)


# ------------------------------------------------------------------------ bundle


@dataclass
class Diagnostics:
    radial: RadialShares
    clamp: ClampResult
    histogram: Optional[NormHistogram]

    def to_dict(self) -> dict:
        return asdict(self)


def run_diagnostics(
    model,
    batches: Sequence[Tensor],
    depth: Optional[int] = None,
    *,
    token_norms: Optional[Tensor] = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: str | bool = False,
) -> Diagnostics:
    """All three diagnostics on the same batches (a list: it is read twice).

    progress: a label for a progress bar per diagnostic (stderr), or False."""
    from looptrain.eval.progress import progress_bar

    def bar(what: str) -> Iterable[Tensor]:
        return progress_bar(batches, f"{progress}: {what}", "batch", bool(progress))

    return Diagnostics(
        radial=radial_gradient_shares(model, bar("radial gradient"), depth, chunk_tokens=chunk_tokens,
                                      device=device),
        clamp=radial_clamp_effect(model, bar("radial clamp"), depth, chunk_tokens=chunk_tokens, device=device,
                                  precision=precision),
        histogram=norm_histograms(token_norms) if token_norms is not None else None,
    )
