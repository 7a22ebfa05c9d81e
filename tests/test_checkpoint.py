"""Checkpoints: full-state save and exact resume, validation, atomic commit,
retention, recipe checks, halted runs, inspect and export.

Unit-level tests run the real trainer in this process on the `single`
backend with a tiny model; end-to-end tests start real worker processes
(FSDP2 and DeepSpeed over gloo), kill them with SIGKILL and resume.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from looptrain.checkpoint import CheckpointError
from looptrain.checkpoint.layout import committed, read_latest, step_name

from kill_helpers import kill_while_saving
from looptrain.checkpoint.manifest import read_manifest, validate
from looptrain.config.loader import apply_overrides, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
VOCAB = 512


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small real-English dataset (150 chapters of the KJV), shared by the module."""
    from looptrain.data.corpus import DocumentSource, corpus_text
    from looptrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("ckpt-data") / "bible150"
    source = DocumentSource(
        describe={"corpus": "bible", "first_chapters": 150},
        documents=lambda: itertools.islice(corpus_text("bible"), 150),
    )
    prepare_dataset(source, out, vocab_size=VOCAB, seq_len=SEQ_LEN, val_fraction=0.05, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def small_dataset(dataset, tmp_path_factory) -> str:
    """10 chapters with the same tokenizer: 419 training sequences, an epoch of 26 batches of 16."""
    from looptrain.data.corpus import DocumentSource, corpus_text
    from looptrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("ckpt-data") / "bible10"
    source = DocumentSource(
        describe={"corpus": "bible", "first_chapters": 10},
        documents=lambda: itertools.islice(corpus_text("bible"), 10),
    )
    prepare_dataset(source, out, tokenizer_path=Path(dataset) / "tokenizer.model", seq_len=SEQ_LEN,
                    val_fraction=0.1, progress=False)
    return str(out)


@pytest.fixture(scope="module", autouse=True)
def warm_peak_flops_probe():
    """The trainer measures this CPU's matmul peak once per process (cached), drawing
    random matrices from the global generator the first time only. Measuring it up
    front gives every in-process run the same RNG history, as separate processes have."""
    from looptrain.perf import peak_flops

    peak_flops(torch.device("cpu"), "fp32")


def recipe_dict(dataset: str, out_dir: Path, name: str = "run") -> dict:
    return {
        "name": name,
        "out_dir": str(out_dir),
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_heads": 2, "core_layers": 1, "loops": 3,
                  "max_seq_len": SEQ_LEN, "dropout": 0.1},
        "data": {"dir": dataset},
        "optim": {"lr": 3e-3},
        "train": {"steps": 6, "micro_batch_size": 4, "log_every": 1, "val_every": 0, "device": "cpu", "seed": 3},
        "checkpoint": {"every": 0, "keep_last": 2},
        "tracking": {"mode": "disabled"},
    }


def make_recipe(dataset: str, out_dir: Path, *overrides: str, name: str = "run"):
    return recipe_from_dict(apply_overrides(recipe_dict(dataset, out_dir, name), overrides))


def build_trainer(recipe, force_resume: bool = False):
    from looptrain.parallel import init_distributed
    from looptrain.train import Trainer

    env = init_distributed("cpu")
    return Trainer(recipe, env, force_resume=force_resume)


def run_trainer(recipe, force_resume: bool = False):
    trainer = build_trainer(recipe, force_resume)
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    return trainer


def optimizer_tensors(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for i, (_, state) in enumerate(sorted(trainer.backend.optimizer.state_dict()["state"].items())):
        for key, value in state.items():
            out[f"{i}.{key}"] = torch.as_tensor(value)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpoints_of(recipe) -> list[Path]:
    return committed(Path(recipe.run_dir) / "checkpoints")


# ------------------------------------------------------------- save and load


def test_save_then_load_restores_the_full_state(dataset, tmp_path, capsys):
    from looptrain.checkpoint import Checkpointer

    recipe = make_recipe(dataset, tmp_path, "train.steps=5")
    first = run_trainer(recipe)
    ckpt = Path(recipe.run_dir) / "checkpoints" / step_name(5)
    assert read_latest(ckpt.parent) == ckpt.name
    manifest = read_manifest(ckpt)
    assert manifest["step"] == 5 and manifest["world_size"] == 1 and manifest["store"] == "dcp"
    for rel, entry in manifest["files"].items():
        assert (ckpt / rel).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert {"trainer_state.pt", "recipe.json", "rng/rank_00000.pt", "model/.metadata"} <= set(manifest["files"])
    rng_at_save = torch.get_rng_state()  # nothing drew random numbers after the final save

    # A fresh trainer (no resume), then the checkpoint loaded into it explicitly.
    fresh = build_trainer(make_recipe(dataset, tmp_path, "train.steps=5", "checkpoint.resume=none", name="other"))
    before = {k: v.clone() for k, v in fresh.backend.module.state_dict().items()}
    assert not all(torch.equal(before[k], v) for k, v in first.backend.module.state_dict().items())
    resumer = Checkpointer(make_recipe(dataset, tmp_path, f"checkpoint.resume={ckpt}", name="other"),
                           fresh.backend, fresh.env)
    assert resumer.resume(fresh) is True
    assert torch.equal(torch.get_rng_state(), rng_at_save)

    assert_same_tensors(fresh.backend.module.state_dict(), first.backend.module.state_dict())
    assert_same_tensors(optimizer_tensors(fresh), optimizer_tensors(first))
    assert fresh.state.step == 5 and fresh.state.tokens == first.state.tokens == 5 * 4 * SEQ_LEN
    assert fresh.state.last_metrics == first.state.last_metrics
    assert fresh.monitor.state_dict() == first.monitor.state_dict()
    assert torch.equal(fresh.sampler.state_dict()["generator"], first.sampler.state_dict()["generator"])
    # The data stream continues exactly where the saved run stopped.
    assert fresh.batches.state_dict() == first.batches.state_dict()
    for _ in range(3):
        assert torch.equal(next(fresh.batches), next(first.batches))
    assert "resumed from" in capsys.readouterr().out


def test_resumed_run_continues_exactly(dataset, tmp_path):
    """Train 4 steps, stop, resume to 8: the losses of steps 5-8 equal an uninterrupted run's."""
    straight = make_recipe(dataset, tmp_path, "train.steps=8", name="straight")
    run_trainer(straight)
    stopped = make_recipe(dataset, tmp_path, "train.steps=4", name="stopped")
    run_trainer(stopped)
    resumed = run_trainer(make_recipe(dataset, tmp_path, "train.steps=8", name="stopped"))
    assert resumed.state.step == 8

    def losses(run_dir: str) -> list[tuple[int, float]]:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]

    expected = [r for r in losses(straight.run_dir) if r[0] > 4]
    got = [r for r in losses(stopped.run_dir) if r[0] > 4]
    assert got == expected and len(got) == 4


class RecordBatches:
    """The trainer's batch stream, keeping a copy of every batch drawn."""

    def __init__(self, batches):
        self._batches = batches
        self.seen: list[torch.Tensor] = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        self.seen.append(batch.clone())
        return batch

    def __getattr__(self, name):
        return getattr(self._batches, name)


def run_recording(recipe) -> tuple[list[torch.Tensor], object]:
    trainer = build_trainer(recipe)
    recorder = trainer.batches = RecordBatches(trainer.batches)
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    return recorder.seen, trainer


EPOCH_BATCHES = 26  # small_dataset in batches of 16


@pytest.mark.parametrize("stop", [13, EPOCH_BATCHES], ids=["mid-epoch", "epoch-end"])
def test_resume_neither_skips_nor_repeats_a_sample(small_dataset, tmp_path, stop):
    """Stop inside the first epoch or exactly at its end, resume, run into the second epoch:
    the batches equal an uninterrupted run's, one for one."""
    steps = EPOCH_BATCHES + 6
    common = ("train.micro_batch_size=16", f"train.steps={steps}")
    straight, _ = run_recording(make_recipe(small_dataset, tmp_path, *common, name="straight"))
    first, _ = run_recording(make_recipe(small_dataset, tmp_path, *common, f"train.steps={stop}", name="stopped"))
    second, resumed = run_recording(make_recipe(small_dataset, tmp_path, *common, name="stopped"))
    assert resumed.checkpointer.resumed_from.name == step_name(stop)
    assert len(first) == stop and len(first) + len(second) == len(straight) == steps
    for i, (got, want) in enumerate(zip(first + second, straight)):
        assert torch.equal(got, want), f"batch {i + 1} differs"
    assert resumed.batches.epoch == 1  # the run went on into the second epoch
    epoch = torch.cat(straight[:EPOCH_BATCHES])  # every sequence of the epoch once: no duplicates
    assert len({tuple(row.tolist()) for row in epoch}) == len(epoch)
    # Dropout is on: the RNG streams continue exactly too, also into a new epoch.
    want = step_losses(Path(make_recipe(small_dataset, tmp_path, name="straight").run_dir))
    got = step_losses(Path(resumed.run_dir))
    assert [got[s] for s in range(stop + 1, steps + 1)] == [want[s] for s in range(stop + 1, steps + 1)]


# ---------------------------------------------------------------- validation


def test_truncated_shard_is_refused_naming_the_file(dataset, tmp_path, capsys):
    recipe = make_recipe(dataset, tmp_path, "train.steps=4", "checkpoint.every=2")
    run_trainer(recipe)
    older, newer = checkpoints_of(recipe)
    shard = newer / "model" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: \d+ bytes but manifest\.json says \d+ \(truncated\)"):
        validate(newer)
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        build_trainer(make_recipe(dataset, tmp_path, "train.steps=6", f"checkpoint.resume={newer}"))

    # auto refuses it, says so, and falls back to the previous complete checkpoint.
    capsys.readouterr()
    trainer = build_trainer(make_recipe(dataset, tmp_path, "train.steps=6", "checkpoint.every=2"))
    out = capsys.readouterr().out
    assert f"refused {newer}" in out and "__0_0.distcp" in out and f"falling back to {older.name}" in out
    assert trainer.state.step == 2 and trainer.checkpointer.resumed_from == older


def test_flipped_byte_is_caught_by_the_checksum(dataset, tmp_path):
    recipe = make_recipe(dataset, tmp_path, "train.steps=2")
    run_trainer(recipe)
    (ckpt,) = checkpoints_of(recipe)
    shard = ckpt / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: sha256 .* differs"):
        validate(ckpt)
    with pytest.raises(CheckpointError, match="none of the checkpoints step_00000002 passed validation"):
        build_trainer(recipe)


def test_pickled_objects_are_never_loaded(dataset, tmp_path):
    """A trainer_state.pt that would run code on unpickling is refused (weights_only loading)."""
    recipe = make_recipe(dataset, tmp_path, "train.steps=2")
    run_trainer(recipe)
    (ckpt,) = checkpoints_of(recipe)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state_file = ckpt / "trainer_state.pt"
    torch.save({"version": 1, "step": Exploit()}, state_file)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # make the digest match the new file
    from looptrain.checkpoint.manifest import file_sha256

    manifest["files"]["trainer_state.pt"] = {"bytes": state_file.stat().st_size, "sha256": file_sha256(state_file)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: holds a disallowed object \(GLOBAL posix.system\)"):
        build_trainer(make_recipe(dataset, tmp_path, "train.steps=4"))
    assert not marker.exists()


def test_interrupted_save_leaves_latest_on_the_previous_checkpoint(dataset, tmp_path, capsys):
    recipe = make_recipe(dataset, tmp_path, "train.steps=3", "checkpoint.every=3")
    run_trainer(recipe)
    root = Path(recipe.run_dir) / "checkpoints"
    (good,) = committed(root)
    # A save of step 5 killed half-way: a temp directory with part of the files, no manifest.
    partial = root / ".tmp-step_00000005"
    shutil.copytree(good, partial)
    (partial / "manifest.json").unlink()
    with open(partial / "model" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    # And a checkpoint-looking directory that never got its manifest.
    no_manifest = root / "step_00000004"
    shutil.copytree(partial, no_manifest)
    assert read_latest(root) == good.name

    capsys.readouterr()
    trainer = build_trainer(make_recipe(dataset, tmp_path, "train.steps=6", "checkpoint.every=3"))
    out = capsys.readouterr().out
    assert trainer.state.step == 3
    assert "step_00000004/manifest.json: missing" in out and "falling back to step_00000003" in out
    assert ".tmp-step_00000005" not in out  # temp directories are never candidates
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    # The next commit cleaned the temp debris; the manifest-less directory is left
    # alone (never ours) and not counted by retention.
    assert not partial.exists()
    assert [p.name for p in committed(root)] == ["step_00000003", "step_00000004", "step_00000006"]
    assert read_latest(root) == "step_00000006"
    validate(root / "step_00000006")


def test_kill_during_save_keeps_the_previous_checkpoint(dataset, tmp_path):
    """SIGKILL a real training process while it writes a checkpoint (slowed down
    by a large model); resume must use the last committed one."""
    recipe_path = tmp_path / "big.yaml"
    data = recipe_dict(dataset, tmp_path, "killed")
    data["model"].update({"d_model": 256, "n_heads": 4, "core_layers": 2, "dropout": 0.0})
    data["train"].update({"steps": 50, "micro_batch_size": 1})
    data["checkpoint"].update({"every": 1, "keep_last": 2})
    import yaml

    recipe_path.write_text(yaml.safe_dump(data))
    root = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "looptrain.cli", "train", str(recipe_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_worker_env(tmp_path))
    kill_while_saving(proc, root, timeout_s=60)
    done = committed(root)
    assert done, "at least one checkpoint was committed before the kill"
    for path in done:
        validate(path)  # every committed checkpoint is complete
    assert read_latest(root) == done[-1].name
    assert all(not p.name.startswith("step_") for p in root.iterdir() if p not in done)
    # Resuming picks the newest committed checkpoint and ignores the half-written one.
    recipe = recipe_from_dict(data)
    trainer = build_trainer(recipe)
    assert trainer.checkpointer.resumed_from == done[-1]


# ----------------------------------------------------------------- retention


def test_retention_keeps_last_n_and_multiples(dataset, tmp_path):
    from looptrain.checkpoint.retention import to_keep

    assert to_keep(range(1, 13), keep_last=2, keep_every=5) == {5, 10, 11, 12}
    assert to_keep(range(1, 13), keep_last=3, keep_every=0, protected=[1]) == {1, 10, 11, 12}

    recipe = make_recipe(dataset, tmp_path, "train.steps=12", "checkpoint.every=1", "checkpoint.keep_last=2",
                         "checkpoint.keep_every=5")
    run_trainer(recipe)
    assert [p.name for p in checkpoints_of(recipe)] == [step_name(s) for s in (5, 10, 11, 12)]


def test_retention_never_deletes_the_checkpoint_resumed_from(dataset, tmp_path):
    recipe = make_recipe(dataset, tmp_path, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3")
    run_trainer(recipe)
    start = Path(recipe.run_dir) / "checkpoints" / step_name(1)
    resumed = make_recipe(dataset, tmp_path, "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=1",
                          f"checkpoint.resume={start}")
    trainer = run_trainer(resumed)
    assert trainer.checkpointer.resumed_from == start
    assert [p.name for p in checkpoints_of(resumed)] == [step_name(1), step_name(6)]


# ---------------------------------------------------------------- async save


def test_async_save_commits_the_same_state_as_a_synchronous_one(dataset, tmp_path):
    sync = make_recipe(dataset, tmp_path, "train.steps=4", "checkpoint.every=2", name="sync")
    asyn = make_recipe(dataset, tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.save_async=true",
                       name="async")
    run_trainer(sync)
    trainer = run_trainer(asyn)
    assert trainer.checkpointer._pending is None  # wait() ran at the end
    for a, b in zip(checkpoints_of(sync), checkpoints_of(asyn)):
        assert a.name == b.name
        ma, mb = validate(a), validate(b)
        assert ma["files"]["model/__0_0.distcp"]["sha256"] == mb["files"]["model/__0_0.distcp"]["sha256"]
    # The async checkpoint of step 2 holds step 2's weights although training went on to step 4.
    from looptrain.checkpoint.tools import export_checkpoint

    export_checkpoint(checkpoints_of(sync)[0], tmp_path / "e_sync")
    export_checkpoint(checkpoints_of(asyn)[0], tmp_path / "e_async")
    assert (tmp_path / "e_sync/model.safetensors").read_bytes() == (tmp_path / "e_async/model.safetensors").read_bytes()


# ------------------------------------------------------------ recipe checks


def test_incompatible_recipe_change_is_refused_naming_the_key(dataset, tmp_path, capsys):
    recipe = make_recipe(dataset, tmp_path, "train.steps=2")
    run_trainer(recipe)
    with pytest.raises(CheckpointError, match=r"model\.d_model=32 but the recipe has model\.d_model=64"):
        build_trainer(make_recipe(dataset, tmp_path, "train.steps=4", "model.d_model=64"))
    with pytest.raises(CheckpointError, match=r"model\.readout='rmsnorm' but the recipe has model\.readout='raw'"):
        build_trainer(make_recipe(dataset, tmp_path, "train.steps=4", "model.readout=raw"))
    capsys.readouterr()
    trainer = build_trainer(make_recipe(dataset, tmp_path, "train.steps=4", "optim.lr=1e-3"))
    out = capsys.readouterr().out
    assert trainer.state.step == 2
    assert "recipe changed since the checkpoint (allowed): optim.lr 0.003 -> 0.001, train.steps 2 -> 4" in out


def test_halted_run_is_not_resumed_without_force_or_a_changed_recipe(dataset, tmp_path, capsys):
    from looptrain.monitor.halt import write_halt_record
    from looptrain.monitor.rules import MonitorEvent

    recipe = make_recipe(dataset, tmp_path, "train.steps=2")
    run_trainer(recipe)
    event = MonitorEvent(step=2, rule="final_rms", level="error", action="halt",
                         message="norm/rms/3=2000 above 1000", values={"norm/rms/3": 2000.0})
    write_halt_record(recipe.run_dir, event, 2, {"checkpoint": str(checkpoints_of(recipe)[-1])})
    with pytest.raises(CheckpointError, match=r"rule 'final_rms' at step 2.*--force-resume") as err:
        build_trainer(recipe)
    assert "change the recipe" in str(err.value)

    capsys.readouterr()
    trainer = build_trainer(recipe, force_resume=True)
    assert trainer.state.step == 2 and "because of --force-resume" in capsys.readouterr().out
    assert not (Path(recipe.run_dir) / "HALTED.json").exists()  # the resumed run is live again
    assert list(Path(recipe.run_dir).glob("HALTED.resumed-*.json"))

    write_halt_record(recipe.run_dir, event, 2, {})
    changed = build_trainer(make_recipe(dataset, tmp_path, "train.steps=2", "optim.lr=1e-3"))
    assert changed.state.step == 2 and "the recipe changed since" in capsys.readouterr().out


def test_resume_path_must_exist_and_be_valid(dataset, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        build_trainer(make_recipe(dataset, tmp_path, f"checkpoint.resume={tmp_path / 'nowhere'}"))
    assert build_trainer(make_recipe(dataset, tmp_path, "checkpoint.resume=none")).state.step == 0


# ---------------------------------------------------------- inspect & export


def test_inspect_shows_step_world_diff_shards_and_norms(dataset, tmp_path):
    from looptrain.checkpoint.tools import inspect_checkpoint

    recipe = make_recipe(dataset, tmp_path, "train.steps=3")
    run_trainer(recipe)
    text = inspect_checkpoint(recipe.run_dir, make_recipe(dataset, tmp_path, "train.steps=3", "model.d_model=64"))
    assert "step         3" in text and f"tokens       {3 * 4 * SEQ_LEN:,}" in text
    assert "world size   1" in text and "single (dcp format)" in text and "status       valid" in text
    assert "model.d_model  32 -> 64  (changes the model)" in text and "NOT resumable" in text
    assert "model/__0_0.distcp" in text
    norms = text.split("per-loop norms")[1].splitlines()
    assert [line.split()[0] for line in norms[2:5]] == ["1", "2", "3"]

    out = subprocess.run([sys.executable, "-m", "looptrain.cli", "inspect", str(tmp_path / "missing")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no checkpoint here" in out.stderr


def test_export_gives_the_same_logits_without_the_training_stack(dataset, tmp_path):
    recipe = make_recipe(dataset, tmp_path, "train.steps=3", "model.prelude_layers=1", "model.coda_layers=1")
    trainer = run_trainer(recipe)
    out = tmp_path / "exported"
    code = subprocess.run([sys.executable, "-m", "looptrain.cli", "export", recipe.run_dir, str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "tok_embed.weight" in names and "head.weight" not in names  # the tied head is stored once
    assert not any(n.startswith("model.") or "_checkpoint_wrapped" in n for n in names)

    # A fresh interpreter that imports only looptrain.model + safetensors computes the logits.
    tokens = next(trainer.batches)[:2, :-1]
    torch.save(tokens, tmp_path / "tokens.pt")
    script = (
        "import sys, torch\n"
        "from looptrain.checkpoint.exported import load_exported\n"
        f"m = load_exported({str(out)!r})\n"
        f"t = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
        "with torch.no_grad():\n"
        "    o = m(t)\n"
        f"torch.save(torch.stack([m.logits(f) for f in o.features]), {str(tmp_path / 'logits.pt')!r})\n"
        "heavy = ('torch.distributed.checkpoint', 'deepspeed', 'streaming', 'looptrain.train')\n"
        "heavy = [n for n in heavy if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model = trainer.backend.model.eval()
    with torch.no_grad():
        expected = torch.stack([model.logits(f) for f in model(tokens).features])
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


# ------------------------------------------------------- multi-process runs
#
# Each job's ranks are started here directly (what `looptrain train --nproc N`
# does), so that a test can SIGKILL every rank at once, like a lost node. Jobs
# run one after another: streaming datasets of jobs starting at the same moment
# on one host can race for the same shared-memory prefix.


def _worker_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class Job:
    """The ranks of one `looptrain train` job, started directly."""

    def __init__(self, recipe: dict, nproc: int, tmp_path: Path):
        import yaml

        from looptrain.launch.local import free_port, worker_env

        self.recipe = recipe
        self.run_dir = Path(recipe["out_dir"]) / recipe["name"]
        path = tmp_path / f"{recipe['name']}-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        # Each job its own TMPDIR: streaming keeps file locks there, and jobs running at
        # the same time must not share them.
        job_tmp = tmp_path / f"tmp-{path.stem}"
        job_tmp.mkdir()
        port, base = free_port(), _worker_env(job_tmp)
        self.logs = [tmp_path / f"{path.stem}.rank{r}.log" for r in range(nproc)]
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "looptrain.cli", "train", str(path)], cwd=ROOT,
                             env=worker_env(r, nproc, port, base), stdout=open(self.logs[r], "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
            for r in range(nproc)
        ]

    def wait(self, timeout: float = 240) -> "Job":
        deadline = time.time() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.run_dir.name}: timed out\n{self.output()}")
        codes = [p.returncode for p in self.procs]
        assert codes == [0] * len(codes), f"{self.run_dir.name}: exit {codes}\n{self.output()}"
        return self

    def kill_after_commit(self, step: int, timeout: float = 120) -> None:
        """SIGKILL every rank once the checkpoint of `step` is committed (training goes on meanwhile)."""
        target = self.run_dir / "checkpoints" / step_name(step) / "manifest.json"
        deadline = time.time() + timeout
        while not target.exists():
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                pytest.fail(f"{self.run_dir.name}: no checkpoint of step {step}\n{self.output()}")
            time.sleep(0.01)
        assert all(p.poll() is None for p in self.procs), "the job ended before it could be killed"
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def output(self, tail: int = 3000) -> str:
        return "\n".join(log.read_text()[-tail:] for log in self.logs)


def e2e_recipe(dataset: str, tmp_path: Path, name: str, **sections) -> dict:
    data = recipe_dict(dataset, tmp_path, name)
    data["train"].update({"steps": 24, "micro_batch_size": 4, "global_batch_size": 8})
    data["checkpoint"].update({"every": 4, "keep_last": 10})
    data["data"]["num_canonical_nodes"] = 2
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def step_losses(run_dir: Path) -> dict[int, float]:
    from looptrain.tracking.metrics_file import read_metrics

    return {int(r["step"]): r["train/loss"] for r in read_metrics(str(run_dir)) if "train/loss" in r}


def resumed_step(job: Job) -> int:
    import re

    match = re.search(r"resumed from \S+ at step (\d+)", job.logs[0].read_text())
    assert match, job.output()
    return int(match.group(1))


def assert_continues(resumed: Job, reference: dict[int, float], *, exact: bool, tol: float = 1e-5) -> int:
    start = resumed_step(resumed)
    got = {s: v for s, v in step_losses(resumed.run_dir).items() if s > start}
    want = {s: v for s, v in reference.items() if s > start}
    assert got.keys() == want.keys() and len(got) >= 4, (sorted(got), sorted(want))
    for step in sorted(want):
        if exact:
            assert got[step] == want[step], (step, got[step], want[step])
        else:
            assert abs(got[step] - want[step]) <= tol * max(1.0, abs(want[step])), (step, got[step], want[step])
    return start


@pytest.mark.slow
def test_fsdp2_killed_run_resumes_exactly(dataset, tmp_path):
    """SIGKILL a 2-rank FSDP2 run that saves asynchronously, after a checkpoint; the
    resumed run's losses (dropout on, so the per-rank RNG streams matter) equal those
    of an uninterrupted run that saves synchronously."""
    fsdp2 = {"backend": "fsdp2"}
    straight = Job(e2e_recipe(dataset, tmp_path, "straight", parallel=fsdp2), 2, tmp_path).wait()
    recipe = e2e_recipe(dataset, tmp_path, "killed", parallel=fsdp2, checkpoint={"save_async": True})
    Job(recipe, 2, tmp_path).kill_after_commit(4)
    resumed = Job(recipe, 2, tmp_path).wait()
    assert_continues(resumed, step_losses(straight.run_dir), exact=True)


@pytest.mark.slow
def test_fsdp2_reshards_two_ranks_to_one_and_one_to_two(dataset, tmp_path):
    """Save on 2 FSDP2 ranks, resume in one process; save in one process, resume on 2 FSDP2 ranks.
    Dropout is off: a different world size cannot replay per-rank dropout streams."""
    no_dropout = {"dropout": 0.0}
    two = Job(e2e_recipe(dataset, tmp_path, "two", parallel={"backend": "fsdp2"}, model=no_dropout), 2, tmp_path)
    two.wait()
    one = e2e_recipe(dataset, tmp_path, "one", model=no_dropout, train={"grad_accum": 2})
    one_run = run_trainer(recipe_from_dict(one))  # the single-process reference

    # 2 -> 1: a new single-process run starting from the 2-rank checkpoint of step 8.
    from_two = e2e_recipe(dataset, tmp_path, "from-two", model=no_dropout, train={"grad_accum": 2},
                          checkpoint={"resume": str(two.run_dir / "checkpoints" / step_name(8))})
    trainer = build_trainer(recipe_from_dict(from_two))
    assert trainer.state.step == 8
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    got, want = step_losses(Path(trainer.run_dir)), step_losses(two.run_dir)
    assert sorted(got) == list(range(9, 25))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])

    # 1 -> 2: a 2-rank FSDP2 run starting from the single-process checkpoint of step 8.
    from_one = e2e_recipe(dataset, tmp_path, "from-one", parallel={"backend": "fsdp2"}, model=no_dropout,
                          checkpoint={"resume": str(Path(one_run.run_dir) / "checkpoints" / step_name(8))})
    resumed = Job(from_one, 2, tmp_path).wait()
    assert resumed_step(resumed) == 8
    assert_continues(resumed, step_losses(Path(one_run.run_dir)), exact=False)


@pytest.mark.slow
def test_deepspeed_zero2_kill_resume_and_universal_resharding(dataset, tmp_path):
    """ZeRO-2: a SIGKILLed 2-rank run resumes exactly; its checkpoint then continues
    in one process (through DeepSpeed's universal format), and that run's checkpoint
    on 2 ranks again, each within 1e-5 of the run it branched from."""
    ds = {"backend": "deepspeed", "zero_stage": 2}
    no_dropout = {"dropout": 0.0}
    straight = Job(e2e_recipe(dataset, tmp_path, "straight", parallel=ds, model=no_dropout), 2, tmp_path).wait()
    reference = step_losses(straight.run_dir)
    killed = e2e_recipe(dataset, tmp_path, "killed", parallel=ds, model=no_dropout)
    Job(killed, 2, tmp_path).kill_after_commit(4)
    assert_continues(Job(killed, 2, tmp_path).wait(), reference, exact=True)

    # 2 -> 1
    one = e2e_recipe(dataset, tmp_path, "one", parallel=ds, model=no_dropout, train={"grad_accum": 2},
                     checkpoint={"resume": str(straight.run_dir / "checkpoints" / step_name(8))})
    one_job = Job(one, 1, tmp_path).wait()
    assert "through the universal format" in one_job.output(tail=100_000)
    assert assert_continues(one_job, reference, exact=False) == 8
    manifest = read_manifest(one_job.run_dir / "checkpoints" / step_name(12))
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == 2

    # 1 -> 2
    two = e2e_recipe(dataset, tmp_path, "two", parallel=ds, model=no_dropout,
                     checkpoint={"resume": str(one_job.run_dir / "checkpoints" / step_name(12))})
    two_job = Job(two, 2, tmp_path).wait()
    assert assert_continues(two_job, step_losses(one_job.run_dir), exact=False) == 12


@pytest.mark.slow
def test_deepspeed_zero3_killed_run_resumes_exactly(dataset, tmp_path):
    ds = {"backend": "deepspeed", "zero_stage": 3}
    straight = Job(e2e_recipe(dataset, tmp_path, "straight", parallel=ds), 2, tmp_path).wait()
    killed = e2e_recipe(dataset, tmp_path, "killed", parallel=ds)
    Job(killed, 2, tmp_path).kill_after_commit(4)
    resumed = Job(killed, 2, tmp_path).wait()
    assert_continues(resumed, step_losses(straight.run_dir), exact=True)

    # Export consolidates the ZeRO-3 partitions (zero_to_fp32): both runs end on the same weights.
    from looptrain.checkpoint.exported import load_exported
    from looptrain.checkpoint.tools import export_checkpoint

    for job in (straight, resumed):
        export_checkpoint(job.run_dir, tmp_path / f"export-{job.run_dir.name}")
    a, b = (tmp_path / f"export-{n}" / "model.safetensors" for n in ("straight", "killed"))
    assert a.read_bytes() == b.read_bytes()
    model = load_exported(a.parent)
    assert sum(p.numel() for p in model.parameters()) == recipe_param_count(killed)


def recipe_param_count(recipe: dict) -> int:
    from looptrain.model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(recipe_from_dict(recipe).model).parameters())
