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
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = features.shape[0]
        acc = torch.promote_types(features.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        losses = torch.empty(n, dtype=acc, device=features.device)
        lse_all = torch.empty(n, dtype=acc, device=features.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = (features[start:stop] @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            tgt = targets[start:stop]
            valid = tgt != IGNORE_INDEX
            picked = logits.gather(1, tgt.clamp_min(0).unsqueeze(1)).squeeze(1)
            losses[start:stop] = torch.where(valid, lse - picked, torch.zeros_like(lse))
            lse_all[start:stop] = lse
        ctx.save_for_backward(features, weight, targets, lse_all)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        features, weight, targets, lse_all = ctx.saved_tensors
        chunk = ctx.chunk
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(features) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=lse_all.dtype, device=weight.device) if need_w else None
        for start in range(0, features.shape[0], chunk):
            stop = min(start + chunk, features.shape[0])
            x = features[start:stop]
            logits = (x @ weight.t()).to(lse_all.dtype)
            tgt = targets[start:stop]
            valid = tgt != IGNORE_INDEX
            # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the upstream grad.
            grad_logits = torch.exp(logits - lse_all[start:stop, None])
            grad_logits[torch.arange(stop - start, device=x.device), tgt.clamp_min(0)] -= 1.0
            g = grad_losses[start:stop].to(logits.dtype)
            scale = torch.where(valid, g, torch.zeros_like(g))
            grad_logits.mul_(scale[:, None])
            grad_logits = grad_logits.to(x.dtype)
            if need_x:
                grad_x[start:stop] = grad_logits @ weight
            if need_w:
                grad_w.add_((grad_logits.t() @ x).to(grad_w.dtype))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None


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
