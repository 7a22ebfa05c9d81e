"""Cost of the per-loop norm statistics relative to a training step.

`LoopNormAccumulator.update` runs every micro-step, so it must stay a rounding
error next to the forward and backward pass it observes (budget: <= 2 %).
This times a forward + backward step of a real looped model (per-exit
chunked cross-entropy over every exit) and, separately, `update` on that
step's raw per-loop states, and prints both and their ratio.

    python benchmarks/bench_norm_stats.py                 # small CPU-sized model
    python benchmarks/bench_norm_stats.py --d-model 512 --layers 8 --vocab 20000   # paper 44M
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from looptrain.config.schema import ModelConfig
from looptrain.model import build_model
from looptrain.monitor.stats import LoopNormAccumulator
from looptrain.objectives.chunked_ce import chunked_cross_entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4, help="core layers (looped)")
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the step")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        core_layers=args.layers,
        loops=args.loops,
        max_seq_len=args.seq,
    )
    model = build_model(cfg).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    acc = LoopNormAccumulator(args.loops, args.d_model, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    step_times, update_times = [], []
    for i in range(args.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = model(inputs)
            loss = sum(
                chunked_cross_entropy(f.reshape(-1, args.d_model), model.head_weight, targets).mean()
                for f in out.features
            ) / len(out.features)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        t1 = time.perf_counter()
        acc.update(out.states)
        _sync(device)
        t2 = time.perf_counter()
        if i > 0:  # the first step warms up allocators and kernels
            step_times.append(t1 - t0)
            update_times.append(t2 - t1)
    metrics = acc.read()

    step_s, update_s = statistics.median(step_times), statistics.median(update_times)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: d={args.d_model} core_layers={args.layers} loops={args.loops} vocab={args.vocab} "
        f"params={params / 1e6:.1f}M  batch={args.batch}x{args.seq}  device={device} dtype={args.dtype}"
    )
    print(f"forward+backward step: {1e3 * step_s:9.2f} ms (median of {args.steps})")
    print(f"norm stats update:     {1e3 * update_s:9.3f} ms (median of {args.steps})")
    print(f"overhead:              {100 * update_s / step_s:9.3f} %  (budget 2 %)")
    print(f"final-loop rms {metrics[f'norm/rms/{args.loops}']:.3f}, p99 |h| {metrics[f'norm/p99/{args.loops}']:.3f}")


if __name__ == "__main__":
    main()
