"""Streams: the prepared datasets a run reads, local or remote, mixed with weights.

`data.streams` lists prepared datasets (`looptrain prepare` outputs) by local
path or remote URI; `data.dir` is the shorthand for one local stream. Each
stream is validated against the model before anything heavy is built, and
all streams must share one tokenizer (same sha256) and sequence length.

Weights are mosaicml-streaming's: `proportion` (relative; all or none,
summing to 1), `repeat` or `choose` (absolute). streaming fixes the
per-epoch choice of samples from `shuffle_seed` and the epoch, so the
checkpointed loader position (epoch + sample offset) resumes a mixture at
exactly the next sample, as it does a single dataset.

Remote streams
    The small files (dataset.json, tokenizer.model, each split's index.json)
    are fetched into the cache when the streams are resolved, which also
    gives one clear error for an unreachable endpoint, missing credentials or
    a URI that holds no dataset; shards are downloaded by streaming (ahead of
    use: `data.predownload`). The cache is `data.cache_dir`, by default a
    directory per job under TMPDIR: streaming refuses two live datasets that
    download into the same local directory, so two jobs must never share one.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from looptrain.config.schema import DataConfig, StreamConfig
from looptrain.data import remote
from looptrain.data.errors import DataError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ResolvedStream:
    """A stream whose metadata was read and checked."""

    name: str
    config: StreamConfig
    remote: Optional[str]  # the URI of a remote stream, None for a local one
    root: Path  # the dataset directory, or the cache directory of a remote stream
    info: Any  # looptrain.data.loader.DatasetInfo

    @property
    def where(self) -> str:
        return self.remote or str(self.root)


def stream_configs(cfg: DataConfig) -> list[StreamConfig]:
    """`data.streams`, or the one stream `data.dir` names."""
    return list(cfg.streams) if cfg.streams else [StreamConfig(path=cfg.dir)]


def _default_name(path: str) -> str:
    parts = [p for p in re.split(r"[/\\]", path.rstrip("/\\")) if p and not p.endswith(":")]
    return parts[-1] if parts else "data"


def stream_names(configs: Sequence[StreamConfig]) -> list[str]:
    names = [c.name or _default_name(c.path) for c in configs]
    for i, (config, name) in enumerate(zip(configs, names)):
        if not _NAME.match(name) or name.isdigit():
            raise DataError(
                f"data.streams[{i}].name {name!r}: use letters, digits, '_', '.', '-' and not only digits "
                "(it becomes part of the metric name val/loss/<name>/<k>)"
            )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(
                f"data.streams[{seen[name]}] and data.streams[{i}] are both named {name!r}; "
                "give each stream its own name"
            )
        seen[name] = i
    return names


def check_weights(configs: Sequence[StreamConfig]) -> None:
    """proportion / repeat / choose as streaming accepts them, and proportions that sum to 1."""
    for i, c in enumerate(configs):
        key = f"data.streams[{i}]"
        if not c.path:
            raise DataError(f"{key}.path: missing; give a prepared dataset directory or a remote URI")
        given = [k for k in ("proportion", "repeat", "choose") if getattr(c, k) is not None]
        if len(given) > 1:
            raise DataError(f"{key}: sets {' and '.join(given)}; give at most one of proportion, repeat, choose")
        if c.proportion is not None and not (math.isfinite(c.proportion) and c.proportion >= 0):
            raise DataError(f"{key}.proportion={c.proportion}: must be a number >= 0")
        if c.repeat is not None and not (math.isfinite(c.repeat) and c.repeat > 0):
            raise DataError(f"{key}.repeat={c.repeat}: must be a number > 0")
        if c.choose is not None and c.choose < 1:
            raise DataError(f"{key}.choose={c.choose}: must be >= 1")
    with_proportion = [c.proportion is not None for c in configs]
    if any(with_proportion):
        if not all(with_proportion):
            missing = [i for i, has in enumerate(with_proportion) if not has]
            raise DataError(
                f"data.streams: proportion is set on some streams but not on data.streams[{missing[0]}]; "
                "give every stream a proportion (summing to 1) or use repeat/choose"
            )
        total = sum(c.proportion for c in configs)
        if abs(total - 1.0) > 1e-6:
            listed = " + ".join(f"{c.proportion:g}" for c in configs)
            raise DataError(f"data.streams: proportions sum to {total:g} ({listed}), not 1; make them add up to 1")


def default_cache_dir() -> Path:
    """A cache directory of this job under TMPDIR, the same for every rank of the job on this machine."""
    if os.environ.get("SLURM_JOB_ID"):
        key = f"slurm{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        key = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
    else:
        key = f"pid{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"looptrain-data-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}"


_CLEANED_AT_EXIT: set[Path] = set()


def cache_dir_of(cfg: DataConfig, uri: str, name: str) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if not cfg.cache_dir and root.name.startswith("looptrain-data-pid") and root not in _CLEANED_AT_EXIT:
        # A single process's own cache: nobody else can use it after this process ends.
        import atexit
        import shutil

        _CLEANED_AT_EXIT.add(root)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def _fetch_metadata(cfg: DataConfig, uri: str, local: Path, splits: Sequence[str]) -> None:
    timeout = cfg.download_timeout
    not_dataset = f"no looptrain dataset there; make one with `looptrain prepare ... --out {uri}`"
    remote.fetch(remote.join(uri, "dataset.json"), local / "dataset.json", missing=not_dataset, timeout=timeout)
    import json

    try:
        meta = json.loads((local / "dataset.json").read_text())
        name = str(meta.get("tokenizer_file", "tokenizer.model"))
        meta_splits = dict(meta.get("splits", {}))
    except (ValueError, AttributeError, TypeError):
        return  # check_dataset names the unreadable dataset.json
    if name not in ("tokenizer.model", "tokenizer.json"):
        raise DataError(f"{uri}/dataset.json: names the tokenizer file {name!r}; re-run `looptrain prepare`")
    remote.fetch(remote.join(uri, name), local / name,
                 missing="the dataset has no tokenizer; re-run `looptrain prepare --overwrite`", timeout=timeout)
    for split in splits:
        if split in meta_splits:
            remote.fetch(remote.join(uri, split, "index.json"), local / split / "index.json",
                         missing=f"the {split} split has no index; re-run `looptrain prepare --overwrite`",
                         timeout=timeout)


def resolve_streams(
    cfg: DataConfig,
    *,
    seq_len: int,
    vocab_size: int,
    splits: Sequence[str] = ("train",),
    only: Optional[str] = None,
) -> list[ResolvedStream]:
    """Check every stream against the model (and against each other); fetch remote metadata.

    With several streams, "val" in `splits` is required of at least one
    stream, not of each: a stream without a val split is simply not
    validated. Every problem is one DataError naming the stream and the fix.
    """
    from looptrain.data.loader import check_dataset

    configs = stream_configs(cfg)
    check_weights(configs)
    names = stream_names(configs)
    several = len(configs) > 1
    resolved: list[ResolvedStream] = []
    for name, config in zip(names, configs):
        if only is not None and name != only:
            continue
        uri = config.path if remote.is_remote(config.path) else None
        root = cache_dir_of(cfg, uri, name) if uri else Path(config.path)
        if uri:
            _fetch_metadata(cfg, uri, root, tuple(splits) + (("val",) if several else ()))
        own_splits = tuple(splits)
        if several and "val" in splits:
            own_splits = tuple(s for s in splits if s != "val")
        try:
            info = check_dataset(root, seq_len, vocab_size, splits=own_splits, check_shards=uri is None)
            if several and "val" in splits and "val" in info.splits:
                check_dataset(root, seq_len, vocab_size, splits=("val",), check_shards=uri is None)
        except DataError as err:
            message = str(err).replace(str(root), uri) if uri else str(err)
            raise DataError(f"stream {name!r}: {message}" if several else message) from None
        resolved.append(ResolvedStream(name=name, config=config, remote=uri, root=root, info=info))
    if several and "val" in splits and not any("val" in s.info.splits for s in resolved):
        raise DataError("no stream in data.streams has a val split; set train.val_every=0 or re-prepare one "
                        "with --val-fraction 0.05")
    _check_same_tokenizer(resolved)
    return resolved


def _check_same_tokenizer(resolved: Sequence[ResolvedStream]) -> None:
    if not resolved:
        return
    first = resolved[0]
    for other in resolved[1:]:
        a, b = first.info.meta.get("tokenizer_sha256"), other.info.meta.get("tokenizer_sha256")
        if a != b:
            raise DataError(
                f"streams {first.name!r} ({first.where}) and {other.name!r} ({other.where}) were prepared with "
                f"different tokenizers (sha256 {str(a)[:12]} vs {str(b)[:12]}); re-prepare one with "
                f"--tokenizer {first.where}"
            )
        if first.info.seq_len != other.info.seq_len:
            raise DataError(
                f"streams {first.name!r} and {other.name!r} hold sequences of {first.info.seq_len} and "
                f"{other.info.seq_len} tokens; re-prepare one with --seq-len {first.info.seq_len}"
            )


def streaming_streams(resolved: Sequence[ResolvedStream], split: str, *, weighted: bool, download_timeout: float):
    """mosaicml-streaming `Stream`s of one split (weights only for training)."""
    from looptrain.data.streaming_import import import_streaming

    streaming = import_streaming()
    out = []
    for s in resolved:
        weights = {}
        if weighted:
            weights = {k: getattr(s.config, k) for k in ("proportion", "repeat", "choose")
                       if getattr(s.config, k) is not None}
        out.append(streaming.Stream(
            remote=s.remote, local=str(s.root.resolve()), split=split, download_timeout=download_timeout, **weights
        ))
    return out
