"""Reading checkpoint files without running code that came with them.

A pickle can name any importable callable and have the unpickler call it, so
`pickle.load` on a file from elsewhere runs whatever its author wanted. The
manifest's SHA-256 is no defence: whoever can replace a file can rewrite its
digest. Every pickle a checkpoint load reads therefore goes through an
unpickler that admits a fixed list of types and refuses anything else:

* DCP's `.metadata` (plain `pickle.load` in torch's FileSystemReader): a
  restricted `pickle.Unpickler` that admits only the DCP metadata classes and
  the few torch types they hold (`SafeFileSystemReader`);
* the non-tensor values inside DCP shards (`torch.load(weights_only=False)` in
  torch's default load planner): `weights_only=True` (`SafeLoadPlanner`);
* DeepSpeed's model and optimizer states, its universal-checkpoint files and
  `zero_to_fp32`'s reads: `torch.load` is forced to `weights_only=True`, with
  the handful of DeepSpeed classes those files hold admitted by name, while
  DeepSpeed reads them (`restricted_torch_load`), after every file was checked
  the same way up front (`check_torch_files`).

A file holding anything else raises `UnsafeCheckpointError`: one line naming
the file and the refused object. Nothing of the file has run at that point.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from looptrain.checkpoint.errors import CheckpointError

_REFUSED = re.compile(r"(GLOBAL [\w.]+|Unsupported operand \S+|Unsupported class [\w.]+)")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds an object outside the types a checkpoint may contain."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(
            f"{path}: holds a disallowed object ({what}); the checkpoint is untrusted (it may have been crafted "
            "to run code) and nothing of it was loaded; use a checkpoint from a source you trust"
        )


def disallowed(err: BaseException) -> str | None:
    """What a weights-only unpickler refused, or None when `err` is not such a refusal."""
    if isinstance(err, UnsafeCheckpointError):
        return str(err)
    if not isinstance(err, pickle.UnpicklingError):
        return None
    text = str(err)
    match = _REFUSED.search(text)
    if match:
        return match.group(1)
    if "Weights only load failed" in text:
        return "an object outside plain tensors and values"
    return None


# ------------------------------------------------------------ DCP metadata

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_CLASSES = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: `find_class` admits only its classes
    (and torch dtypes); persistent ids are refused by the base class."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported class {module}.{name}")


def load_dcp_metadata(path: str | os.PathLike):
    """The `Metadata` of a DCP checkpoint, read with `MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            what = disallowed(err)
            if what is not None:
                raise UnsafeCheckpointError(path, what) from None
            raise CheckpointError(f"{path}: unreadable DCP metadata ({err}); the checkpoint is damaged") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({err}); the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(path, f"a {type(metadata).__name__} where DCP metadata belongs")
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise UnsafeCheckpointError(path, f"a shard path {rel!r} outside the checkpoint directory")
    return metadata


def _dcp_classes():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeFileSystemReader(FileSystemReader):
        """torch's FileSystemReader with restricted unpickling of `.metadata` and of shard values.

        `_slice_file` is called right before each item of a shard is
        deserialised: it records the file, so that a refusal names it."""

        _current_file: str = ""

        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = load_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file, sinfo):
            self._current_file = sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except pickle.UnpicklingError as err:
                path = Path(str(self.path)) / self._current_file
                what = disallowed(err)
                if what is not None:
                    raise UnsafeCheckpointError(path, what) from None
                raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is damaged") from None

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, reading non-tensor values with `weights_only=True`."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = _TORCH_LOAD(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeFileSystemReader, SafeLoadPlanner


def dcp_load(state: dict, directory: str | os.PathLike, *, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` with restricted unpickling of every file.

    DCP reports failures as `CheckpointException`, a `BaseException`; a refused
    object comes out as `UnsafeCheckpointError`, anything else as that exception."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader_cls, planner_cls = _dcp_classes()
    # Checked here first: DCP catches a failed metadata read, prints its traceback and
    # falls back to per-rank metadata files, which would bury the reason.
    load_dcp_metadata(Path(directory) / ".metadata")
    try:
        dcp.load(state, storage_reader=reader_cls(str(directory)), planner=planner_cls(), no_dist=no_dist)
    except CheckpointException as err:
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise


# -------------------------------------------------------------- torch.load


def _deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain values."""
    out: list[Any] = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


def safe_torch_load(path: str | os.PathLike, *args: Any, extra_globals: bool = True, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` (plus DeepSpeed's few classes when
    `extra_globals`); a refused object raises `UnsafeCheckpointError` naming the file."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    allowed = _deepspeed_globals() if extra_globals else []
    try:
        with torch.serialization.safe_globals(allowed):
            return _TORCH_LOAD(path, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        what = disallowed(err)
        where = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "a checkpoint file")
        if what is not None:
            raise UnsafeCheckpointError(where, what) from None
        raise


_TORCH_LOAD: Callable[..., Any] = torch.load


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Within the block every `torch.load` call (DeepSpeed's, which asks for
    `weights_only=False`, included) loads with `weights_only=True`.

    DeepSpeed reads its checkpoints through `torch.load` in a dozen places (its
    checkpoint engine, the ZeRO optimizers, universal checkpoints,
    zero_to_fp32); patching the one function they all call is the only way to
    restrict them all. The block is entered only while a checkpoint is loaded."""
    previous = torch.load
    torch.load = safe_torch_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = previous  # type: ignore[assignment]


def check_torch_files(directory: str | os.PathLike, pattern: str = "*.pt", *, rank: int = 0, world: int = 1) -> None:
    """Load every `pattern` file under `directory` with `safe_torch_load` (tensors
    memory-mapped, not read), so that a refused object is named before anything
    else reads the files. With `world` > 1 this rank checks every world-th file only
    (a checkpoint of N ranks has N files per kind: N ranks each opening all of them
    would cost N^2 opens)."""
    for path in sorted(Path(directory).rglob(pattern))[rank::world]:
        if not path.is_file():
            continue
        mmap = zipfile.is_zipfile(path)
        safe_torch_load(path, map_location="cpu", mmap=mmap)


def run_module_restricted(module: str, argv: list[str]) -> None:
    """Run `python -m module argv...` in this process with `torch.load` restricted."""
    import runpy
    import sys

    sys.argv = [module, *argv]
    with restricted_torch_load():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # python -m looptrain.checkpoint.safe_load MODULE ARGS...
    import sys

    run_module_restricted(sys.argv[1], sys.argv[2:])
