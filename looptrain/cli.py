"""`looptrain` command line.

Heavy imports (torch.distributed, streaming, wandb, deepspeed) happen inside
the commands that need them, so `looptrain --help` and `looptrain info` start
quickly.
"""

from __future__ import annotations

import argparse
import sys

from looptrain import exit_codes
from looptrain.launch.cli import allow_overrides_after_options


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted recipe overrides, e.g. optim.lr=1e-3 model.loops=8")


def _load(args):
    from looptrain.config import load_recipe  # lazy, as every import below, for start-up time

    return load_recipe(args.recipe, args.overrides)


# ----------------------------------------------------------------------- train


def cmd_train(args) -> int:
    from looptrain.launch.local import check_nproc, launch_local

    if args.nproc is not None:
        check_nproc(args.nproc)
    recipe = _load(args)  # fail fast on a bad recipe, before starting workers
    if args.nproc and args.nproc > 1:
        from looptrain.config.schema import check_world_size

        check_world_size(recipe, args.nproc, f"--nproc {args.nproc}")

        argv = ["train", args.recipe, *args.overrides]
        if args.force_resume:
            argv.append("--force-resume")
        return launch_local(argv, args.nproc)
    from looptrain.train import main_worker  # lazy for start-up time: imports torch

    return main_worker(recipe, force_resume=args.force_resume)


# ------------------------------------------------------------------------ info


def format_info(recipe) -> str:
    import torch  # lazy for start-up time

    from looptrain.config import recipe_to_yaml
    from looptrain.model import build_model
    from looptrain.objectives import head_exits

    with torch.device("meta"):
        model = build_model(recipe.model)
    counts = model.parameter_counts()
    m = recipe.model
    lines = ["# resolved recipe", recipe_to_yaml(recipe).rstrip(), "", "# model"]
    lines.append(f"{'part':<12}{'parameters':>16}")
    for part in ("embeddings", "prelude", "core", "coda", "head", "other", "total"):
        lines.append(f"{part:<12}{counts.get(part, 0):>16,}")
    o = recipe.objective
    exits = head_exits(o)
    flops = model.flops_per_token(depth=m.loops, seq_len=m.max_seq_len, training=True,
                                  backprop_loops=o.backprop_loops, exits=exits)
    fwd = model.flops_per_token(depth=m.loops, seq_len=m.max_seq_len, training=False, exits=exits)
    lines.append("")
    lines.append(
        f"model FLOPs per token at depth {m.loops}: {flops / 1e9:.3f} GFLOP training (fwd+bwd), "
        f"{fwd / 1e9:.3f} GFLOP forward"
    )
    lines.append(
        f"effective depth: {m.prelude_layers} + {m.core_layers} x {m.loops} + {m.coda_layers} layers; "
        f"readout={m.readout}, recurrence={m.recurrence}, supervision={recipe.objective.supervision}, "
        f"norm_penalty={recipe.objective.norm_penalty.weight}"
    )
    return "\n".join(lines)


def cmd_info(args) -> int:
    print(format_info(_load(args)))
    return exit_codes.OK


# ------------------------------------------------------------------ quickstart


def cmd_quickstart(args) -> int:
    from looptrain.quickstart import run_quickstart  # lazy for start-up time

    return run_quickstart(out_dir=args.out, data_dir=args.data, steps=args.steps, overrides=args.overrides)


# --------------------------------------------------------------------- parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line `argv`, only the modules of the
    commands named in it are imported (lazy for start-up time: `looptrain --help`
    and argument errors answer without importing torch)."""
    parser = argparse.ArgumentParser(
        prog="looptrain",
        description="Train looped language models with per-loop supervision and hidden-state scale control.",
    )
    # The `deepspeed` launcher runs `python -m looptrain.cli --local_rank=N COMMAND ...`;
    # the rank is read from LOCAL_RANK, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.looptrain_argv = argv  # read by _add_optional

    p = sub.add_parser("train", help="train a recipe (under torchrun/srun/deepspeed, or --nproc N locally)")
    _recipe_args(p)
    p.add_argument("--nproc", type=int, default=None, help="start N local worker processes")
    p.add_argument("--force-resume", action="store_true",
                   help="resume a run that the norm monitor halted (HALTED.json)")
    allow_overrides_after_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="print the resolved recipe, parameter counts and FLOPs per token")
    _recipe_args(p)
    allow_overrides_after_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quickstart", help="prepare a small English corpus and train two small looped models on CPU")
    p.add_argument("--out", default="runs/quickstart", help="where the two runs go")
    p.add_argument("--data", default="data/quickstart", help="prepared dataset directory (made if missing)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to both runs")
    allow_overrides_after_options(p)
    p.set_defaults(func=cmd_quickstart)

    _add_optional(sub, "prepare", "looptrain.data.cli", "add_prepare_arguments", "run_prepare",
                  "train a tokenizer and write MDS shards from text/JSONL (or --corpus bible)",
                  run_module="looptrain.launch.prepare_array", run_name="run_prepare_command")
    _add_optional(sub, "plot", "looptrain.plot", "add_plot_arguments", "run_plot",
                  "plot norm per loop and loss per exit for one or more runs")
    _add_optional(sub, "inspect", "looptrain.export_cli", "add_inspect_arguments", "run_inspect",
                  "show a checkpoint: step, tokens, recipe diff, shards, per-loop norms")
    _add_optional(sub, "export", "looptrain.export_cli", "add_export_arguments", "run_export",
                  "write a checkpoint as a transformers model folder (or --format looptrain)")
    _add_optional(sub, "generate", "looptrain.export_cli", "add_generate_arguments", "run_generate",
                  "sample text from a checkpoint, run or export with a KV cache, streaming it")
    _add_optional(sub, "eval", "looptrain.eval.cli", "add_eval_arguments", "run_eval",
                  "perplexity per inference depth, early exits and scale diagnostics")
    _add_optional(sub, "launch", "looptrain.launch.cli", "add_launch_arguments", "run_launch",
                  "submit a recipe to a Slurm cluster through submitit")
    _add_optional(sub, "sweep", "looptrain.launch.cli", "add_sweep_arguments", "run_sweep",
                  "submit a grid of overrides as one Slurm job array")
    _add_optional(sub, "status", "looptrain.launch.cli", "add_status_arguments", "run_status",
                  "show the state of a launch or sweep")
    _add_optional(sub, "cancel", "looptrain.launch.cli", "add_cancel_arguments", "run_cancel",
                  "cancel a launch or sweep")
    return parser


def _add_optional(sub, name: str, module: str, add: str, run: str, help_text: str, *,
                  run_module: str | None = None, run_name: str | None = None) -> None:
    """Register a command whose arguments live next to its implementation
    (those modules keep their heavy imports inside the run function). With a
    command line at hand, a command it does not name is listed by its help
    text alone and its module is not imported."""
    import importlib

    p = sub.add_parser(name, help=help_text)
    argv = getattr(sub, "looptrain_argv", None)
    if argv is not None and name not in argv:
        return
    mod = importlib.import_module(module)
    getattr(mod, add)(p)
    runner = importlib.import_module(run_module) if run_module else mod
    p.set_defaults(func=getattr(runner, run_name or run))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from looptrain.checkpoint.errors import CheckpointError  # lazy for start-up time (light, but not needed for --help)
    from looptrain.config import RecipeError
    from looptrain.data.errors import DataError

    try:
        code = args.func(args)
    except (RecipeError, DataError, CheckpointError) as err:
        print(f"looptrain: error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
