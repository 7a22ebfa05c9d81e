"""`looptrain eval CKPT_OR_RUN... [--data DIR] [--depths 1..8 | 8] [--batches N] [--out DIR]
[--exit-target 0.01] [--diagnostics]`.

Writes results.json, results.csv, exits.csv, results.md and the PNGs into
--out and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from looptrain import exit_codes
from looptrain.eval.load import EvalError

DEFAULT_OUT = "eval_out"


def parse_depths(text: Optional[str]) -> Optional[list[int]]:
    """"8" -> 1..8, "2..16" -> 2..16, "1,2,4,8" -> those; None -> None (the default range)."""
    if text is None:
        return None
    try:
        if ".." in text:
            low, high = (int(x) for x in text.split("..", 1))
            depths = list(range(low, high + 1))
        elif "," in text:
            depths = sorted({int(x) for x in text.split(",") if x.strip()})
        else:
            depths = list(range(1, int(text) + 1))
    except ValueError:
        raise EvalError(f"--depths {text!r}: use a depth (8), a range (1..8) or a list (1,2,4,8)") from None
    if not depths or depths[0] < 1:
        raise EvalError(f"--depths {text!r}: depths must be >= 1 and the range non-empty, e.g. 1..8")
    return depths


def default_out_dir(names: list[str]) -> str:
    """./eval_out/NAME1+NAME2...: a directory of its own for this set of runs,
    never inside a run directory (which belongs to its training run)."""
    label = "+".join(name.replace(os.sep, "_") for name in names) or "eval"
    if len(label) > 100:
        label = f"{label[:90]}+{len(names)}-runs"
    return os.path.join(DEFAULT_OUT, label)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="CKPT_OR_RUN",
                        help="exported model dirs (model.safetensors + model_config.json), checkpoints or run dirs")
    parser.add_argument("--data", default=None, help="prepared dataset (default: each run's recipe data.dir)")
    parser.add_argument("--depths", default=None,
                        help="inference depths: 8 (= 1..8), 2..16 or 1,2,4,8 (default: 1..2K, K = trained loops)")
    parser.add_argument("--batches", type=int, default=None,
                        help="validation batches per run (default: the recipe's train.val_batches, else 20), "
                        "the same batches the trainer validates on")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per batch (default: the recipe's micro_batch_size, else 8)")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: ./{DEFAULT_OUT}/NAME1+NAME2..., from the runs' names)")
    parser.add_argument("--exit-target", type=float, default=0.01,
                        help="early exit: largest allowed perplexity increase over full depth (0.01 = 1%%)")
    parser.add_argument("--exit-depth", type=int, default=None,
                        help="early exit over exits 1..E (default: the trained depth, capped at the deepest depth)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also measure the radial gradient share, the radial-clamp effect and norm histograms")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="autocast precision of the model's matmuls (losses stay fp32)")
    parser.add_argument("--chunk-tokens", type=int, default=4096,
                        help="tokens per chunk of full-vocabulary logits (lower it if memory is short)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run_eval(args: argparse.Namespace) -> int:
    from looptrain.checkpoint.errors import CheckpointError
    from looptrain.config.schema import RecipeError
    from looptrain.data.errors import DataError
    from looptrain.eval.plots import write_plots
    from looptrain.eval.report import markdown, write_reports
    from looptrain.eval.run import evaluate_run

    bad_input = (EvalError, DataError, RecipeError, CheckpointError)
    try:
        if args.exit_target < 0:
            raise EvalError(f"--exit-target must be >= 0 (0.01 = 1%), got {args.exit_target}")
        depths = parse_depths(args.depths)
        results = [
            evaluate_run(
                path, args.data, depths, args.batches, batch_size=args.batch_size,
                exit_depth=args.exit_depth, tolerance=args.exit_target, diagnostics=args.diagnostics,
                device=args.device, precision=args.precision, chunk_tokens=args.chunk_tokens,
                progress=not args.no_progress,
            )
            for path in args.paths
        ]
    except bad_input as err:
        print(f"looptrain eval: error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    _unique_names(results)
    out_dir = args.out or default_out_dir([r["name"] for r in results])
    os.makedirs(out_dir, exist_ok=True)
    files = write_reports(results, out_dir)
    files.update(write_plots(results, out_dir))
    print(markdown(results))
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in files.values()))} to {out_dir}")
    return exit_codes.OK


def _unique_names(results: list[dict]) -> None:
    """Give runs that share a directory name distinct labels (name, name#2, ...)."""
    seen: dict[str, int] = {}
    for r in results:
        count = seen.get(r["name"], 0) + 1
        seen[r["name"]] = count
        if count > 1:
            r["name"] = f"{r['name']}#{count}"
