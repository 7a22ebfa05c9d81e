"""Model and optimizer through torch.distributed.checkpoint (single process and FSDP2).

`get_state_dict` / `set_state_dict` give the same fully-qualified names for a
plain module and an FSDP2-sharded one (wrapper prefixes such as activation
checkpointing's are removed), and DCP stores each tensor with its global
shape. So a checkpoint saved by N FSDP2 ranks loads on M ranks, or in a single
process, and the other way round: DCP reshards on load.

Without a process group DCP runs in single-process mode (`no_dist`).
Asynchronous saves copy the state to CPU memory on the training thread
(the only part that blocks) and write from a background thread; that thread
talks to the other ranks on a process group of its own, so its collectives
never interleave with the training loop's. The CPU copy lives in buffers kept
from one save to the next (pinned on CUDA machines): allocating and faulting
in a fresh copy costs several times more than copying into warm memory.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.safe_load import dcp_load

DCP_DIR = "model"  # holds .metadata and the __<rank>_<n>.distcp shards
MODEL_KEY = "model"
OPTIM_KEY = "optim"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# DCP warns on every single-process call (including from its background
# writer thread, where a local catch_warnings would not reach) that it
# assumes a single process: that is exactly the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class DCPStore:
    """Saves and loads `backend.module` + `backend.optimizer`."""

    kind = "dcp"

    def __init__(self, backend, *, async_group: Optional["dist.ProcessGroup"] = None):
        self.backend = backend
        self.async_group = async_group
        self._stager = None  # the CPU staging buffers of asynchronous saves, reused

    def _staging(self):
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False,
            ))
        return self._stager

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(
            self.backend.module, self.backend.optimizer, options=StateDictOptions(full_state_dict=False)
        )
        return {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}

    def save(self, directory: Path, *, use_async: bool) -> Optional[Future]:
        """Write the shards into directory/model; with use_async return the write's future."""
        target = str(directory / DCP_DIR)
        state = self._state()
        if use_async:
            return dcp.async_save(state, checkpoint_id=target, process_group=self.async_group,
                                  async_stager=self._staging(), no_dist=not _distributed())
        dcp.save(state, checkpoint_id=target, no_dist=not _distributed())
        return None

    def load(self, directory: Path, manifest: dict) -> None:
        target = directory / DCP_DIR
        if not (target / ".metadata").is_file():
            raise CheckpointError(f"{target}: no DCP metadata; the checkpoint is incomplete, resume from another one")
        state = self._state()
        try:
            dcp_load(state, target, no_dist=not _distributed())  # restricted unpickling (safe_load.py)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as err:  # missing keys / shape mismatches: CheckpointException
            first = str(err).strip().splitlines()[0][:400] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{target}: the model/optimizer state does not load into this model ({first}); check that the "
                "recipe's model section matches the checkpoint's recipe.json"
            ) from err
        set_state_dict(
            self.backend.module, self.backend.optimizer,
            model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY],
        )
