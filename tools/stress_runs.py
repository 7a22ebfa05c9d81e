"""Many runs packed onto one machine, a third of them killed with SIGKILL while saving, then resumed.

    python tools/stress_runs.py --runs 20 --steps 40 --out /tmp/stress

What a sweep packed onto one node meets: N `looptrain train` runs start at the
same moment (streaming shared memory, rendezvous ports, CPU), each saving a
checkpoint every step; a random third is killed with SIGKILL (the process
group: no handler runs) while a save is in progress, then started again with
the same command. It reports

- failed starts: runs that exited non-zero without being killed, or whose
  restart failed (goal 0);
- non-exact resumes: killed-and-resumed runs whose per-step losses differ
  from an uninterrupted run of the same recipe (goal 0);
- lost checkpoints: a checkpoint committed before the kill that is gone or
  refused afterwards, or a restart that resumed from an older step (goal 0).

All runs share one recipe (only the name differs), so every run that was not
killed is a reference for the others. Prints one JSON summary line at the end
and exits 1 when any goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "quickstart.yaml"


def train_command(args, name: str) -> list[str]:
    command = [
        sys.executable, "-m", "looptrain.cli", "train", str(RECIPE),
        "model.d_model=64", "model.n_heads=4", "model.vocab_size=512", "model.max_seq_len=64", "model.core_layers=2",
        f"train.steps={args.steps}", "train.micro_batch_size=4", "train.log_every=1", "train.val_every=0",
        "optim.schedule.warmup_steps=2", "tracking.mode=disabled", f"data.dir={args.data}", f"out_dir={args.out}",
        f"name={name}", "data.num_canonical_nodes=2", "checkpoint.every=1", "checkpoint.keep_last=2",
    ]
    if args.nproc > 1:
        command += ["parallel.backend=fsdp2", "--nproc", str(args.nproc)]
    return command


def start(args, name: str, attempt: int) -> subprocess.Popen:
    log = open(Path(args.out) / f"{name}.attempt{attempt}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(train_command(args, name), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints renamed into place with a manifest (what a resume may load)."""
    steps = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        if (path / "manifest.json").is_file():
            steps.append(int(path.name.split("_")[1]))
    return sorted(steps)


def saving(run_dir: Path) -> bool:
    """A save in progress: a temporary checkpoint directory exists."""
    return any((run_dir / "checkpoints").glob(".tmp-*"))


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if "train/loss" in record:
            out[int(record["step"])] = record["train/loss"]
    return out


def kill_mid_save(proc: subprocess.Popen, run_dir: Path, deadline: float) -> tuple[bool, list[int]]:
    """SIGKILL the run's process group while a save is in progress (or at the deadline);
    return (whether a save was in progress, the committed checkpoints just before)."""
    while time.monotonic() < deadline and proc.poll() is None:
        if saving(run_dir) and committed_steps(run_dir):
            before = committed_steps(run_dir)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, before
        time.sleep(0.005)
    before = committed_steps(run_dir)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return False, before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kill-fraction", type=float, default=1 / 3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run")
    parser.add_argument("--data", default=None, help="a prepared dataset (default: prepare the Bible into --out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = str(out / "data")
        if not (Path(args.data) / "dataset.json").exists():
            sys.path.insert(0, str(REPO_ROOT))
            from looptrain.data.prepare import prepare_dataset

            prepare_dataset("bible", args.data, vocab_size=512, seq_len=64, progress=False)
    rng = random.Random(args.seed)
    names = [f"run{i:02d}" for i in range(args.runs)]
    victims = set(rng.sample(names, round(args.runs * args.kill_fraction)))
    deadline = time.monotonic() + args.timeout_s
    started = time.monotonic()

    procs = {name: start(args, name, 0) for name in names}
    print(f"started {len(procs)} runs ({args.nproc} rank(s) each); killing {sorted(victims)} mid-save", flush=True)
    killed: dict[str, dict] = {}
    pending = set(victims)
    kill_after = {name: rng.randint(1, max(1, args.steps - 3)) for name in victims}
    while pending and time.monotonic() < deadline:  # kill each victim in its first save after a random step
        for name in sorted(pending):
            run_dir = out / name
            if procs[name].poll() is not None:
                pending.discard(name)
                continue
            if max(committed_steps(run_dir) or [0]) >= kill_after[name]:
                mid_save, before = kill_mid_save(procs[name], run_dir, time.monotonic() + 120)
                killed[name] = {"mid_save": mid_save, "committed_before": before, "target_step": kill_after[name],
                                "committed_after": committed_steps(run_dir)}
                pending.discard(name)
        time.sleep(0.05)
    codes = {name: proc.wait(timeout=max(1.0, deadline - time.monotonic())) for name, proc in procs.items()
             if name not in killed}
    failed_starts = sorted(name for name, code in codes.items() if code != 0)

    restarts = {name: start(args, name, 1) for name in killed}
    restart_codes = {name: proc.wait(timeout=max(1.0, deadline - time.monotonic())) for name, proc in restarts.items()}
    failed_starts += sorted(name for name, code in restart_codes.items() if code != 0)

    references = [losses(out / name) for name, code in codes.items() if code == 0]
    reference = references[0] if references else {}
    non_exact, lost = [], []
    for name, info in killed.items():
        run_dir = out / name
        if reference and losses(run_dir) != reference:
            non_exact.append(name)
        latest_before = info["committed_before"][-1] if info["committed_before"] else None
        log = (out / f"{name}.attempt1.log").read_text()
        if "refused" in log or (latest_before is not None and latest_before not in info["committed_after"]):
            lost.append(name)
    summary = {
        "runs": args.runs, "ranks_per_run": args.nproc, "steps": args.steps, "killed": len(killed),
        "killed_mid_save": sum(1 for k in killed.values() if k["mid_save"]),
        "killed_at_steps": sorted(k["committed_before"][-1] for k in killed.values() if k["committed_before"]),
        "failed_starts": failed_starts, "non_exact_resumes": non_exact, "lost_checkpoints": lost,
        "references_agree": all(r == reference for r in references),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0 if not (failed_starts or non_exact or lost) and summary["references_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
