"""`train.deterministic`: the same recipe on the same hardware, world size and thread
count gives bit-identical losses, run after run.

What it switches on (once per process, before CUDA starts):

- `torch.use_deterministic_algorithms(True)`: every op uses a deterministic
  implementation, and an op that has none raises a RuntimeError naming it rather
  than varying silently from run to run.
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` unless already set: cuBLAS (CUDA >= 10.2) is
  reproducible only with a fixed workspace, and reads the variable when CUDA starts.
- cuDNN: `deterministic = True`, `benchmark = False` (no autotuning, whose pick can
  differ between runs).

Data-loader workers need nothing more: the training loader draws their seeds from its
own generator seeded with `data.shuffle_seed` (see `looptrain.data.loader`), and
PyTorch seeds `random`, `numpy` and `torch` in each worker from it, with or
without this switch.

Cost: on CPU none measurable (the ops looptrain runs are deterministic there
already; the switch makes that a checked promise): 60 steps of the quickstart
model, one thread, took 18.4-19.3 CPU-seconds with it and 17.9-18.9 without. On
CUDA (not measured here) some ops switch to slower deterministic kernels (the
documentation of `torch.use_deterministic_algorithms` lists them) and cuBLAS
keeps 8 x 4 MiB of workspace per handle; measure the step time before a long
run with it. Leave it off for production runs; switch it on to bisect a
divergence or to compare two code versions step by step.
"""

from __future__ import annotations

import os
import sys

import torch

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(enabled: bool) -> None:
    """Switch deterministic algorithms on for this process when `enabled`; otherwise leave torch as it is."""
    if not enabled:
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print("looptrain: train.deterministic: CUDA started before CUBLAS_WORKSPACE_CONFIG was set; export "
                  f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before starting Python", file=sys.stderr, flush=True)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
