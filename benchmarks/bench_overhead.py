"""What does looptrain cost over a hand-written PyTorch loop? (CPU, the paper's 44M shape)

Two implementations of the same training step -- same model, same batch,
same AdamW + clipping -- are timed in alternating rounds, so that load from
other processes hits both alike:

  plain      the looped LM written inline below with no looptrain import: a
             nanoGPT-style model, full-vocabulary `F.cross_entropy` at every
             exit, `loss.backward()`, `clip_grad_norm_`, `AdamW.step()`.
  looptrain  `build_model` + `LoopedLMTrainModule` + `SingleBackend`:
             `forward_backward` then `optimizer_step`, exactly what the
             trainer calls per step (data loading and logging excluded).

Before timing, the plain model loads looptrain's weights and both must give
the same loss (dropout off), so the comparison is the same model computed two
ways. The paper's 44M model: d 512, 8 layers, 8 heads, SwiGLU 4x, K=4, seq 256,
vocab 20k, tied head, dropout 0.1, per-loop supervision. The batch is reduced
(default 2 x 256) so that a run takes about two minutes on an idle machine.

Clock: on a shared machine wall time measures the neighbours as much as the
step, so the overhead is computed from the CPU time of this process
(`time.process_time`) with one intra-op thread by default, where the two
implementations do the same work on the same core; wall-clock tokens/s are
printed alongside. On a quiet machine `--threads N --clock wall` gives the
multi-threaded wall-clock comparison.

    python benchmarks/bench_overhead.py [--batch 2] [--seq 256] [--steps 3] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Section 1: the plain PyTorch looped LM (self-contained, no looptrain imports)
# ----------------------------------------------------------------------------

VOCAB, D, HEADS, LAYERS, LOOPS, SEQ, MLP, DROPOUT, EPS = 20000, 512, 8, 8, 4, 256, 2048, 0.1, 1e-5


class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, EPS)


class PlainAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, D))


class PlainSwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(D, MLP, bias=False)
        self.w3 = nn.Linear(D, MLP, bias=False)
        self.w2 = nn.Linear(MLP, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.attn = PlainRMSNorm(D), PlainAttention()
        self.mlp_norm, self.mlp = PlainRMSNorm(D), PlainSwiGLU()
        self.mlp_dropout = nn.Dropout(DROPOUT)

    def forward(self, h):
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))


class PlainCore(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(PlainBlock() for _ in range(LAYERS))


class PlainReadout(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = PlainRMSNorm(D)


class PlainLoopedLM(nn.Module):
    """Embeddings -> the 8 shared layers run LOOPS times -> RMSNorm readout -> tied head at every exit."""

    def __init__(self):
        super().__init__()
        self.tok_embed = nn.Embedding(VOCAB, D)
        self.pos_embed = nn.Embedding(SEQ, D)
        self.embed_dropout = nn.Dropout(DROPOUT)
        self.core = PlainCore()
        self.readout = PlainReadout()

    def forward(self, tokens, targets):
        h = self.embed_dropout(self.tok_embed(tokens) + self.pos_embed.weight[: tokens.shape[1]])
        loss = 0.0
        for _ in range(LOOPS):
            for layer in self.core.layers:
                h = layer(h)
            logits = F.linear(self.readout.norm(h), self.tok_embed.weight)
            loss = loss + F.cross_entropy(logits.view(-1, VOCAB).float(), targets.reshape(-1))
        return loss / LOOPS


def plain_setup():
    model = PlainLoopedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
    return model, optimizer


def plain_step(model, optimizer, tokens, targets) -> None:
    loss = model(tokens, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------
# Section 2: the same step through looptrain
# ----------------------------------------------------------------------------


def looptrain_setup(batch: int, seq: int):
    from looptrain.config import recipe_from_dict
    from looptrain.model import build_model
    from looptrain.parallel import build_backend
    from looptrain.parallel.env import DistEnv
    from looptrain.train_module import LoopedLMTrainModule

    recipe = recipe_from_dict({
        "name": "bench",
        "model": {"vocab_size": VOCAB, "d_model": D, "n_heads": HEADS, "core_layers": LAYERS, "loops": LOOPS,
                  "max_seq_len": seq, "mlp_ratio": MLP / D, "dropout": DROPOUT, "norm_eps": EPS},
        "objective": {"supervision": "per_loop"},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.01, "clip_grad_norm": 1.0},
        "train": {"micro_batch_size": batch, "device": "cpu"},
        "parallel": {"backend": "single"},
    })
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    backend = build_backend(recipe, env)
    backend.setup(LoopedLMTrainModule(build_model(recipe.model), recipe.objective))
    return backend


def looptrain_step(backend, tokens, targets) -> None:
    backend.forward_backward(tokens, targets, depth=LOOPS, backprop_loops=None, measure_all_exits=False,
                             last_micro_step=True)
    backend.optimizer_step(3e-4)


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------


@torch.no_grad()
def check_same_model(plain, backend, tokens, targets) -> float:
    """Load looptrain's weights into the plain model; both losses must agree (dropout off)."""
    missing, unexpected = plain.load_state_dict(backend.model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    plain.eval()
    backend.module.eval()
    a = plain(tokens, targets)
    b = backend.module(tokens, targets).loss
    plain.train()
    backend.module.train()
    assert torch.allclose(a, b, rtol=1e-4), f"the two implementations differ: {a.item()} vs {b.item()}"
    return abs(a.item() - b.item())


def timed(step, n: int) -> tuple[list[float], list[float]]:
    """(CPU seconds, wall seconds) of each of n steps."""
    cpu, wall = [], []
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return cpu, wall


def cross_entropy_cost(tokens: int, repeats: int = 5) -> dict[str, float]:
    """CPU seconds of one exit's loss forward+backward, three ways.

    full:       F.cross_entropy on the full (tokens x vocab) logits, kept for backward.
    recompute:  looptrain's per-token chunked CE (used for exit-gated supervision,
                whose token weights are only known in backward): logits are
                recomputed in backward, one extra (tokens x d x vocab) matmul.
    fused:      looptrain's weighted-exits CE (terminal and per-loop supervision):
                gradients made chunk by chunk in forward, only scaled in backward.
    """
    from looptrain.objectives import chunked_cross_entropy, weighted_exits_cross_entropy

    x = torch.randn(tokens, D, requires_grad=True)
    w = (torch.randn(VOCAB, D) * 0.02).requires_grad_()
    t = torch.randint(0, VOCAB, (tokens,))
    variants = {
        "full": lambda: F.cross_entropy(F.linear(x, w).float(), t).backward(),
        "recompute": lambda: chunked_cross_entropy(x, w, t, 8192).mean().backward(),
        "fused": lambda: weighted_exits_cross_entropy([x], w, t, [1.0], 8192)[0].backward(),
    }
    cost = {}
    for name, fn in variants.items():
        fn()
        cost[name] = statistics.median(timed(fn, repeats)[0])
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and implementation")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (plain, looptrain, plain, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="which time the overhead is computed from")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1))
    tokens, targets = tokens[:, :-1], tokens[:, 1:]
    backend = looptrain_setup(args.batch, args.seq)
    plain, plain_opt = plain_setup()
    diff = check_same_model(plain, backend, tokens, targets)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)

    runs = {
        "plain PyTorch": lambda: plain_step(plain, plain_opt, tokens, targets),
        "looptrain (SingleBackend)": lambda: looptrain_step(backend, tokens, targets),
    }
    for step in runs.values():  # warm-up: allocator, optimizer state
        step()
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            c, w = timed(step, args.steps)
            cpu[name] += c
            wall[name] += w

    n_tokens = args.batch * args.seq
    clock = cpu if args.clock == "cpu" else wall
    base = statistics.median(clock["plain PyTorch"])
    print(f"44M looped LM (d {D}, {LAYERS} layers x K={LOOPS}, vocab {VOCAB}), batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} intra-op thread(s), {args.rounds} rounds x {args.steps} steps, "
          f"overhead from {args.clock} time; loss difference of the two implementations on the same weights: "
          f"{diff:.1e}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| implementation | median CPU s/step | median wall s/step | tokens/s (CPU time) "
          "| tokens/s (wall) | overhead vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        med = statistics.median(clock[name])
        print(f"| {name} | {c:.2f} | {w:.2f} | {n_tokens / c:,.0f} | {n_tokens / w:,.0f} "
              f"| {100 * (med / base - 1):+.1f}% |")
    cost = cross_entropy_cost(n_tokens)
    plain_step_s = statistics.median(cpu["plain PyTorch"])
    print(f"\nThe loss alone, one exit's cross-entropy forward+backward ({n_tokens} tokens x {VOCAB} vocab), CPU s:")
    print("| variant | CPU s | vs full logits, per step over all exits |")
    print("|---|---:|---:|")
    for name, label in [("full", "full logits (plain)"), ("fused", "looptrain terminal/per-loop (fused)"),
                        ("recompute", "looptrain exit-gated (recompute)")]:
        extra = LOOPS * (cost[name] - cost["full"])
        print(f"| {label} | {cost[name]:.3f} | {100 * extra / plain_step_s:+.1f}% of the plain step |")


if __name__ == "__main__":
    main()
