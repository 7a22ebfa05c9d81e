"""Peak activation memory of one training step vs loop count K, per checkpointing mode (CPU).

Method. The step runs through `SingleBackend.forward_backward` (checkpointing
applied exactly as in training) under `torch.profiler` with
`profile_memory=True`, which records every allocation and free of the CPU
allocator with the running total ("Total Allocated", counted from the start of
profiling). The peak of that total is the most memory the step held on top of
what existed before it. A warm-up step with the same K runs first and its
gradients are kept (accumulated in place, not freed), so the measured peak
contains no gradient or optimizer buffers: only activations saved for
backward, recomputed activations and temporaries.

Why not count saved tensors with `saved_tensors_hooks`: non-reentrant
checkpointing installs its own hooks inside the checkpointed region, so an
outer hook never sees those tensors, and the region inputs that checkpointing
keeps alive are not "saved tensors" at all -- the count would flatter
checkpointing. Why not RSS: glibc keeps freed memory, so RSS shows a high-water
mark of the whole process, not of the step.

Expected: with `loop` checkpointing only the carried state at each loop
boundary (plus each exit's readout features for the loss) is kept, so memory
grows by a few (B, T, D) tensors per loop on top of one loop's recomputation;
without checkpointing every loop's full activations stay alive until backward.

    python benchmarks/bench_memory.py [--batch 1] [--seq 256] [--loops 2 4 8 16] [--modes none block loop]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from looptrain.config import recipe_from_dict
from looptrain.model import build_model
from looptrain.parallel import build_backend
from looptrain.parallel.env import DistEnv
from looptrain.train_module import LoopedLMTrainModule

MB = 2**20


def build(mode: str, loops: int, batch: int, seq: int, d_model: int, layers: int, vocab: int):
    recipe = recipe_from_dict({
        "name": "bench-memory",
        "model": {"vocab_size": vocab, "d_model": d_model, "n_heads": 8, "core_layers": layers, "loops": loops,
                  "max_seq_len": seq, "dropout": 0.0},
        "objective": {"supervision": "per_loop"},
        "train": {"micro_batch_size": batch, "device": "cpu"},
        "parallel": {"backend": "single", "activation_checkpointing": mode},
    })
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    backend = build_backend(recipe, env)
    torch.manual_seed(0)
    backend.setup(LoopedLMTrainModule(build_model(recipe.model), recipe.objective))
    return backend


def peak_step_memory(backend, tokens, targets, loops: int) -> int:
    """Bytes: the allocator's peak during one forward+backward, above its level before the step."""

    def step():
        out = backend.forward_backward(tokens, targets, depth=loops, backprop_loops=None,
                                       measure_all_exits=False, last_micro_step=True)
        del out

    step()  # warm-up: allocates the gradients, which the measured step then accumulates into
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["none", "block", "loop"])
    args = parser.parse_args()

    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    tokens, targets = batch[:, :-1], batch[:, 1:]
    peaks: dict[tuple[str, int], float] = {}
    for mode in args.modes:
        for loops in args.loops:
            backend = build(mode, loops, args.batch, args.seq, args.d_model, args.layers, args.vocab)
            peaks[mode, loops] = peak_step_memory(backend, tokens, targets, loops) / MB
            del backend

    print(f"Peak activation memory of one forward+backward (MiB), d {args.d_model}, {args.layers} core layers, "
          f"vocab {args.vocab}, batch {args.batch}x{args.seq}, per-loop supervision, fp32, CPU\n")
    print("| K | " + " | ".join(f"checkpointing `{m}`" for m in args.modes) + " |")
    print("|---:|" + "---:|" * len(args.modes))
    for loops in args.loops:
        print(f"| {loops} | " + " | ".join(f"{peaks[m, loops]:.1f}" for m in args.modes) + " |")
    lo, hi = min(args.loops), max(args.loops)
    ref = 4 if 4 in args.loops else lo
    print(f"| K={hi} / K={ref} | " + " | ".join(f"{peaks[m, hi] / peaks[m, ref]:.2f}x" for m in args.modes) + " |")


if __name__ == "__main__":
    main()
