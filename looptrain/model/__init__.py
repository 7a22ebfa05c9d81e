"""The looped LM family: prelude -> looped core -> per-loop exits, with the
architectural scale controls (readout, recurrence, injection). Knows nothing of
parallelism, data or losses."""

from looptrain.model.looped_lm import LoopedLM, LoopOutput, build_model

__all__ = ["LoopedLM", "LoopOutput", "build_model"]
