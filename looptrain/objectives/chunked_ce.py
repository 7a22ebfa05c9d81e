"""Token-chunked cross-entropy that never holds a full-vocabulary logit tensor.

A looped model has K exits, and each exit's logits are (tokens x vocab). For the
paper's 44M model (vocab 20000, batch 64 x 256) one exit's fp32 logits are
1.3 GB; keeping K of them alive for backward is what makes per-loop supervision
expensive. This autograd function computes the per-token loss chunk by chunk,
keeps only the log-sum-exp per token, and recomputes each chunk's logits in
backward. Peak extra memory is one chunk of logits; the cost is one extra
(tokens x d x vocab) matmul per exit.

Per-token losses (not a reduced scalar) are returned so that any weighting of
tokens and exits -- uniform, per-loop weights, a learned exit gate -- gets
exact gradients.

When every token of an exit carries the same weight (terminal and per-loop
supervision: loss = sum_k a_k * mean_tokens CE_k), the gradient's shape is
known in forward up to one scalar -- whatever multiplies the loss later (a
gradient-accumulation factor, a loss scaler). `weighted_exits_cross_entropy`
uses that: it computes the gradients w.r.t. the features and the head weight
in the same pass over each chunk of logits, keeps them (each exit's feature
gradient is the size of the features; the head gradient is one parameter-sized
buffer shared by all exits), and backward only scales them. That is three
(tokens x d x vocab) matmuls per exit, the same as a plain full-logits
cross-entropy, instead of four, with one chunk of logits alive at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _chunk_losses(x: Tensor, w: Tensor, targets: Tensor, valid: Tensor, acc: torch.dtype):
    """One chunk's logits (in the accumulation dtype), log-sum-exp and per-token CE (0 where no target)."""
    logits = (x @ w.t()).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    return logits, lse, torch.where(valid, lse - picked, torch.zeros_like(lse))


def _chunk_gradients(logits: Tensor, lse: Tensor, targets: Tensor, token_scale: Tensor, x: Tensor, w: Tensor,
                     grad_x: Optional[Tensor], grad_w: Optional[Tensor]) -> None:
    """Backpropagate token_scale_i * CE_i through one chunk (consumes `logits`).

    d CE_i / d logits_i = softmax_i - onehot(target_i); the feature gradient is
    written into `grad_x` (the chunk's rows), the head gradient added to `grad_w`.
    """
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[torch.arange(logits.shape[0], device=logits.device), targets.clamp_min(0)] -= 1.0
    grad_logits.mul_(token_scale[:, None])
    grad_logits = grad_logits.to(x.dtype)
    if grad_x is not None:
        grad_x.copy_(grad_logits @ w)
    if grad_w is not None:
        grad_w.add_((grad_logits.t() @ x).to(grad_w.dtype))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = features.shape[0]
        acc = torch.promote_types(features.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        valid = targets != IGNORE_INDEX
        losses = torch.empty(n, dtype=acc, device=features.device)
        lse_all = torch.empty(n, dtype=acc, device=features.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            _, lse_all[start:stop], losses[start:stop] = _chunk_losses(
                features[start:stop], weight, targets[start:stop], valid[start:stop], acc
            )
        ctx.save_for_backward(features, weight, targets, lse_all)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        features, weight, targets, lse_all = ctx.saved_tensors
        chunk, n = ctx.chunk, features.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(features) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=lse_all.dtype, device=weight.device) if need_w else None
        valid = targets != IGNORE_INDEX
        token_scale = torch.where(valid, grad_losses.to(lse_all.dtype), torch.zeros_like(lse_all))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            x = features[start:stop]
            # The logits are recomputed here rather than kept from forward: one chunk alive at a time.
            logits = (x @ weight.t()).to(lse_all.dtype)
            _chunk_gradients(logits, lse_all[start:stop], targets[start:stop], token_scale[start:stop], x, weight,
                             grad_x[start:stop] if need_x else None, grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None


class _WeightedExitsCrossEntropy(torch.autograd.Function):
    """sum_k coeff_k * mean_valid_tokens CE(features_k @ weight.T, targets), gradients made in forward."""

    @staticmethod
    def forward(ctx, weight: Tensor, targets: Tensor, coeffs: tuple, chunk: int, matmul_dtype, with_grads: bool,
                *features: Tensor):
        n = targets.shape[0]
        device = targets.device
        w = weight.to(matmul_dtype)
        acc = torch.promote_types(matmul_dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp_min(1).to(acc)
        need_x = [with_grads and ctx.needs_input_grad[6 + k] for k in range(len(features))]
        need_w = with_grads and ctx.needs_input_grad[0]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
        grads_x: list[Optional[Tensor]] = []
        ce_sums = []
        for k, feats in enumerate(features):
            x_all = feats.to(matmul_dtype)
            grad_x = torch.empty(feats.shape, dtype=matmul_dtype, device=device) if need_x[k] else None
            # d/dlogits of coeff * mean CE = coeff / count * (softmax - onehot) on valid tokens.
            token_scale = valid.to(acc) * (coeffs[k] / count)
            ce_sum = torch.zeros((), dtype=acc, device=device)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                x = x_all[start:stop]
                logits, lse, losses = _chunk_losses(x, w, targets[start:stop], valid[start:stop], acc)
                ce_sum = ce_sum + losses.sum()
                if need_x[k] or need_w:
                    _chunk_gradients(logits, lse, targets[start:stop], token_scale[start:stop], x, w,
                                     grad_x[start:stop] if need_x[k] else None, grad_w)
            grads_x.append(grad_x)
            ce_sums.append(ce_sum)
        ce_per_exit = torch.stack(ce_sums) / count
        loss = torch.stack([c * ce for c, ce in zip(coeffs, ce_per_exit.unbind())]).sum()
        ctx.grads_x = grads_x
        ctx.grad_w = grad_w
        ctx.weight_dtype = weight.dtype
        ctx.feature_dtypes = [f.dtype for f in features]
        ctx.mark_non_differentiable(ce_per_exit)
        return loss, ce_per_exit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor):
        grads_x, grad_w = ctx.grads_x, ctx.grad_w
        if grads_x is None:
            raise RuntimeError(
                "weighted_exits_cross_entropy keeps its gradients from forward and hands them over once: "
                "backward through the same graph twice (retain_graph=True) is not supported"
            )
        ctx.grads_x = ctx.grad_w = None  # free the buffers as soon as they are handed over
        out_w = grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.weight_dtype) if grad_w is not None else None
        out_x = [
            g.mul_(grad_loss.to(g.dtype)).to(dtype) if g is not None else None
            for g, dtype in zip(grads_x, ctx.feature_dtypes)
        ]
        return (out_w, None, None, None, None, None, *out_x)


def weighted_exits_cross_entropy(
    features: Sequence[Tensor], weight: Tensor, targets: Tensor, coeffs: Sequence[float], chunk_tokens: int = 8192
) -> tuple[Tensor, Tensor]:
    """(sum_k coeffs[k] * CE_k, per-exit CE_k detached) with CE_k the mean over positions with a target.

    features: K tensors (..., D); weight: (V, D); targets (...) with IGNORE_INDEX
    where there is no target. Equal, in loss and gradients, to summing
    `coeffs[k] * chunked_cross_entropy(...).sum() / n_valid` over exits, with
    one matmul fewer per exit (see the module docstring). Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32.
    """
    if len(features) != len(coeffs):
        raise ValueError(f"{len(features)} feature tensors but {len(coeffs)} coefficients")
    flat = [f.reshape(-1, f.shape[-1]) for f in features]
    device_type = flat[0].device.type
    if torch.is_autocast_enabled(device_type):
        matmul_dtype = torch.get_autocast_dtype(device_type)
    else:
        matmul_dtype = weight.dtype
    with_grads = torch.is_grad_enabled() and (weight.requires_grad or any(f.requires_grad for f in flat))
    return _WeightedExitsCrossEntropy.apply(
        weight, targets.reshape(-1), tuple(float(c) for c in coeffs), max(1, int(chunk_tokens)), matmul_dtype,
        with_grads, *flat,
    )


def chunked_cross_entropy(features: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 8192) -> Tensor:
    """Per-token cross-entropy of `features @ weight.T` against `targets`.

    features: (..., D), weight: (V, D), targets: (...) with IGNORE_INDEX for
    positions without a target. Returns fp32 (fp64 for fp64 inputs) losses shaped like `targets`
    (0 at ignored positions).
    """
    shape = targets.shape
    flat_x = features.reshape(-1, features.shape[-1])
    flat_t = targets.reshape(-1)
    device_type = flat_x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside a custom Function: cast both operands to
        # the autocast dtype here, so the matmuls run in bf16 and the softmax in fp32.
        dtype = torch.get_autocast_dtype(device_type)
        flat_x, weight = flat_x.to(dtype), weight.to(dtype)
    elif flat_x.dtype != weight.dtype:
        flat_x = flat_x.to(weight.dtype)
    return _ChunkedCrossEntropy.apply(flat_x, weight, flat_t, max(1, int(chunk_tokens))).view(shape)
