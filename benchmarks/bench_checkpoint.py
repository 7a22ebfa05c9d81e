"""Checkpoint save/load time and size for the paper's 44M and 129M shapes (CPU, single process),
and how long an asynchronous save blocks the training loop compared with a synchronous one.

    python benchmarks/bench_checkpoint.py [--shapes 44m 129m] [--out DIR] [--steps 2]

Prints a Markdown table. Columns:
    params          model parameters
    size            checkpoint on disk (weights + AdamW moments + trainer state + RNG)
    sync save       `Checkpointer.save` without async: state dict, DCP write, SHA-256 manifest, commit
    validate        manifest check with SHA-256 of every file (part of every resume)
    load            `Checkpointer.resume` from the path (validation included)
    async blocked   time `save` holds up the training loop with checkpoint.save_async=true, in steady
                    state (in brackets: the first async save, which also allocates the staging buffers)
    blocked / sync  the ratio of the two (target <= 20 %)
    async total     from the async `save` call until the commit is on disk
    step / step+bg  training step time alone / while the background write runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from looptrain.checkpoint import Checkpointer  # noqa: E402
from looptrain.checkpoint.manifest import validate  # noqa: E402
from looptrain.config import load_recipe  # noqa: E402
from looptrain.config.loader import recipe_hash  # noqa: E402
from looptrain.model import build_model  # noqa: E402
from looptrain.monitor.rules import TrainingMonitor  # noqa: E402
from looptrain.objectives import DepthSampler  # noqa: E402
from looptrain.parallel import init_distributed  # noqa: E402
from looptrain.parallel.single import SingleBackend  # noqa: E402
from looptrain.state import TrainerState  # noqa: E402
from looptrain.train_module import LoopedLMTrainModule  # noqa: E402

SHAPES = {"44m": "recipes/paper/44m/base.yaml", "129m": "recipes/paper/129m/base.yaml"}


class _Batches:
    """The data position a checkpoint records; the benchmark feeds random tokens instead."""

    def state_dict(self) -> dict:
        return {"loader": {"epoch": 0, "sample_in_epoch": 0}, "epoch": 0, "batches_seen": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class _Trainer:
    """What the checkpointer reads from and writes into: the real state objects, no data pipeline."""

    backend: SingleBackend
    sampler: DepthSampler
    monitor: TrainingMonitor
    state: TrainerState
    batches: _Batches = field(default_factory=_Batches)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _step(trainer: _Trainer, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    out = trainer.backend.forward_backward(tokens[:, :-1], tokens[:, 1:], depth=trainer.sampler.loops,
                                           backprop_loops=None, measure_all_exits=False, last_micro_step=True)
    trainer.backend.optimizer_step(3e-4)
    out.loss.detach().item()
    trainer.state.step += 1
    return time.perf_counter() - start


def bench_shape(shape: str, out_dir: Path, steps: int, tokens_per_step: int) -> dict[str, float]:
    overrides = [f"name=bench-{shape}", f"out_dir={out_dir}", "train.device=cpu", "train.precision=fp32",
                 "model.dropout=0.0", "checkpoint.keep_last=1"]
    recipe = load_recipe(str(ROOT / SHAPES[shape]), overrides)
    env = init_distributed("cpu")
    torch.manual_seed(0)
    backend = SingleBackend(recipe, env)
    backend.setup(LoopedLMTrainModule(build_model(recipe.model), recipe.objective))
    trainer = _Trainer(backend, DepthSampler(recipe.objective.depth, recipe.model.loops),
                       TrainingMonitor(recipe.monitor, recipe.model.loops), TrainerState(recipe_hash=recipe_hash(recipe)))
    params = sum(p.numel() for p in backend.module.parameters())
    tokens = torch.randint(0, recipe.model.vocab_size, (1, tokens_per_step + 1))
    _step(trainer, tokens)  # fills the AdamW moments
    step_alone = sum(_step(trainer, tokens) for _ in range(steps)) / steps

    sync = Checkpointer(recipe, backend, env)
    start = time.perf_counter()
    path = Path(sync.save(trainer, reason="final"))
    sync_s = time.perf_counter() - start
    size = _dir_bytes(path)
    start = time.perf_counter()
    validate(path)
    validate_s = time.perf_counter() - start

    loader_recipe = load_recipe(str(ROOT / SHAPES[shape]), overrides + [f"checkpoint.resume={path}"])
    loader = Checkpointer(loader_recipe, backend, env)
    start = time.perf_counter()
    loader.resume(trainer)
    load_s = time.perf_counter() - start

    async_recipe = load_recipe(str(ROOT / SHAPES[shape]), overrides + ["checkpoint.save_async=true"])
    asyn = Checkpointer(async_recipe, backend, env)
    # The first asynchronous save allocates the CPU staging buffers; later ones reuse them.
    trainer.state.step += 1  # a new step number each time, so no save is skipped as already done
    asyn.save(trainer, reason="interval")
    blocked_first_s = asyn.last_save_blocking_s
    asyn.wait()
    trainer.state.step += 1
    start = time.perf_counter()
    asyn.save(trainer, reason="interval")
    blocked_s = asyn.last_save_blocking_s
    overlapped = []
    while asyn._pending is not None and not asyn._pending.future.done():
        overlapped.append(_step(trainer, tokens))
    asyn.wait()
    total_s = time.perf_counter() - start
    return {
        "params": params, "size": size, "sync": sync_s, "validate": validate_s, "load": load_s,
        "blocked": blocked_s, "blocked_first": blocked_first_s, "async_total": total_s, "step": step_alone,
        "step_bg": sum(overlapped) / len(overlapped) if overlapped else float("nan"),
        "overlapped_steps": len(overlapped),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir, removed after)")
    parser.add_argument("--steps", type=int, default=2, help="training steps timed without a save")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per training step (one sequence)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    try:
        for shape in args.shapes:
            r = bench_shape(shape, out_dir, args.steps, args.tokens)
            rows.append(
                f"| {shape} | {r['params'] / 1e6:.1f}M | {r['size'] / 2**20:.0f} MiB | {r['sync']:.2f} s | "
                f"{r['validate']:.2f} s | {r['load']:.2f} s | {r['blocked']:.2f} s ({r['blocked_first']:.2f} s) | "
                f"{100 * r['blocked'] / r['sync']:.0f} % | {r['async_total']:.2f} s | "
                f"{r['step']:.2f} s / {r['step_bg']:.2f} s ({r['overlapped_steps']} steps) |"
            )
    finally:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, "
          f"load average {load:.1f}; a training step is {args.tokens} tokens at depth K\n")
    print("| shape | params | size | sync save | validate | load | async blocked (first) | blocked / sync | "
          "async total | step / step+bg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
