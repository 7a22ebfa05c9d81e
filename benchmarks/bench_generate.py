"""Generation speed with the per-(loop, layer) KV cache vs recomputing the prefix, and the
transformers export + load round trip, for the quickstart and the paper's 44M shapes.

    python benchmarks/bench_generate.py [--shapes quickstart 44m] [--new-tokens 256] [--threads 1]

Greedy decoding of `--new-tokens` tokens after a 16-token prompt at the trained depth
(K=4), `--batch` sequences (default 1: `looptrain generate`'s own loop), fp32, CPU, randomly initialised weights (speed does not depend on
them). Both shapes get max_seq_len 512 so that 16 + 256 positions fit (their learned
position tables are otherwise 128 and 256). Columns:
    cache tok/s      `looptrain.generate.generate_steps` with the cache (one token per forward)
    recompute tok/s  the same with use_cache=False (the whole prefix every token)
    speed-up         their ratio; the generated tokens are checked to be identical
    export s         `export_hf` from a looptrain export (re-save weights, code, config, card)
    load s           `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looptrain.checkpoint.exported import save_exported  # noqa: E402
from looptrain.config import load_recipe  # noqa: E402
from looptrain.generate import Knobs, Sampling, generate_steps, hf_model_from_export  # noqa: E402
from looptrain.hf.export import export_hf  # noqa: E402
from looptrain.hf.runtime import import_transformers  # noqa: E402
from looptrain.model import build_model  # noqa: E402

SHAPES = {"quickstart": "recipes/quickstart.yaml", "44m": "recipes/paper/44m/perloop_rmsnorm.yaml"}


@torch.no_grad()
def decode(model, prompts: torch.Tensor, new_tokens: int, use_cache: bool):
    """Greedy continuation of (B, T) prompts: (B, new_tokens) tokens and the seconds it took."""
    if prompts.shape[0] == 1:  # the path `looptrain generate` takes
        sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
        start = time.perf_counter()
        tokens = [s.token for s in generate_steps(model, prompts[0].tolist(), sampling, Knobs(), use_cache=use_cache)]
        return torch.tensor([tokens]), time.perf_counter() - start
    start = time.perf_counter()
    seq = prompts
    out = model(seq, use_cache=use_cache, logits_to_keep=1)
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, token), dim=1)
        if use_cache:
            out = model(token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        else:
            out = model(seq, use_cache=False, logits_to_keep=1)
    return seq[:, prompts.shape[1]:], time.perf_counter() - start


def bench(shape: str, new_tokens: int, batch: int) -> dict:
    cfg = load_recipe(str(ROOT / SHAPES[shape]), ["model.max_seq_len=512"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    transformers = import_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        save_exported(model.state_dict(), cfg, Path(tmp) / "src")
        t0 = time.perf_counter()
        export_hf(Path(tmp) / "src", Path(tmp) / "hf", with_tokenizer=False)
        t1 = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"), trust_remote_code=True)
        t2 = time.perf_counter()
        hf = hf_model_from_export(Path(tmp) / "hf")
    prompts = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(1))
    cached, t_cache = decode(hf, prompts, new_tokens, True)
    full, t_full = decode(hf, prompts, new_tokens, False)
    assert torch.equal(cached, full), "cached and recomputed greedy tokens differ"
    tokens = batch * new_tokens
    return {"shape": shape, "batch": batch, "cache": tokens / t_cache, "recompute": tokens / t_full,
            "speedup": t_full / t_cache, "export": t1 - t0, "load": t2 - t1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| shape | batch | cache tok/s | recompute tok/s | speed-up | export s | load s |  ({args.new_tokens} new "
          f"tokens, {args.threads} thread(s))")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        r = bench(shape, args.new_tokens, args.batch)
        print(f"| {r['shape']} | {r['batch']} | {r['cache']:.1f} | {r['recompute']:.1f} | {r['speedup']:.1f}x | "
              f"{r['export']:.2f} | {r['load']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
