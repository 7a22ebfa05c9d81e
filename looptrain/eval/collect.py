"""One forward pass at depth D over the evaluation batches, kept per token.

Every evaluation report is a different reduction of the same per-token,
per-exit numbers: the depth curve averages the CE of each exit, the
early-exit policies pick one exit per token from confidence scores, the norm
statistics summarise the raw states. Gathering them once, with one forward at
the deepest depth, gives every depth k <= D for the price of depth D (loop k
does not depend on later loops) and lets every policy and threshold be tried
offline without running the model again.

Logits are formed exit by exit in chunks of tokens, so at most one chunk of
(tokens x vocab) logits per exit is alive at a time, as in training.

Readouts that treat the last exit differently (`final_only`) make "exit k of
a depth-D pass" and "the output of a depth-k model" two different things.
Both are kept: `ce_exit` is the former (what an early-exit decoder reads at an
intermediate exit), `ce_final` the latter (what `model(tokens, depth=k)`
returns at its last exit). For every other readout they are the same tensor.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from looptrain.objectives import IGNORE_INDEX
from looptrain.train_module import split_batch

# Confidence scores kept per token and exit; each lies in [0, 1] and larger
# means "more ready to stop" (see looptrain.eval.exits for their use).
SCORES = ("max_prob", "margin", "logit_margin", "entropy", "kl")
DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class ExitData:
    """Per-token numbers of one depth-D pass over N valid target tokens.

    ce_exit, ce_final: (D, N) cross-entropy in nats (see the module docstring).
    scores:            name -> (D, N) confidence in [0, 1] (SCORES).
    gate_logits:       (D, N) exit-gate logits, or None without a gate.
    token_norms:       (D, M) ||h_k|| of the raw state for every position
                       (M >= N: positions without a target still have a state).
    d_model:           width, to turn norms into per-coordinate RMS.
    trained_depth:     the model's `loops`.
    """

    ce_exit: Tensor
    ce_final: Tensor
    scores: dict[str, Tensor]
    gate_logits: Optional[Tensor]
    token_norms: Tensor
    d_model: int
    trained_depth: int

    @property
    def depth(self) -> int:
        return int(self.ce_final.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.ce_final.shape[1])


def readout_depends_on_last_exit(model) -> bool:
    """True when exit k reads the state differently as the last exit (the readout says so, e.g. final_only)."""
    return model.readout.depends_on_last_exit


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the model's matmuls when asked (logits and losses stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


@torch.no_grad()
def chunk_scores(logp: Tensor, prev_logp: Optional[Tensor]) -> dict[str, Tensor]:
    """Confidences of one exit for a chunk of tokens, from fp32 log-probabilities (n, V).

    max_prob:     p_top1.
    margin:       p_top1 - p_top2.
    logit_margin: 1 - exp(-(z_top1 - z_top2)) = 1 - p_top2 / p_top1, monotone in
                  the logit margin z_top1 - z_top2 (which, unlike the probability
                  margin, keeps growing with the scale of the logits).
    entropy:      1 - H(p) / ln V (1 = one-hot, 0 = uniform).
    kl:           exp(-KL(p_k || p_{k-1})): 1 when this exit agrees with the previous
                  one; 0 at the first exit, which has nothing to agree with.
    """
    p = logp.exp()
    vocab = logp.shape[-1]
    top_logp = logp.topk(min(2, vocab), dim=-1).values  # log-softmax differences are logit differences
    top = top_logp.exp()
    second = top[:, 1] if vocab > 1 else torch.zeros_like(top[:, 0])
    logit_margin = top_logp[:, 0] - top_logp[:, 1] if vocab > 1 else torch.full_like(top[:, 0], math.inf)
    entropy = -(p * logp).sum(dim=-1)
    log_vocab = math.log(vocab) if vocab > 1 else 1.0
    if prev_logp is None:
        kl_conf = torch.zeros_like(entropy)
    else:
        kl = (p * (logp - prev_logp)).sum(dim=-1).clamp_min(0.0)
        kl_conf = torch.exp(-kl)
    return {
        "max_prob": top[:, 0],
        "margin": top[:, 0] - second,
        "logit_margin": 1.0 - torch.exp(-logit_margin),
        "entropy": (1.0 - entropy / log_vocab).clamp(0.0, 1.0),
        "kl": kl_conf,
    }


@torch.no_grad()
def exit_token_numbers(
    model,
    features: Sequence[Tensor],
    final_features: Sequence[Tensor],
    targets: Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_scores: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-token CE at every exit (as exit and as final readout) and the confidences.

    features[k], final_features[k]: (B, T, D); targets (B, T). Only positions
    with a target are returned, in flattened order: ce (D, N), ce_final (D, N),
    scores name -> (D, N).
    """
    weight = model.head_weight.float()
    flat_targets = targets.reshape(-1)
    valid = flat_targets != IGNORE_INDEX
    depth = len(features)
    flat = [f.reshape(-1, f.shape[-1]) for f in features]
    same = all(a is b for a, b in zip(features, final_features))
    flat_final = flat if same else [f.reshape(-1, f.shape[-1]) for f in final_features]
    n = flat_targets.shape[0]
    ce = torch.empty(depth, n, device=weight.device)
    ce_final = ce if same else torch.empty(depth, n, device=weight.device)
    scores = {name: torch.empty(depth, n, device=weight.device) for name in SCORES} if with_scores else {}
    chunk = max(1, int(chunk_tokens))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        tgt = flat_targets[start:stop].clamp_min(0).unsqueeze(1)
        prev_logp = None
        for k in range(depth):
            logp = torch.log_softmax(flat[k][start:stop].float() @ weight.t(), dim=-1)
            ce[k, start:stop] = -logp.gather(1, tgt).squeeze(1)
            if not same:
                logp_final = torch.log_softmax(flat_final[k][start:stop].float() @ weight.t(), dim=-1)
                ce_final[k, start:stop] = -logp_final.gather(1, tgt).squeeze(1)
            if with_scores:
                for name, value in chunk_scores(logp, prev_logp).items():
                    scores[name][k, start:stop] = value
            prev_logp = logp
    keep = valid.nonzero().squeeze(1) if not bool(valid.all()) else None
    if keep is not None:
        ce = ce[:, keep]
        ce_final = ce if same else ce_final[:, keep]
        scores = {name: s[:, keep] for name, s in scores.items()}
    return ce, ce_final, scores


def final_readout_features(model, states: Sequence[Tensor], features: Sequence[Tensor]) -> list[Tensor]:
    """Exit features as each exit would read the state if it were the last one."""
    if not readout_depends_on_last_exit(model):
        return list(features)
    last = len(states) - 1
    return [features[k] if k == last else model.exit_features(h, last_exit=True) for k, h in enumerate(states)]


def token_norms(states: Sequence[Tensor]) -> Tensor:
    """(D, B*T) fp32 token-wise L2 norm of each loop's raw state."""
    return torch.stack([h.float().norm(dim=-1).reshape(-1) for h in states])


@torch.no_grad()
def collect_exit_data(
    model,
    batches: Iterable[Tensor],
    depth: int,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    with_scores: bool = True,
) -> ExitData:
    """Run `model` at `depth` over (B, T+1) token batches; keep per-token numbers on the host."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    device = torch.device(device)
    model.eval()
    parts: dict[str, list[Tensor]] = {"ce": [], "ce_final": [], "gate": [], "norms": []}
    score_parts: dict[str, list[Tensor]] = {name: [] for name in SCORES} if with_scores else {}
    has_gate = getattr(model, "exit_gate", None) is not None
    for batch in batches:
        tokens, targets = split_batch(batch)
        tokens, targets = tokens.to(device), targets.to(device)
        with autocast_context(device, precision):
            out = model(tokens, depth=depth)
            final = final_readout_features(model, out.states, out.features)
        ce, ce_final, scores = exit_token_numbers(model, out.features, final, targets, chunk_tokens, with_scores)
        parts["ce"].append(ce.cpu())
        parts["ce_final"].append(ce_final.cpu() if ce_final is not ce else None)
        parts["norms"].append(token_norms(out.states).cpu())
        if has_gate:
            valid = targets.reshape(-1) != IGNORE_INDEX
            gate = torch.stack([g.float().reshape(-1)[valid] for g in out.gate_logits])
            parts["gate"].append(gate.cpu())
        for name in score_parts:
            score_parts[name].append(scores[name].cpu())
    if not parts["ce"]:
        raise ValueError("no evaluation batches: the validation split is empty or --batches is 0")
    ce = torch.cat(parts["ce"], dim=1)
    ce_final = ce if parts["ce_final"][0] is None else torch.cat(parts["ce_final"], dim=1)
    return ExitData(
        ce_exit=ce,
        ce_final=ce_final,
        scores={name: torch.cat(p, dim=1) for name, p in score_parts.items()},
        gate_logits=torch.cat(parts["gate"], dim=1) if has_gate else None,
        token_norms=torch.cat(parts["norms"], dim=1),
        d_model=int(model.cfg.d_model),
        trained_depth=int(model.cfg.loops),
    )
