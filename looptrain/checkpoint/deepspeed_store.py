"""Model and optimizer through DeepSpeed's own checkpoints (ZeRO 0-3).

DeepSpeed writes one model-states file and one optimizer partition per rank.
It reloads them only at the world size and ZeRO stage that wrote them; at
another world size (or stage) the checkpoint is first converted to DeepSpeed's
"universal" format (`python -m deepspeed.checkpoint.ds_to_universal`, run once
by rank 0 into `<checkpoints>/.universal-<name>-<id>/` and reused by later
resumes), then loaded with the engine's universal-checkpoint switch on.

DeepSpeed's own files are read by DeepSpeed's loader; looptrain checks their
sizes and digests against the manifest, and loads each weights-only, before
DeepSpeed opens them, and DeepSpeed's own reads are restricted to weights-only
loading too (`safe_load.restricted_torch_load`), so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.layout import UNIVERSAL_PREFIX
from looptrain.checkpoint.safe_load import check_torch_files, restricted_torch_load

DS_DIR = "deepspeed"  # DeepSpeed's save_dir inside a checkpoint
TAG = "state"  # DeepSpeed's tag: the sub-directory with the rank files
_COMPLETE = "CONVERTED"


def _broadcast_text(text: Optional[str]) -> Optional[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def universal_dir(ckpt_root: Path, source: Path) -> Path:
    ident = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return ckpt_root / f"{UNIVERSAL_PREFIX}{source.name}-{ident}"


def convert_to_universal(source: Path, out: Path, *, workers: int = max(1, min(8, (os.cpu_count() or 2) // 2))):
    """Run DeepSpeed's converter on source/deepspeed/state into out/state (atomically)."""
    if (out / _COMPLETE).is_file():
        return
    check_torch_files(source / DS_DIR / TAG)  # a crafted file is refused before the converter reads it
    work = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [
        # The converter runs with torch.load restricted to weights-only loading (safe_load.py).
        sys.executable, "-m", "looptrain.checkpoint.safe_load", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(source / DS_DIR / TAG),
        "--output_folder", str(work / TAG),
        "--num_extract_workers", str(workers),
        "--num_merge_workers", str(workers),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CheckpointError(
            f"{source}: DeepSpeed's universal conversion failed (exit {proc.returncode}); resume at the world "
            f"size that saved it, or run `{' '.join(cmd[1:])}` by hand to see why:\n{tail}"
        )
    (work / _COMPLETE).write_text("ds_to_universal\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)


class DeepSpeedStore:
    """Saves and loads `backend.engine` (model, optimizer partitions, fp32 master weights)."""

    kind = "deepspeed"

    def __init__(self, backend, env, ckpt_root: Path):
        self.engine = backend.engine
        self.env = env
        self.ckpt_root = ckpt_root

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def save(self, directory: Path, *, use_async: bool) -> None:
        # DeepSpeed saves synchronously; the caller reports that async is not used.
        # The universal-checkpoint marker lets ds_to_universal convert the checkpoint
        # later (it refuses checkpoints whose client did not declare it).
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        version = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        client_state = {UNIVERSAL_CHECKPOINT_INFO: version}
        self.engine.save_checkpoint(str(directory / DS_DIR), tag=TAG, client_state=client_state, save_latest=False)
        return None

    def needs_conversion(self, manifest: dict) -> bool:
        return int(manifest.get("world_size", -1)) != self.env.world_size or int(
            manifest.get("zero_stage", -1)
        ) != self.zero_stage

    def load(self, directory: Path, manifest: dict) -> Optional[str]:
        """Load the engine state; returns a note when a universal conversion was used."""
        if not (directory / DS_DIR / TAG).is_dir():
            raise CheckpointError(
                f"{directory / DS_DIR / TAG}: missing; this is not a DeepSpeed checkpoint (parallel.backend="
                f"{manifest.get('backend')!r} saved it); resume it with that backend"
            )
        if not self.needs_conversion(manifest):
            self._load(directory / DS_DIR, universal=False, where=directory)
            return None
        out = universal_dir(self.ckpt_root, directory)
        error = None
        if self.env.is_main:
            try:
                convert_to_universal(directory, out)
            except CheckpointError as err:
                error = str(err)
        error = _broadcast_text(error)
        if error:
            raise CheckpointError(error)
        self._load(out, universal=True, where=directory)
        return (
            f"DeepSpeed checkpoint saved at world size {manifest.get('world_size')} / "
            f"ZeRO-{manifest.get('zero_stage')} loaded at world size {self.env.world_size} / "
            f"ZeRO-{self.zero_stage} through the universal format ({out})"
        )

    def _load(self, load_dir: Path, *, universal: bool, where: Path) -> None:
        # Every file DeepSpeed will read is first loaded weights-only (tensors memory-mapped),
        # then DeepSpeed reads them with torch.load restricted the same way (safe_load.py).
        check_torch_files(load_dir / TAG, rank=self.env.rank, world=self.env.world_size)
        config = self.engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        try:
            with restricted_torch_load():
                path, _client = self.engine.load_checkpoint(
                    str(load_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        except CheckpointError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0][:400] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{where}: DeepSpeed could not load it ({type(err).__name__}: {first}); check that the recipe's "
                "model section matches the checkpoint's recipe.json"
            ) from err
        finally:
            config.load_universal_checkpoint = previous
        if path is None:
            raise CheckpointError(
                f"{load_dir}: DeepSpeed found no checkpoint with tag {TAG!r}; the checkpoint is incomplete"
            )
