"""Weight initialisation, callable again after a meta-device build + `to_empty`.

normal:        every Linear and Embedding weight ~ N(0, init_std^2), biases 0.
torch_default: PyTorch's own `reset_parameters` (Linear: Kaiming-uniform,
               Embedding: N(0, 1)); the AR-LoopLM reference code trains from it.
Norm gains, decays, the alpha logit and the RoPE tables always come from their
modules' own `reset_parameters`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def _normal(module: nn.Module, std: float) -> bool:
    """N(0, std^2) weights and zero biases for a Linear or Embedding; False (not handled) for other modules."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return True


def _torch_default(module: nn.Module, std: float) -> bool:
    return False  # every module keeps its own reset_parameters


# model.init -> how a module is initialised before falling back to its own `reset_parameters`.
INIT_SCHEMES: dict[str, Callable[[nn.Module, float], bool]] = {"normal": _normal, "torch_default": _torch_default}


def initialize(model: nn.Module, std: float, scheme: str = "normal") -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init: unknown scheme {scheme!r}; use one of {', '.join(INIT_SCHEMES)}")
    init_module = INIT_SCHEMES[scheme]
    for module in model.modules():
        if not init_module(module, std) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
