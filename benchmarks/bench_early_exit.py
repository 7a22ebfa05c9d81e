"""Early-exit decoding with a KV cache: loops saved vs perplexity and vs exact full-depth decoding.

    python benchmarks/bench_early_exit.py RUN_DIR|CKPT|EXPORT [--sequences 4] [--threads 1]

Teacher-forced, token-by-token decoding of validation sequences (the run's dataset)
through the transformers export's model with its cache, exactly as generation runs:
every token is one forward call, exits per the policy, and later tokens read the
cache the exit-KV policy left behind. For each exit policy, threshold and exit-KV
policy it prints
    mean loops   loops per token actually used (K = no saving)
    ppl          perplexity of the true next tokens under the exited logits
    Δppl         relative to exact full-depth decoding
    top-1 agree  share of positions whose argmax equals full-depth decoding's
`copy` reuses an exited token's keys/values of its exit loop for the deeper loops
(costs nothing); `compute` runs the exited token on to full depth for the cache
(saves nothing, isolates the error of the early prediction from that of the cache).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looptrain.data.loader import SINGLE_PROCESS_ENV  # noqa: E402
from looptrain.eval.load import load_model_for_eval  # noqa: E402
from looptrain.eval.run import load_eval_batches  # noqa: E402
from looptrain.generate import load_for_generation  # noqa: E402

SWEEPS = {
    "max_prob": [0.1, 0.2, 0.3, 0.5],
    "entropy": [0.3, 0.4, 0.5, 0.6],
    "kl": [0.9, 0.99, 0.995, 0.999],
}


@torch.no_grad()
def decode(model, seqs: torch.Tensor, **knobs):
    """Token-by-token logits (B, T, V) and exit loops (B, T) over seqs (B, T)."""
    out = model(seqs[:, :1], use_cache=True, **knobs)
    cache, logits, loops = out.past_key_values, [out.logits], [out.exit_loops]
    for t in range(1, seqs.shape[1]):
        out = model(seqs[:, t:t + 1], past_key_values=cache, use_cache=True, **knobs)
        logits.append(out.logits)
        loops.append(out.exit_loops)
    depth = model.config.inference_depth
    exit_loops = torch.cat(loops, 1) if loops[0] is not None else torch.full(seqs.shape, depth)
    return torch.cat(logits, 1), exit_loops


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), targets.flatten()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update({k: os.environ.get(k, v) for k, v in SINGLE_PROCESS_ENV.items()})

    _, recipe, data_dir = load_model_for_eval(args.source)
    model = load_for_generation(args.source)
    cfg = model.config
    batch = load_eval_batches(data_dir, recipe.model, batches=1, batch_size=args.sequences)[0]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    full_logits, _ = decode(model, inputs)
    full_ppl = math.exp(nll(full_logits, targets))
    reference = full_logits.argmax(-1)
    K = cfg.inference_depth
    print(f"{args.source}: {inputs.numel()} tokens, depth K={K}, full-depth decoding ppl {full_ppl:.2f}")
    print("| exit policy | threshold | exit KV | mean loops | loops saved | ppl | Δppl | top-1 agree |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for policy in args.policies:
        thresholds = SWEEPS[policy]
        for threshold in thresholds:
            for kv in ("copy", "compute"):
                logits, loops = decode(model, inputs, exit_policy=policy, exit_threshold=threshold, exit_kv=kv)
                ppl = math.exp(nll(logits, targets))
                mean_loops = float(loops.double().mean())
                agree = float((logits.argmax(-1) == reference).double().mean())
                print(f"| {policy} | {threshold} | {kv} | {mean_loops:.2f} | {100 * (1 - mean_loops / K):.0f}% | "
                      f"{ppl:.2f} | {100 * (ppl / full_ppl - 1):+.1f}% | {100 * agree:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
