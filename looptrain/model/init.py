"""Weight initialisation, callable again after a meta-device build + `to_empty`.

normal:        every Linear and Embedding weight ~ N(0, init_std^2), biases 0.
torch_default: PyTorch's own `reset_parameters` (Linear: Kaiming-uniform,
               Embedding: N(0, 1)); the AR-LoopLM reference code trains from it.
Norm gains, decays, the alpha logit and the RoPE tables always come from their
modules' own `reset_parameters`.
"""

from __future__ import annotations

from torch import nn

INIT_SCHEMES = ("normal", "torch_default")


def initialize(model: nn.Module, std: float, scheme: str = "normal") -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init: unknown scheme {scheme!r}; use one of {', '.join(INIT_SCHEMES)}")
    for module in model.modules():
        if scheme == "normal" and isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
