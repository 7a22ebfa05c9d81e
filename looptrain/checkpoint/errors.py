"""The one error type of checkpointing."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the recipe.

    The message names the file or key, what is wrong with it, and what to do.
    The command line turns it into exit status BAD_INPUT (never requeued).
    """
