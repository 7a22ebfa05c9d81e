"""`looptrain inspect`, `looptrain export` (transformers folder by default) and `looptrain generate`.

Heavy imports (torch, transformers, the checkpoint readers) happen inside the
run functions, so registering these commands costs nothing at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from looptrain import exit_codes

FORMATS = ("hf", "looptrain")


def _error(message: str) -> int:
    print(f"looptrain: error: {message}", file=sys.stderr)
    return exit_codes.BAD_INPUT


# ------------------------------------------------------------------ inspect


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run / checkpoints directory (its latest)")
    parser.add_argument("recipe", nargs="?", default=None,
                        help="a recipe to diff against (the one you would resume with)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for that recipe")


def run_inspect(args) -> int:
    from looptrain.checkpoint.tools import run_inspect as inspect_checkpoint  # lazy for start-up time (torch)

    return inspect_checkpoint(args)


# ------------------------------------------------------------------ export


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint, a run / checkpoints directory (its latest), or an export")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf (default): a transformers folder (trust_remote_code) that is also a looptrain "
                        "export; looptrain: model.safetensors + model_config.json only")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece model to ship (default: the run's dataset tokenizer.model)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")


def run_export(args) -> int:
    if args.format == "looptrain":
        from looptrain.checkpoint.tools import run_export as run_looptrain_export

        return run_looptrain_export(args)
    from looptrain.checkpoint.errors import CheckpointError
    from looptrain.data.errors import DataError
    from looptrain.hf.export import ExportError, export_hf

    out = Path(args.out)
    if not args.overwrite and ((out / "config.json").exists() or (out / "model.safetensors").exists()):
        return _error(f"{out}: already holds an export; pass --overwrite or choose another OUT")
    if Path(args.checkpoint).resolve() == out.resolve():
        return _error(f"{out}: the output must differ from the source; choose another OUT")
    try:
        export_hf(args.checkpoint, out, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer)
    except (ExportError, CheckpointError, DataError) as err:
        return _error(str(err))
    print(f"exported {args.checkpoint} -> {out} (transformers: AutoModelForCausalLM.from_pretrained(dir, "
          "trust_remote_code=True))")
    return exit_codes.OK


# ------------------------------------------------------------------ generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CKPT|RUN_DIR|EXPORT", help="a checkpoint, a run directory or an export")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="loops per token (default: the trained K)")
    parser.add_argument("--exit-policy", default=None,
                        help="per-token early exit: none, fixed, max_prob, margin, logit_margin, entropy, kl, gate")
    parser.add_argument("--threshold", type=float, default=None, help="exit when the policy's confidence >= T")
    parser.add_argument("--exit-kv", choices=("copy", "compute"), default=None,
                        help="keys/values of an exited token at deeper loops: copy its exit loop's (default) "
                        "or compute them to full depth")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the export's / run's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; 1 is often fastest for one sequence on a busy machine)")


def run_generate(args) -> int:
    from looptrain.checkpoint.errors import CheckpointError
    from looptrain.data.errors import DataError
    from looptrain.generate import GenerateError, Knobs, Sampling, load_for_generation, load_tokenizer, \
        stream_generate

    if args.depth is not None and args.depth < 1:
        return _error(f"--depth must be >= 1 loop, got {args.depth}")
    knobs = Knobs(args.depth, args.exit_policy, args.threshold, args.exit_kv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        sampling.check()
        tokenizer = load_tokenizer(Path(args.source), args.tokenizer)
        model = load_for_generation(args.source).to(args.device)
        try:
            cfg = model.config
            cfg.check_inference_knobs(knobs.depth or cfg.inference_depth, knobs.exit_policy or cfg.exit_policy,
                                      knobs.exit_kv or cfg.exit_kv)
        except ValueError as err:  # an inference knob the model refuses (unknown policy, gate without a gate)
            raise GenerateError(str(err)) from None
        sys.stdout.write(args.prompt)
        stats = stream_generate(model, tokenizer, args.prompt, sampling, knobs, use_cache=not args.no_cache)
    except (GenerateError, CheckpointError, DataError) as err:
        return _error(str(err))
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else float("inf")
    print(f"[{stats['tokens']} tokens in {stats['seconds']:.2f} s, {rate:.1f} tok/s, "
          f"mean loops per token {stats['mean_loops']:.2f}]", file=sys.stderr)
    return exit_codes.OK
