"""Save and resume the complete training state.

A checkpoint holds everything a resumed run needs to be indistinguishable
from one that never stopped: model and optimizer (sharded), trainer state
(step, tokens, data position, depth-sampler generator, monitor state,
tracker run id), and every rank's RNG streams.

Commit protocol (a crash at any point leaves the previous checkpoint as the newest):
    1. every rank writes into <checkpoints>/.tmp-step_XXXXXXXX
    2. all ranks are done (a barrier; for asynchronous saves DCP's own final
       gather, which completes only after every rank's shards are written)
    3. rank 0 writes manifest.json (sizes + SHA-256 of every file) last
    4. rank 0 renames the directory to step_XXXXXXXX
    5. rank 0 points `latest` at it (temp file + os.replace), then applies retention

Asynchronous saves (`checkpoint.save_async`, single/FSDP2 only) block the
training loop only while the state is copied to CPU memory; the shards are
written by a background thread, and rank 0 commits as soon as they are on
disk. `due`, `save` and `wait` check the pending save and report its failure.
Saves at the end of a run, on a halt and on preemption are synchronous: the
process is about to exit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from looptrain.checkpoint import payload
from looptrain.checkpoint.compat import check_compatible
from looptrain.checkpoint.errors import CheckpointError
from looptrain.checkpoint.health import SUPERSEDED_PREFIX, is_good, last_good_checkpoint, without_patience
from looptrain.checkpoint.layout import (
    LATEST_FILE,
    TMP_PREFIX,
    checkpoints_dir,
    committed,
    resolve_checkpoint,
    step_name,
    write_latest,
)
from looptrain.checkpoint.manifest import read_manifest, validate, write_manifest
from looptrain.fileio import fsync_dir
from looptrain.checkpoint.retention import remove_dir, apply_retention
from looptrain.checkpoint.save_errors import CheckpointSaveError, save_failure
from looptrain.config.loader import recipe_hash, recipe_to_dict
from looptrain.config.schema import Recipe
from looptrain.state import capture_rng_state, restore_rng_state, seed_everything

HALT_RESUMED_PREFIX = "HALTED.resumed-"


@dataclass
class _Pending:
    step: int
    final: Path
    future: Future
    started: float
    finished: Optional[float] = None  # when the background write (and commit) ended


@dataclass
class _Decision:
    path: Optional[str] = None
    error: Optional[str] = None
    notes: tuple[str, ...] = ()
    halted: bool = False
    superseded: tuple[str, ...] = ()  # newer checkpoints of a halted run that a changed recipe leaves behind


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Checkpointer:
    """Saves and resumes a trainer's complete state under `<run_dir>/checkpoints`.

    The trainer calls `resume` once before training, `due(step)` after every
    step, `save(trainer, reason)` when a checkpoint is due (and at the end, on
    a halt, on preemption) and `wait()` before exiting.
    """

    def __init__(self, recipe: Recipe, backend, env):
        self.recipe = recipe
        self.backend = backend
        self.env = env
        self.cfg = recipe.checkpoint
        self.run_dir = Path(recipe.run_dir)
        self.root = checkpoints_dir(recipe.run_dir)
        self.deepspeed = recipe.parallel.backend == "deepspeed"
        self.use_async = self.cfg.save_async and not self.deepspeed
        if self.cfg.save_async and self.deepspeed:
            self._say("checkpoint.save_async is ignored with DeepSpeed: its checkpoints are written synchronously")
        if self.deepspeed:
            from looptrain.checkpoint.deepspeed_store import DeepSpeedStore

            self.store = DeepSpeedStore(backend, env, self.root)
        else:
            from looptrain.checkpoint.dcp_store import DCPStore

            # The background writer gets a process group of its own: its collectives
            # must never interleave with the training loop's on the default group.
            group = dist.new_group(backend="gloo") if self.use_async and _distributed() else None
            self.store = DCPStore(backend, async_group=group)
        self.resumed_from: Optional[Path] = None
        self.last_saved_step: Optional[int] = None
        self.last_save_blocking_s = 0.0  # how long the last save held up the training loop
        self._pending: Optional[_Pending] = None
        # Rank 0 commits asynchronous saves from this thread once their shards are written.
        self._committer = (
            ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit") if self.use_async and env.is_main else None
        )

    # ------------------------------------------------------------------ notes
    def _say(self, message: str) -> None:
        if self.env.is_main:
            print(f"looptrain: checkpoint: {message}", flush=True)

    # ================================================================= resume
    def resume(self, trainer, force: bool = False) -> bool:
        """Load the checkpoint `checkpoint.resume` selects into `trainer`; False when starting fresh."""
        mode = self.cfg.resume
        if mode == "none":
            return False
        # Rank 0 decides (and checksums) once; every rank then loads the same checkpoint.
        decision = dataclasses.asdict(self._decide(mode, force)) if self.env.is_main else None
        decision = _Decision(**_broadcast(decision))
        for note in decision.notes:
            self._say(note)
        if decision.error:
            raise CheckpointError(decision.error)
        if decision.superseded and self.env.is_main:
            self._set_aside(decision.superseded, decision.path)
        if decision.path is None:
            return False
        self._load(trainer, Path(decision.path), halted=decision.halted)
        return True

    def _set_aside(self, paths: tuple[str, ...], resume_path: Optional[str]) -> None:
        """Rename the halted branch's newer checkpoints out of the `step_*` namespace, so that a
        later `resume: auto` (after a preemption, say) never continues the diverged branch;
        they stay on disk for inspection (and for checkpoint.resume=PATH)."""
        for path in map(Path, paths):
            target = path.with_name(f"{SUPERSEDED_PREFIX}{path.name}-{int(time.time())}")
            os.replace(path, target)
            self._say(f"moved {path.name} to {target.name}: a changed recipe continues from "
                      f"{Path(resume_path).name if resume_path else 'step 0'}")
        if resume_path is not None:
            write_latest(self.root, Path(resume_path).name)
        else:
            (self.root / LATEST_FILE).unlink(missing_ok=True)

    def _decide(self, mode: str, force: bool) -> _Decision:
        """Rank 0 picks (and fully validates) the checkpoint; the result is broadcast."""
        try:
            if mode == "auto":
                return self._decide_auto(force)
            return self._decide_path(Path(mode))
        except CheckpointError as err:
            return _Decision(error=str(err))

    def _decide_path(self, path: Path) -> _Decision:
        try:
            path = resolve_checkpoint(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint.resume={self.cfg.resume}: {err}; pass a checkpoint directory") from None
        manifest = validate(path)
        notes = list(self._check_fits(path, manifest))
        return _Decision(path=str(path), notes=tuple(notes))

    def _decide_auto(self, force: bool) -> _Decision:
        from looptrain.monitor.halt import read_halt_record

        notes: list[str] = []
        candidates = list(reversed(committed(self.root)))
        halt = read_halt_record(str(self.run_dir))
        halted = halt is not None
        good_only = False
        if halt is not None:
            current = recipe_hash(self.recipe)
            halted_hash = self._halted_recipe_hash(halt, candidates)
            what = f"rule {halt.get('rule')!r} at step {halt.get('step')}"
            if force:
                notes.append(f"resuming a run the norm monitor halted ({what}) because of --force-resume")
            elif halted_hash is not None and halted_hash != current:
                good_only = True
                notes.append(
                    f"resuming a run the norm monitor halted ({what}): the recipe changed since "
                    f"(hash {halted_hash} -> {current}); starting from the last checkpoint that passed every "
                    "monitor rule"
                )
            else:
                good = last_good_checkpoint(self.root)
                start = f"from {good}" if good is not None else "from step 0 (no checkpoint passed every rule)"
                raise CheckpointError(
                    f"{self.run_dir / 'HALTED.json'}: the norm monitor halted this run ({what}: "
                    f"{halt.get('message', '')}); `resume: auto` does not continue a halted run. Either change the "
                    "recipe (e.g. a lower optim.lr or a scale control such as objective.norm_penalty.weight) and "
                    f"run again, which starts {start}, or pass --force-resume to continue it unchanged"
                )
        refused: list[str] = []
        superseded: list[str] = []
        for i, path in enumerate(candidates):
            if good_only and not is_good(path):
                notes.append(f"skipped {path.name}: saved after a monitor rule failed (a halt checkpoint or one "
                             "inside a rule's patience); pass checkpoint.resume=PATH to start from it anyway")
                superseded.append(str(path))
                continue
            try:
                manifest = validate(path)
            except CheckpointError as err:
                following = f"; falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
                notes.append(f"refused {path}: {err}{following}")
                refused.append(path.name)
                continue
            notes.extend(self._check_fits(path, manifest))
            return _Decision(path=str(path), notes=tuple(notes), halted=halted, superseded=tuple(superseded))
        if refused:
            raise CheckpointError(
                f"{self.root}: none of the checkpoints {', '.join(refused)} passed validation (see above); "
                "repair or delete them, or set checkpoint.resume=none to start this run over"
            )
        notes.append(f"no checkpoint in {self.root}: starting from step 0" if not superseded else
                     f"no checkpoint in {self.root} passed every monitor rule: starting from step 0")
        return _Decision(notes=tuple(notes), halted=halted, superseded=tuple(superseded))

    def _halted_recipe_hash(self, halt: dict, candidates: list[Path]) -> Optional[str]:
        extra = halt.get("extra") or {}
        if extra.get("recipe_hash"):
            return str(extra["recipe_hash"])
        places = [Path(extra["checkpoint"])] if extra.get("checkpoint") else []
        for path in places + candidates:
            try:
                return read_manifest(path).get("recipe_hash")
            except CheckpointError:
                continue
        return None

    def _check_fits(self, path: Path, manifest: dict) -> list[str]:
        """Refuse a checkpoint of another storage format or an incompatible recipe; notes otherwise."""
        notes = []
        store = manifest.get("store")
        if store != self.store.kind:
            want = "deepspeed" if store == "deepspeed" else "single or fsdp2"
            raise CheckpointError(
                f"{path}: saved by parallel.backend={manifest.get('backend')!r} ({store} format) but the recipe "
                f"has parallel.backend={self.recipe.parallel.backend!r}; resume it with parallel.backend={want}, or "
                f"`looptrain export {path} OUT` to take only the weights"
            )
        compat = check_compatible(payload.load_recipe_dict(path), recipe_to_dict(self.recipe), str(path))
        if compat.note():
            notes.append(compat.note())
        if int(manifest.get("world_size", self.env.world_size)) != self.env.world_size:
            notes.append(
                f"saved at world size {manifest.get('world_size')}, resuming at {self.env.world_size}: "
                "the state is resharded"
            )
        return notes

    def _load(self, trainer, path: Path, *, halted: bool) -> None:
        manifest = read_manifest(path)
        note = self.store.load(path, manifest)
        if note:
            self._say(note)
        saved = payload.load_trainer_state(path)
        state = trainer.state
        state.step = int(saved.step)
        state.tokens = int(saved.tokens)
        state.data = saved.data
        state.depth_sampler = saved.depth_sampler
        state.monitor = saved.monitor
        state.wandb_run_id = saved.wandb_run_id
        state.last_metrics = dict(saved.last_metrics)
        if state.data:
            trainer.batches.load_state_dict(state.data)
        if state.depth_sampler:
            trainer.sampler.load_state_dict(state.depth_sampler)
        if state.monitor:
            if saved.recipe_hash and saved.recipe_hash != recipe_hash(self.recipe):
                state.monitor = without_patience(state.monitor)  # a changed recipe starts its rules afresh
            trainer.monitor.load_state_dict(state.monitor)
        rng = payload.load_rng(path, self.env.rank)
        if rng is not None:
            restore_rng_state(rng)
            trainer.batches = RestoreRngAtFirstBatch(trainer.batches, rng)
        else:
            # A rank the saving job did not have: a fresh stream, distinct per rank and step.
            seed_everything(self.recipe.train.seed + 1000 * self.env.rank + 7919 * state.step)
            if self.env.rank == manifest.get("world_size"):
                print(
                    f"looptrain: checkpoint: ranks >= {manifest.get('world_size')} have no saved RNG state; "
                    "their dropout streams start fresh", flush=True,
                )
        self.resumed_from = path
        if path.resolve() == (self.root / step_name(state.step)).resolve():
            self.last_saved_step = state.step  # a save at this step would rewrite the same state
        if halted and self.env.is_main:
            self._retire_halt_record(state.step)
        self._say(f"resumed from {path} at step {state.step} ({state.tokens:,} tokens)")

    def _retire_halt_record(self, step: int) -> None:
        """A resumed run is live again: keep the halt record for history under another name."""
        record = self.run_dir / "HALTED.json"
        if record.is_file():
            os.replace(record, self.run_dir / f"{HALT_RESUMED_PREFIX}{step_name(step)}-{int(time.time())}.json")

    # =================================================================== save
    def due(self, step: int) -> bool:
        self._finish_pending(block=False)
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, trainer, reason: str) -> Optional[str]:
        """Save the full state at trainer.state.step; returns the checkpoint's path.

        For an asynchronous save the path is where the checkpoint will be
        committed once its shards are written (`wait()` to be sure).
        """
        started = time.perf_counter()
        self._finish_pending(block=True)
        state = trainer.state
        step = int(state.step)
        name = step_name(step)
        final = self.root / name
        if self.last_saved_step == step:  # this exact state is already committed (or being committed)
            self.last_save_blocking_s = time.perf_counter() - started
            return str(final)
        state.data = trainer.batches.state_dict()
        state.depth_sampler = trainer.sampler.state_dict()
        state.monitor = trainer.monitor.state_dict()
        tmp = self.root / (TMP_PREFIX + name)
        if self.env.is_main:
            _remove_tree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        info = self._manifest_info(state, reason)
        info["healthy"] = reason != "halt" and self._healthy(trainer)
        use_async = self.use_async and reason == "interval"
        try:
            payload.save_rng(tmp, self.env.rank, capture_rng_state())
            if self.env.is_main:
                payload.save_trainer_state(tmp, state)
                payload.save_recipe(tmp, recipe_to_dict(self.recipe))
            future = self.store.save(tmp, use_async=use_async)
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            failure = self._save_failed(err, step, tmp)
            if failure is err:
                raise
            raise failure from None
        self.last_saved_step = step
        if future is None:
            _barrier()
            failure, failed = None, None
            if self.env.is_main:
                try:
                    self._commit(tmp, final, info)
                except Exception as err:
                    failure = self._save_failed(err, step, tmp)
                    failed = str(failure)
            # Every rank learns whether rank 0 committed (this is also the barrier after the commit).
            failed = _broadcast(failed)
            if failed:
                raise failure if failure is not None else CheckpointSaveError(failed)
            self.last_save_blocking_s = time.perf_counter() - started
            self._say(f"saved {final} ({reason}, {self.last_save_blocking_s:.2f} s)")
            return str(final)
        if self.env.is_main:
            future = self._committer.submit(self._commit_after, future, tmp, final, info)
        pending = _Pending(step, final, future, started)
        future.add_done_callback(lambda _f: setattr(pending, "finished", time.perf_counter()))
        self._pending = pending
        self.last_save_blocking_s = time.perf_counter() - started
        return str(final)

    def wait(self) -> None:
        """Finish a pending asynchronous save (and, on rank 0, its commit)."""
        self._finish_pending(block=True)

    # ---------------------------------------------------------------- helpers
    def _healthy(self, trainer) -> bool:
        """Whether the state being saved passed every monitor rule that can halt the run (no such
        rule over its halt threshold at the last check) and every statistic is finite, including
        the hidden-state norms accumulated since the last log."""
        monitor = self.recipe.monitor
        rules = (trainer.state.monitor or {}).get("rules", {})
        for name, counters in rules.items():
            rule = getattr(monitor, name, None)
            if monitor.enabled and rule is not None and rule.enabled and rule.action == "halt" \
                    and int(counters.get("halt_streak", 0)) > 0:
                return False
        watched = ("train/loss", "train/grad_norm", "norm/")
        if not all(math.isfinite(v) for k, v in trainer.state.last_metrics.items() if k.startswith(watched)):
            return False
        norms = getattr(trainer, "norms", None)
        return norms is None or norms.finite()

    def halt_note(self, halt_checkpoint: Optional[str]) -> dict[str, Any]:
        """Rank 0, on a halt: say which checkpoint a changed recipe starts from; returns the
        entries for HALTED.json."""
        good = last_good_checkpoint(self.root)
        start = f"from {good} (the last checkpoint that passed every monitor rule)" if good else (
            "from step 0 (no checkpoint passed every monitor rule)")
        forced = f"; --force-resume continues from {halt_checkpoint}" if halt_checkpoint else ""
        self._say(f"halted: run again with a changed recipe (e.g. a lower optim.lr) to start {start}{forced}")
        return {"resume_from": str(good) if good else None, "recipe_hash": recipe_hash(self.recipe)}

    def _save_failed(self, err: BaseException, step: int, tmp: Path) -> BaseException:
        """Remove the partial directory (rank 0) and describe the failure (a full disk in one line)."""
        self.last_saved_step = None
        return save_failure(err, step=step, tmp=tmp, ckpt_root=self.root, estimate=self._state_bytes(),
                            remove=self.env.is_main)

    def _state_bytes(self) -> int:
        """About what a checkpoint of this model takes: fp32 weights and two Adam moments
        (and DeepSpeed's fp32 master copy), for when no earlier checkpoint says it exactly."""
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.backend.module.parameters())
        return numel * 4 * (4 if self.deepspeed else 3)

    def _manifest_info(self, state, reason: str) -> dict[str, Any]:
        import looptrain

        info = {
            "step": int(state.step),
            "tokens": int(state.tokens),
            "reason": reason,
            "run": self.recipe.name,
            "backend": self.recipe.parallel.backend,
            "store": self.store.kind,
            "world_size": self.env.world_size,
            "recipe_hash": state.recipe_hash or recipe_hash(self.recipe),
            "saved_unix_time": time.time(),
            "looptrain_version": getattr(looptrain, "__version__", "unknown"),
            "torch_version": torch.__version__,
        }
        if self.deepspeed:
            info["zero_stage"] = self.store.zero_stage
        return info

    def _commit_after(self, future: Future, tmp: Path, final: Path, info: dict[str, Any]) -> None:
        future.result()  # every rank's shards are on disk (DCP's final gather) -> commit
        self._commit(tmp, final, info)

    def _commit(self, tmp: Path, final: Path, info: dict[str, Any]) -> None:
        write_manifest(tmp, info)
        if final.exists():  # a damaged leftover of an earlier attempt at this step
            remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        try:
            write_latest(self.root, final.name)
        except OSError:  # e.g. a full disk: undo the rename, so that `latest` and the set of checkpoints agree
            remove_dir(final)
            raise
        protected = [self.resumed_from] if self.resumed_from is not None else []
        good = last_good_checkpoint(self.root)  # a halt must never cost the last good checkpoint
        if good is not None:
            protected.append(good)
        apply_retention(self.root, self.cfg.keep_last, self.cfg.keep_every, protected=protected)

    def _finish_pending(self, block: bool) -> None:
        pending = self._pending
        if pending is None or (not block and not pending.future.done()):
            return
        self._pending = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            failure = self._save_failed(err, pending.step, pending.final.with_name(TMP_PREFIX + pending.final.name))
            if isinstance(failure, CheckpointSaveError):
                raise failure from None
            raise RuntimeError(
                f"asynchronous checkpoint of step {pending.step} ({pending.final}) failed: {failure}; the previous "
                f"checkpoint in {self.root} is still the newest"
            ) from err
        took = (pending.finished or time.perf_counter()) - pending.started
        self._say(f"saved {pending.final} (interval, asynchronous, written in {took:.2f} s)")


class RestoreRngAtFirstBatch:
    """The trainer's batch stream, restoring this rank's saved RNG streams right
    after the first batch of the resumed run is drawn.

    The streams were captured after the last step before the save; the next
    thing that uses them in an uninterrupted run is the next step's forward
    (dropout, noise states). A resumed process does more between loading the
    checkpoint and its first forward -- it measures the CPU's peak FLOPs with
    random matrices, for one -- and whatever it is, restoring at the first
    batch, just before the first forward, makes it invisible. (This relies on
    fetching a batch drawing nothing from the global generators, which holds
    because the train loader has a generator of its own.) Everything else is
    delegated to the wrapped stream.
    """

    def __init__(self, batches, rng_state: dict[str, Any]):
        self._batches = batches
        self._rng_state: Optional[dict[str, Any]] = rng_state

    def __iter__(self) -> "RestoreRngAtFirstBatch":
        return self

    def __next__(self):
        batch = next(self._batches)
        if self._rng_state is not None:
            restore_rng_state(self._rng_state)
            self._rng_state = None
        return batch

    def __getattr__(self, name: str):
        return getattr(self._batches, name)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
