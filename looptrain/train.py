"""The training loop.

    resume or start -> for each step:
        depth ~ sampler
        for each micro-batch: forward all loops, per-exit loss (+ norm penalty), backward
        clip, optimizer step (skipped when the gradient is not finite)
        every log interval: reduce metrics and per-loop norms, check the monitor, log
        every val interval: loss and perplexity per exit on held-out data
        every checkpoint interval, on preemption and at the end: sharded checkpoint

Everything that depends on how the step is parallelised sits behind
`looptrain.parallel.Backend`; everything that depends on where metrics go sits
behind `looptrain.tracking.Tracker`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from looptrain import exit_codes
from looptrain.config import Recipe, RecipeError, recipe_hash, recipe_to_dict, save_resolved
from looptrain.config.schema import check_world_size
from looptrain.determinism import configure_determinism
from looptrain.objectives import DepthSampler, head_exits
from looptrain.optim import lr_at
from looptrain.parallel import Backend, build_backend, init_distributed, shutdown_distributed
from looptrain.parallel.env import DistEnv
from looptrain.perf import RunClock, peak_flops, peak_memory_gb
from looptrain.profiling import StepProfiler
from looptrain.run_lock import RunDirBusy, hold_run_dir
from looptrain.run_lock import release as release_run_dir
from looptrain.state import TrainerState, seed_everything
from looptrain.threads import apply_threads
from looptrain.train_module import LoopedLMTrainModule, split_batch


class Preempted(Exception):
    """A SIGUSR2/SIGTERM arrived: checkpoint and exit for requeue."""


@dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: str
    final_metrics: dict


class _WindowStats:
    """Per-step scalars summed on device over a log window (no host sync)."""

    def __init__(self, max_depth: int, device: torch.device, tokens_per_step: int, peak_flops: float):
        self.max_depth = max_depth
        self.device = device
        self.tokens_per_step = tokens_per_step
        self.peak_flops = peak_flops  # per device
        self.reset()

    def reset(self) -> None:
        d = self.max_depth
        self.sums = torch.zeros(5, device=self.device, dtype=torch.float64)  # loss, ce, penalty, grad_norm, depth
        self.exit_sum = torch.zeros(d, device=self.device, dtype=torch.float64)
        self.exit_count = torch.zeros(d, device=self.device, dtype=torch.float64)
        self.steps = 0
        self.micro = 0
        self.model_flops = 0.0  # host float: the depth of each step is known on the host

    def add_micro(self, result, depth: int) -> None:
        ce = result.ce_per_exit.double()
        measured = torch.isfinite(ce) | torch.isnan(result.loss.detach()).expand_as(ce)
        padded = torch.zeros(self.max_depth, device=self.device, dtype=torch.float64)
        padded_mask = torch.zeros_like(padded)
        padded[:depth] = torch.where(measured, ce, torch.zeros_like(ce))
        padded_mask[:depth] = measured.double()
        self.exit_sum += padded
        self.exit_count += padded_mask
        self.sums[0] += result.loss.detach().double()
        self.sums[1] += result.ce.double()
        self.sums[2] += result.norm_penalty.double()
        self.micro += 1

    def add_step(self, grad_norm: torch.Tensor, depth: int, model_flops: float) -> None:
        self.sums[3] += grad_norm.double()
        self.sums[4] += depth
        self.steps += 1
        self.model_flops += model_flops

    def read(self, backend: Backend, elapsed: float, peak_memory_gb: float) -> dict[str, float]:
        """Window means (averaged over ranks), plus the slowest rank's elapsed time
        and the largest peak memory over ranks under `perf/`."""
        packed = torch.cat([self.sums, self.exit_sum, self.exit_count])
        worst = torch.tensor([elapsed, peak_memory_gb], device=self.device, dtype=torch.float64)
        if backend.env.distributed:
            torch.distributed.all_reduce(packed)
            packed /= backend.env.world_size
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        values = packed.tolist()
        elapsed, peak_memory_gb = worst.tolist()
        micro, steps = max(1, self.micro), max(1, self.steps)
        out = {
            "train/loss": values[0] / micro,
            "train/ce": values[1] / micro,
            "train/norm_penalty": values[2] / micro,
            "train/grad_norm": values[3] / steps,
            "train/depth": values[4] / steps,
        }
        d = self.max_depth
        for k in range(d):
            count = values[5 + d + k]
            if count > 0:
                out[f"train/loss_exit/{k + 1}"] = values[5 + k] / count
        elapsed = max(elapsed, 1e-9)
        tokens_per_s = self.tokens_per_step * self.steps / elapsed
        world = backend.env.world_size
        out.update({
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": tokens_per_s / world,
            "perf/step_time_s": elapsed / steps,
            "perf/peak_mem_gb": peak_memory_gb,
        })
        if self.peak_flops == self.peak_flops:  # NaN: no trustworthy peak, no MFU (looptrain.perf)
            out["perf/mfu"] = self.model_flops / elapsed / world / self.peak_flops
        self.reset()
        return out


class Trainer:
    def __init__(self, recipe: Recipe, env: DistEnv, *, force_resume: bool = False):
        from looptrain.checkpoint import Checkpointer
        from looptrain.data.loader import InfiniteBatches, build_train_loader, build_val_loaders
        from looptrain.data.streams import resolve_streams
        from looptrain.model import build_model
        from looptrain.monitor.rules import TrainingMonitor
        from looptrain.monitor.stats import LoopNormAccumulator
        from looptrain.tracking import Tracker

        self.recipe = recipe
        self.env = env
        m, t = recipe.model, recipe.train
        self.run_dir = recipe.run_dir
        # Everything that can reject the recipe runs before anything is written
        # into the run directory, so a failed start leaves no half-made run behind.
        splits = ("train", "val") if t.val_every > 0 else ("train",)
        resolve_streams(recipe.data, seq_len=m.max_seq_len, vocab_size=m.vocab_size, splits=splits)
        self.backend = build_backend(recipe, env)
        dp = self.backend.data_parallel_size
        check_world_size(recipe, dp)
        self.global_batch = t.micro_batch_size * t.grad_accum * dp

        seed_everything(t.seed)  # identical initial weights on every rank
        model = build_model(m)
        # Model FLOPs per token of a step at each depth the sampler can draw; counted
        # on the bare model, because ZeRO-3 empties the partitioned parameters it wraps.
        o = recipe.objective
        self.max_depth = o.depth.max or m.loops
        self.flops_by_depth = [
            model.flops_per_token(depth=d, seq_len=m.max_seq_len, backprop_loops=o.backprop_loops,
                                  exits=head_exits(o))
            for d in range(self.max_depth + 1)
        ]
        hold_run_dir(self.run_dir, env)  # one training per run directory, before anything is written there
        self.backend.setup(LoopedLMTrainModule(model, recipe.objective))
        seed_everything(t.seed + 1000 * env.rank)  # distinct dropout streams per rank

        self.tokens_per_step = self.global_batch * m.max_seq_len
        self.train_loader = build_train_loader(
            recipe.data, seq_len=m.max_seq_len, vocab_size=m.vocab_size,
            micro_batch_size=t.micro_batch_size, global_batch_size=self.global_batch,
        )
        self.batches = InfiniteBatches(self.train_loader)
        self.val_loaders = (  # one per stream with a val split, by stream name
            build_val_loaders(recipe.data, seq_len=m.max_seq_len, vocab_size=m.vocab_size,
                              micro_batch_size=t.micro_batch_size)
            if t.val_every > 0 else {}
        )
        self.sampler = DepthSampler(recipe.objective.depth, m.loops, seed=t.seed)
        self.norms = LoopNormAccumulator(self.max_depth, m.d_model, env.device)
        self.monitor = TrainingMonitor(recipe.monitor, self.max_depth)
        self.peak = peak_flops(env.device, t.precision, t.peak_tflops * 1e12 if t.peak_tflops else None)
        if self.peak != self.peak and env.is_main and env.device.type == "cuda":  # a GPU missing from GPU_PEAKS
            name = torch.cuda.get_device_name(env.device)
            print(f"looptrain: no known peak FLOP/s for {name}: MFU is not reported; set train.peak_tflops to the "
                  "device's dense peak", file=sys.stderr, flush=True)
        self.window = _WindowStats(self.max_depth, env.device, self.tokens_per_step, self.peak)
        self.state = TrainerState(recipe_hash=recipe_hash(recipe))
        self.checkpointer = Checkpointer(recipe, self.backend, env)
        self.checkpointer.resume(self, force=force_resume)
        self._restore_log_window()
        if env.is_main:  # after the resume checks: a refused resume leaves the run's recipe.yaml as it was
            save_resolved(recipe, self.run_dir)
        self.tracker = Tracker(
            recipe.tracking, self.run_dir, recipe_to_dict(recipe), is_main=env.is_main,
            resume_id=self.state.wandb_run_id, total_steps=t.steps,
        )
        self.state.wandb_run_id = self.tracker.run_id
        self.profiler = StepProfiler.from_recipe(recipe, env.rank, env.device)
        self._preempt_signal: Optional[int] = None

    # ------------------------------------------------------------------ helpers
    def _save(self, reason: str) -> Optional[str]:
        self.state.log_window = self._log_window()
        return self.checkpointer.save(self, reason=reason)

    def _log_window(self) -> dict:
        """The partly filled log window (metric and norm sums since the last log), summed over
        ranks: saved with every checkpoint, so that a run resumed in the middle of a window logs
        that window exactly as an uninterrupted run would, not as the mean of fewer steps."""
        w, norms = self.window, self.norms
        sums = torch.cat([w.sums, w.exit_sum, w.exit_count, norms._sums])
        maxima = norms._max.clone()
        if self.env.distributed:
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        return {"sums": sums.tolist(), "max": maxima.tolist(), "steps": w.steps, "micro": w.micro,
                "model_flops": w.model_flops}

    def _restore_log_window(self) -> None:
        resumed = getattr(self.checkpointer, "resumed_from", None)
        if resumed is None:
            return
        from looptrain.checkpoint.payload import load_trainer_state

        saved = load_trainer_state(Path(resumed)).log_window
        if not saved:
            return
        w, norms = self.window, self.norms
        w.steps, w.micro, w.model_flops = int(saved["steps"]), int(saved["micro"]), float(saved["model_flops"])
        if self.env.is_main:  # the others add zeros: the window's all-reduce then gives the saved total
            sums = torch.tensor(saved["sums"], dtype=torch.float64, device=self.env.device)
            d = self.max_depth
            w.sums.copy_(sums[:5])
            w.exit_sum.copy_(sums[5 : 5 + d])
            w.exit_count.copy_(sums[5 + d : 5 + 2 * d])
            norms._sums.copy_(sums[5 + 2 * d :])
            norms._max.copy_(torch.tensor(saved["max"], dtype=torch.float64, device=self.env.device))

    def _install_signal_handlers(self) -> None:
        """SIGUSR2/SIGTERM (time limit, preemption, scancel) and a first Ctrl-C stop the run at the
        next step boundary with a checkpoint on every rank; a second Ctrl-C aborts at once."""

        def on_signal(signum, _frame):
            self._preempt_signal = signum

        def on_interrupt(signum, _frame):
            if self._preempt_signal is None:
                self._preempt_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
            if self.env.is_main:
                print("\nlooptrain: Ctrl-C: stopping after this step and saving a checkpoint "
                      "(press Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

        for sig, handler in ((signal.SIGUSR2, on_signal), (signal.SIGTERM, on_signal), (signal.SIGINT, on_interrupt)):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _stop_code(self) -> int:
        """CANCELLED when this rank saw Ctrl-C, else PREEMPTED (the launcher decides about a requeue)."""
        stopped_by = torch.tensor([1.0 if self._preempt_signal == signal.SIGINT else 0.0], device=self.env.device)
        if self.env.distributed:
            torch.distributed.all_reduce(stopped_by, op=torch.distributed.ReduceOp.MAX)
        return exit_codes.CANCELLED if bool(stopped_by.item()) else exit_codes.PREEMPTED

    def _say_where_it_stopped(self, code: int, checkpoint: Optional[str]) -> None:
        if not self.env.is_main:
            return
        if code == exit_codes.CANCELLED:
            why = f"stop asked for: {self.tracker.stop_reason}" if self.tracker.stop_reason else "Ctrl-C"
        elif self._preempt_signal is not None:
            why = signal.Signals(self._preempt_signal).name
        else:
            why = "a signal to another rank"
        print(f"looptrain: stopped at step {self.state.step}/{self.recipe.train.steps} ({why}); "
              f"checkpoint: {checkpoint}; resume by running the same command again "
              f"(checkpoint.resume=auto continues from {self.run_dir}/checkpoints)", file=sys.stderr, flush=True)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.batches)
        tokens, targets = split_batch(batch)
        return tokens.to(self.env.device, non_blocking=True), targets.to(self.env.device, non_blocking=True)

    def _preempted(self) -> bool:
        flag = torch.tensor([1.0 if self._preempt_signal is not None else 0.0], device=self.env.device)
        if self.env.distributed:  # any rank signalled -> all ranks stop together
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # --------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Loss and perplexity per exit on each stream's val split (`val/loss/<stream>/k` with
        several streams) and over all of them (`val/loss/k`)."""
        if not self.val_loaders:
            return {}
        from looptrain.objectives import IGNORE_INDEX

        depth = self.recipe.model.loops
        names = list(self.val_loaders)
        # Token-weighted, so that a short last batch counts for its tokens and
        # the numbers equal `looptrain eval` on the same batches.
        sums = torch.zeros(len(names), depth + 1, device=self.env.device, dtype=torch.float64)
        for row, name in enumerate(names):
            for i, batch in enumerate(self.val_loaders[name]):
                if i >= self.recipe.train.val_batches:
                    break
                tokens, targets = split_batch(batch)
                targets = targets.to(self.env.device)
                out = self.backend.evaluate(tokens.to(self.env.device), targets)
                count = (targets != IGNORE_INDEX).sum().double()
                sums[row, :depth] += out.result.ce_per_exit.double() * count
                sums[row, depth] += count
        if self.env.distributed:
            torch.distributed.all_reduce(sums)
        values = sums.tolist()
        groups = [("val", [sum(column) for column in zip(*values)])]
        if len(names) > 1:
            groups += [(f"val/{name}", values[row]) for row, name in enumerate(names)]
        metrics = {}
        for prefix, group in groups:
            n = max(1.0, group[depth])
            for k in range(depth):
                loss = group[k] / n
                key = prefix.replace("val", "val/loss", 1), prefix.replace("val", "val/ppl", 1)
                metrics[f"{key[0]}/{k + 1}"] = loss
                metrics[f"{key[1]}/{k + 1}"] = math.exp(min(loss, 50.0))
        return metrics

    # --------------------------------------------------------------------- loop
    def _log(self, step: int, elapsed: float) -> dict[str, float]:
        metrics = self.window.read(self.backend, elapsed, peak_memory_gb(self.env.device))
        metrics.update(self.norms.read())
        metrics.update({
            "train/lr": lr_at(step - 1, self.recipe.train.steps, self.recipe.optim.lr, self.recipe.optim.schedule),
            "train/tokens": float(self.state.tokens),
            **self.clock.read(step),
        })
        return metrics

    def _handle_events(self, step: int, metrics: dict[str, float]) -> Optional[object]:
        halt = None
        for event in self.monitor.check(step, metrics):
            self.tracker.event(event)
            if event.action == "halt" and halt is None:
                halt = event
        return halt

    def _halt(self, event, metrics: dict[str, float]) -> int:
        from looptrain.monitor.halt import write_halt_record

        finite = all(math.isfinite(v) for k, v in metrics.items()
                     if k.startswith(("train/loss", "train/grad_norm", "norm/")))
        checkpoint = None
        if finite:
            self.state.last_metrics = metrics
            checkpoint = self._save(reason="halt")
        if self.env.is_main:
            extra = {"checkpoint": checkpoint, **self.checkpointer.halt_note(checkpoint)}
            write_halt_record(self.run_dir, event, self.state.step, extra)
        return exit_codes.HALTED

    def run(self) -> TrainResult:
        t = self.recipe.train
        self._install_signal_handlers()
        module = self.backend.module
        module.train()
        self.clock = RunClock(self.state.step, t.steps)
        window_start = time.perf_counter()
        metrics: dict[str, float] = {}
        while self.state.step < t.steps:
            step = self.state.step
            self.profiler.step_begin(step)
            depth = self.sampler.sample()
            measure = (step + 1) % t.log_every == 0 or step + 1 == t.steps
            for micro in range(t.grad_accum):
                tokens, targets = self._next_batch()
                out = self.backend.forward_backward(
                    tokens, targets, depth=depth, backprop_loops=self.recipe.objective.backprop_loops,
                    measure_all_exits=measure, last_micro_step=micro == t.grad_accum - 1,
                )
                self.window.add_micro(out.result, depth)
                self.norms.update(out.states)
            lr = lr_at(step, t.steps, self.recipe.optim.lr, self.recipe.optim.schedule)
            grad_norm = self.backend.optimizer_step(lr)
            self.window.add_step(grad_norm, depth, self.flops_by_depth[depth] * self.tokens_per_step)
            self.state.step = step + 1
            self.state.tokens += self.tokens_per_step
            self.profiler.step_end(self.state.step)

            # The one per-step host sync: a non-finite loss or gradient must stop
            # the run before it is logged as healthy or checkpointed.
            if not bool(torch.isfinite(out.loss.detach() + grad_norm)):
                measure = True
            if measure:
                elapsed = time.perf_counter() - window_start
                metrics = self._log(self.state.step, elapsed)
                window_start = time.perf_counter()
                self.state.last_metrics = metrics
                self.tracker.log(self.state.step, metrics)
                halt = self._handle_events(self.state.step, metrics)
                if halt is not None:
                    return TrainResult(self._halt(halt, metrics), self.state.step, self.run_dir, metrics)
                if self.env.is_main and self._preempt_signal is None and self.tracker.stop_requested():
                    self._preempt_signal = signal.SIGINT  # a stop asked for from outside: as Ctrl-C
            if t.val_every > 0 and (self.state.step % t.val_every == 0 or self.state.step == t.steps):
                val_start = time.perf_counter()
                val = self.validate()
                metrics.update(val)
                self.tracker.log(self.state.step, val)
                window_start += time.perf_counter() - val_start  # keep evaluation out of tokens/s
            if self.checkpointer.due(self.state.step):
                self._save(reason="interval")
            if self._preempted():
                code = self._stop_code()
                checkpoint = self._save(reason="preempt")
                self.checkpointer.wait()
                self._say_where_it_stopped(code, checkpoint)
                return TrainResult(code, self.state.step, self.run_dir, metrics)
        if self.recipe.checkpoint.save_final:
            self._save(reason="final")
        self.checkpointer.wait()
        return TrainResult(exit_codes.OK, self.state.step, self.run_dir, metrics)


def train(recipe: Recipe, *, force_resume: bool = False) -> TrainResult:
    """Run a recipe in this process (one rank of a job when launched by torchrun/srun)."""
    configure_determinism(recipe.train.deterministic)  # before CUDA starts (cuBLAS reads its workspace then)
    env = init_distributed(recipe.train.device, recipe.parallel.dist_backend, recipe.parallel.timeout_minutes)
    threads, why = apply_threads(recipe.train.threads)
    if env.is_main:
        print(f"looptrain: {threads} intra-op thread(s) per rank ({why}; set train.threads to change)", flush=True)
    trainer = None
    result = TrainResult(exit_codes.FAILED, 0, recipe.run_dir, {})
    refused_together = False
    try:
        trainer = Trainer(recipe, env, force_resume=force_resume)
        result = trainer.run()
        return result
    except RunDirBusy:
        refused_together = True  # every rank raises it after one all-reduce, so all can leave the group together
        raise
    finally:
        if trainer is not None:
            trainer.profiler.close()
            trainer.tracker.finish(result.exit_code)
        release_run_dir(recipe.run_dir)
        if refused_together or result.exit_code in (exit_codes.OK, exit_codes.HALTED, exit_codes.PREEMPTED,
                                                    exit_codes.CANCELLED):
            shutdown_distributed()


def main_worker(recipe: Recipe, *, force_resume: bool = False) -> int:
    """Entry point for one rank: returns the process exit status, printing errors once."""
    from looptrain.checkpoint import CheckpointError
    from looptrain.data.errors import DataError

    rank = int(os.environ.get("RANK", "0"))
    try:
        return train(recipe, force_resume=force_resume).exit_code
    except (RecipeError, DataError, CheckpointError) as err:
        print(f"looptrain: error: {err}", file=sys.stderr, flush=True)
        return exit_codes.BAD_INPUT
    except Exception:
        print(f"looptrain: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return exit_codes.FAILED
