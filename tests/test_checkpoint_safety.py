"""Hostile and failing checkpoints: crafted pickles never run, a full disk never costs a checkpoint.

Each crafted file is a real malicious pickle (its `__reduce__` makes the
unpickler call `os.system("touch MARKER")`), planted in one file a load reads,
with the manifest's digest rewritten to match (as an attacker would). Loading
through every entry point (`train` resume, `export`, `eval`, `inspect`) must
refuse it with one line naming the file, and the marker must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from looptrain.checkpoint import CheckpointError
from looptrain.checkpoint.layout import committed
from looptrain.checkpoint.manifest import file_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_checkpoint  # noqa: E402
from test_checkpoint import ROOT, _worker_env, build_trainer, run_trainer  # noqa: E402

from looptrain.config.loader import apply_overrides, recipe_from_dict  # noqa: E402


@pytest.fixture(scope="module")
def dataset(bible_data) -> str:
    """The session-wide prepared dataset (64-token sequences)."""
    return bible_data


def recipe_dict(data_dir: str, out_dir: Path, name: str = "run") -> dict:
    data = test_checkpoint.recipe_dict(data_dir, out_dir, name)
    data["model"]["max_seq_len"] = 64
    return data


def make_recipe(data_dir: str, out_dir: Path, *overrides: str, name: str = "run"):
    return recipe_from_dict(apply_overrides(recipe_dict(data_dir, out_dir, name), overrides))

BAD_INPUT = 2


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rehash(ckpt: Path, *names: str) -> None:
    """Make the manifest's sizes and digests match the planted files (what an attacker does)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel in names:
        path = ckpt / rel
        manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "looptrain.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=_worker_env(tmp_path), timeout=600)


def assert_refused(proc: subprocess.CompletedProcess, file_name: str) -> None:
    """Exit 2, and stderr is one line naming the file, the refused object and the untrusted checkpoint."""
    assert proc.returncode == BAD_INPUT, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if re.match(r"looptrain( eval)?: error:", line)]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert file_name in errors[0] and "holds a disallowed object" in errors[0] and "untrusted" in errors[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ DCP


@pytest.fixture(scope="module")
def dcp_run(dataset, tmp_path_factory) -> Path:
    """A finished 2-step single-process run (DCP format), copied by each test."""
    out = tmp_path_factory.mktemp("safety-src")
    recipe = make_recipe(dataset, out, "train.steps=2", name="src")
    run_trainer(recipe)
    return Path(recipe.run_dir)


def copy_run(src: Path, tmp_path: Path, dataset: str) -> tuple[Path, Path, Path]:
    """(recipe file, run dir, checkpoint dir) of a copy of the run, its recipe pointing at the copy."""
    run_dir = tmp_path / "runs" / "victim"
    shutil.copytree(src, run_dir)
    data = recipe_dict(dataset, tmp_path / "runs", "victim")
    data["train"]["steps"] = 4
    recipe_file = tmp_path / "victim.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    (ckpt,) = committed(run_dir / "checkpoints")
    return recipe_file, run_dir, ckpt


def plant_in_metadata(ckpt: Path, marker: Path) -> str:
    """The real DCP metadata with an exploit riding along in its planner data."""
    path = ckpt / "model" / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own file, written by the run above
    metadata.planner_data = {"evil": Exploit(marker)}
    path.write_bytes(pickle.dumps(metadata))
    rehash(ckpt, "model/.metadata")
    return "model/.metadata"


def plant_in_shard(ckpt: Path, marker: Path, *, tensor: bool) -> str:
    """Append a torch.save'd exploit to the shard and point one item (a tensor, or a
    non-tensor optimizer value) at it through otherwise legitimate metadata."""
    shard = ckpt / "model" / "__0_0.distcp"
    with open(ckpt / "model" / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    want = "model.model.tok_embed.weight" if tensor else "optim.param_groups.0.lr"
    (index,) = [i for i in metadata.storage_data if i.fqn == want]
    blob = io.BytesIO()
    torch.save({"evil": Exploit(marker)}, blob)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset,
                                              length=len(blob.getvalue()))
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(ckpt, "model/.metadata", "model/__0_0.distcp")
    return "__0_0.distcp"


def plant_in_payload(ckpt: Path, marker: Path, rel: str) -> str:
    torch.save({"version": 1, "step": Exploit(marker)}, ckpt / rel)
    rehash(ckpt, rel)
    return rel.rsplit("/", 1)[-1]


def test_the_planted_pickles_do_run_code_when_unpickled_plainly(dcp_run, dataset, tmp_path):
    """The payloads are real: plain pickle / weights_only=False loading executes them."""
    _, _, ckpt = copy_run(dcp_run, tmp_path, dataset)
    marker = tmp_path / "ran"
    plant_in_metadata(ckpt, marker)
    with open(ckpt / "model" / ".metadata", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    plant_in_payload(ckpt, marker, "trainer_state.pt")
    torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert marker.exists()


PLANTS = {
    "metadata": lambda ckpt, marker: plant_in_metadata(ckpt, marker),
    "shard-tensor": lambda ckpt, marker: plant_in_shard(ckpt, marker, tensor=True),
    "shard-value": lambda ckpt, marker: plant_in_shard(ckpt, marker, tensor=False),
    "trainer_state": lambda ckpt, marker: plant_in_payload(ckpt, marker, "trainer_state.pt"),
    "rng": lambda ckpt, marker: plant_in_payload(ckpt, marker, "rng/rank_00000.pt"),
}


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_crafted_dcp_checkpoint_is_refused_on_resume_and_export(dcp_run, dataset, tmp_path, where):
    from looptrain.checkpoint.tools import export_checkpoint

    _, _, ckpt = copy_run(dcp_run, tmp_path, dataset)
    marker = tmp_path / "pwned"
    name = PLANTS[where](ckpt, marker)
    loads = [lambda: build_trainer(make_recipe(dataset, tmp_path / "runs", "train.steps=4", name="victim"))]
    if where in ("metadata", "shard-tensor"):  # the files an export reads
        loads.append(lambda: export_checkpoint(ckpt, tmp_path / "out"))
    for load in loads:
        try:
            load()
            error = None
        except BaseException as err:  # noqa: BLE001 -- whatever the loader raised, judged below
            error = err
        assert not marker.exists(), "the crafted pickle ran"
        assert isinstance(error, CheckpointError), repr(error)
        message = str(error)
        assert name in message and "holds a disallowed object" in message and "\n" not in message


@pytest.mark.slow
def test_cli_refuses_a_crafted_checkpoint_with_one_line(dcp_run, dataset, tmp_path):
    """train (resume), export, eval and inspect: exit 2, one line naming the file, nothing runs."""
    recipe_file, run_dir, ckpt = copy_run(dcp_run, tmp_path, dataset)
    marker = tmp_path / "pwned"
    plant_in_metadata(ckpt, marker)
    plant_in_payload(ckpt, marker, "trainer_state.pt")
    assert_refused(cli("train", str(recipe_file), tmp_path=tmp_path), "model/.metadata")
    assert_refused(cli("export", str(ckpt), str(tmp_path / "out"), tmp_path=tmp_path), "model/.metadata")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert_refused(cli("eval", str(run_dir), "--batches", "1", tmp_path=tmp_path), "model/.metadata")
    assert_refused(cli("inspect", str(ckpt), tmp_path=tmp_path), "trainer_state.pt")
    assert not marker.exists()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(dcp_run, dataset, tmp_path):
    _, _, ckpt = copy_run(dcp_run, tmp_path, dataset)
    with open(ckpt / "model" / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)(relative_path="../../../etc/passwd", offset=0, length=10)
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    from looptrain.checkpoint.safe_load import load_dcp_metadata

    with pytest.raises(CheckpointError, match=r"\.metadata: holds a disallowed object \(a shard path"):
        load_dcp_metadata(ckpt / "model" / ".metadata")


def test_a_normal_checkpoint_still_loads_exactly(dcp_run, dataset, tmp_path):
    """The restricted loaders admit everything a real checkpoint holds (resume continues from it)."""
    _, run_dir, ckpt = copy_run(dcp_run, tmp_path, dataset)
    trainer = build_trainer(make_recipe(dataset, tmp_path / "runs", "train.steps=4", name="victim"))
    assert trainer.state.step == 2 and trainer.checkpointer.resumed_from == ckpt
    groups = trainer.backend.optimizer.state_dict()["param_groups"]
    assert groups and all(isinstance(g["lr"], float) for g in groups)


# ------------------------------------------------------------ DeepSpeed


def deepspeed_recipe(dataset: str, out: Path, name: str, stage: int, steps: int) -> Path:
    data = recipe_dict(dataset, out, name)
    data["train"]["steps"] = steps
    data["parallel"] = {"backend": "deepspeed", "zero_stage": stage}
    path = out / f"{name}-{stage}-{steps}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def deepspeed_run(dataset, tmp_path_factory) -> Path:
    """A finished 2-step single-process DeepSpeed ZeRO-2 run."""
    out = tmp_path_factory.mktemp("safety-ds")
    proc = cli("train", str(deepspeed_recipe(dataset, out, "ds", 2, 2)), tmp_path=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ds"


@pytest.mark.slow
@pytest.mark.parametrize("where, stage", [("model_states", 2), ("optim_states", 1)],
                         ids=["model-states", "optim-states-universal"])
def test_crafted_deepspeed_checkpoint_is_refused(deepspeed_run, dataset, tmp_path, where, stage):
    """Resuming at the saving ZeRO stage (DeepSpeed's own load) and at another one (the
    universal conversion first) both refuse the planted file; so does export (zero_to_fp32)."""
    run_dir = tmp_path / "ds"
    shutil.copytree(deepspeed_run, run_dir)
    (ckpt,) = committed(run_dir / "checkpoints")
    rel = {"model_states": "deepspeed/state/mp_rank_00_model_states.pt",
           "optim_states": "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"}[where]
    marker = tmp_path / "pwned"
    real = torch.load(ckpt / rel, weights_only=False)  # our own file
    real["evil"] = Exploit(marker)
    torch.save(real, ckpt / rel)
    rehash(ckpt, rel)
    recipe_file = deepspeed_recipe(dataset, tmp_path, "ds", stage, 4)
    assert_refused(cli("train", str(recipe_file), tmp_path=tmp_path), rel.rsplit("/", 1)[-1])
    assert not list(run_dir.glob("checkpoints/.universal-*")), "nothing was converted"
    with pytest.raises(CheckpointError, match="holds a disallowed object"):
        from looptrain.checkpoint.tools import export_checkpoint

        export_checkpoint(ckpt, tmp_path / "out")
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_checkpoint_still_resumes_and_converts(deepspeed_run, dataset, tmp_path):
    """The restricted loading admits real DeepSpeed states: same stage, and through the universal format."""
    for stage, name in ((2, "same"), (1, "universal")):
        run_dir = tmp_path / name
        shutil.copytree(deepspeed_run, run_dir)
        data = recipe_dict(dataset, tmp_path, name)
        data["train"]["steps"] = 3
        data["parallel"] = {"backend": "deepspeed", "zero_stage": stage}
        recipe_file = tmp_path / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(data))
        proc = cli("train", str(recipe_file), tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
        assert ("through the universal format" in proc.stdout) == (name == "universal")
    from looptrain.checkpoint.tools import export_checkpoint

    export_checkpoint(tmp_path / "same", tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()


# ------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of limited size (tmpfs; needs root), resizable with `.resize(bytes)`."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")

    class Disk:
        path = mount

        @staticmethod
        def resize(size: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def checkpoint_bytes(ckpt: Path) -> int:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return sum(e["bytes"] for e in manifest["files"].values())


@pytest.mark.parametrize("save_async", [False, True], ids=["sync", "async"])
def test_disk_full_during_a_save_loses_nothing(dcp_run, dataset, tmp_path, small_disk, capsys, save_async):
    """The disk fills up while the second checkpoint is written: one line says so (where, how much is
    needed and free), the partial directory is gone, `latest` and the first checkpoint are intact, and
    once there is space the run resumes from it and finishes."""
    from looptrain.checkpoint.layout import read_latest
    from looptrain.checkpoint.manifest import validate
    from looptrain.train import main_worker

    (done,) = committed(dcp_run / "checkpoints")
    size = checkpoint_bytes(done)
    overrides = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3",
                 f"checkpoint.save_async={str(save_async).lower()}")
    recipe = make_recipe(dataset, small_disk.path, *overrides, name="full")
    small_disk.resize(int(size * 1.6) + 256 * 1024)  # room for one checkpoint and the run's logs, not two
    capsys.readouterr()
    assert main_worker(recipe) == BAD_INPUT
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    root = small_disk.path / "full" / "checkpoints"
    assert "the disk is full" in lines[0] and str(root) in lines[0] and "step 4" in lines[0]
    assert "as much as step_00000002" in lines[0] and "was free when the write failed" in lines[0]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no partial directory left
    assert read_latest(root) == "step_00000002" and [p.name for p in committed(root)] == ["step_00000002"]
    validate(root / "step_00000002")

    small_disk.resize(64 << 20)
    trainer = run_trainer(recipe)
    assert trainer.checkpointer.resumed_from == root / "step_00000002" and trainer.state.step == 6
    assert read_latest(root) == "step_00000006"


def test_a_latest_pointer_outside_the_checkpoints_is_ignored(dcp_run, dataset, tmp_path):
    """`latest` naming another directory (`../../x`) is not followed: the newest committed checkpoint is used."""
    from looptrain.checkpoint.layout import resolve_checkpoint

    _, run_dir, ckpt = copy_run(dcp_run, tmp_path, dataset)
    elsewhere = tmp_path / "elsewhere" / "step_00000009"
    shutil.copytree(ckpt, elsewhere)
    (run_dir / "checkpoints" / "latest").write_text("../../../elsewhere/step_00000009\n")
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoints" / ckpt.name


@pytest.mark.slow
def test_disk_full_during_a_deepspeed_save_loses_nothing(deepspeed_run, dataset, tmp_path, small_disk):
    """The same for DeepSpeed's own save (a real ZeRO-2 run in its own process): exit 2 and one line."""
    from looptrain.checkpoint.layout import read_latest
    from looptrain.checkpoint.manifest import validate

    (done,) = committed(deepspeed_run / "checkpoints")
    small_disk.resize(int(checkpoint_bytes(done) * 1.6) + 256 * 1024)
    data = recipe_dict(dataset, small_disk.path, "dsfull")
    data["train"]["steps"] = 4
    data["checkpoint"].update({"every": 2, "keep_last": 3})
    data["parallel"] = {"backend": "deepspeed", "zero_stage": 2}
    recipe_file = tmp_path / "dsfull.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    proc = cli("train", str(recipe_file), tmp_path=tmp_path)
    assert proc.returncode == BAD_INPUT, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("looptrain: error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and "step 4" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    root = small_disk.path / "dsfull" / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert read_latest(root) == "step_00000002" and [p.name for p in committed(root)] == ["step_00000002"]
    validate(root / "step_00000002")


# ------------------------------------------------------------ healthy checkpoints


def test_a_checkpoint_with_non_finite_hidden_state_norms_is_not_good(dataset, tmp_path):
    """The loss and gradient can be finite while the raw state has overflowed: such a state is saved
    with `healthy: false`, and the last good checkpoint stays the one before it."""
    from looptrain.checkpoint.health import last_good_checkpoint
    from looptrain.checkpoint.manifest import read_manifest

    trainer = run_trainer(make_recipe(dataset, tmp_path, "train.steps=2", "checkpoint.keep_last=1"))
    root = Path(trainer.run_dir) / "checkpoints"
    good = root / "step_00000002"
    assert read_manifest(good)["healthy"] is True
    trainer.state.step = 3  # one more step whose loop states overflowed (finite loss, RMS = inf)
    trainer.norms.update([torch.full((4, 32), float("inf"))])
    bad = Path(trainer.checkpointer.save(trainer, reason="interval"))
    assert read_manifest(bad)["healthy"] is False and read_manifest(bad)["reason"] == "interval"
    assert last_good_checkpoint(root) == good
    assert [p.name for p in committed(root)] == ["step_00000002", "step_00000003"]  # keep_last=1 keeps the good one
