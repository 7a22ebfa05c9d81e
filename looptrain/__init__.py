"""looptrain: train looped language models with their hidden-state scale under control."""

__version__ = "0.1.0"
