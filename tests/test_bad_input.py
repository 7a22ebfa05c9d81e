"""The bad-input catalogue: what users (and attackers) get wrong, each refused cleanly.

Every case asserts the exit status, one line on stderr that names the problem
and its fix (no traceback), and that nothing was lost or half-made: no run
directory after a refused start, existing files unchanged. Most cases call
the CLI's entry point in this process (`looptrain.cli.main`, what the
`looptrain` command runs); the few that need a process of their own (a hang,
a lock held by another process, kill -9) start one, and the expensive ones
are marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Optional

import pytest
import yaml

from looptrain.config.schema import Range, Recipe, RecipeError
from looptrain.run_lock import LOCK_FILE

from kill_helpers import kill_while_saving

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, VOCAB = 64, 512  # the shape of the session's bible_data fixture


# -------------------------------------------------------------------- helpers


def tiny_recipe(out_dir: Path, data_dir: str, **sections) -> dict:
    data = {
        "name": "run",
        "out_dir": str(out_dir),
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_heads": 2, "core_layers": 1, "loops": 2,
                  "max_seq_len": SEQ_LEN},
        "data": {"dir": data_dir},
        "train": {"steps": 4, "micro_batch_size": 2, "log_every": 1, "val_every": 0, "device": "cpu"},
        "checkpoint": {"every": 2},
        "tracking": {"mode": "disabled"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def write_recipe(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes: what "untouched" is checked against
    (except the run directory's lock file, which each start that takes the lock rewrites)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE
    }


def cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Run the `looptrain` command in this process; (exit status, stderr lines)."""
    from looptrain.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(err: list[str], *needles: str) -> None:
    text = "\n".join(err)
    assert "Traceback" not in text, text
    assert len(err) == 1, text
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb (9 ** 9 strings once expanded), as the value of a typed key. The in-process
    cases use 7 levels (4.8 million strings: past the bound, yet finite if the bound were ever lost)."""
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnop"
    for prev, cur in zip(names[: levels - 1], names[1:levels]):
        parts.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


# ---------------------------------------------------- recipes refused on load

# (id, YAML text of the recipe file or None for the tiny recipe, overrides, CLI flags, words the message must hold)
RECIPE_CASES = [
    # unknown and mistyped keys, with the closest valid name
    ("unknown-top-level-key", "modle: {d_model: 64}\n", [], [], ["unknown recipe key 'modle'", "did you mean 'model'"]),
    ("mistyped-nested-key", None, ["model.d_modle=64"], [], ["'model.d_modle'", "did you mean 'model.d_model'"]),
    ("mistyped-deep-key", None, ["optim.schedule.warmup=5"], [], ["did you mean 'optim.schedule.warmup_steps'"]),
    ("unknown-section-key", None, ["train.stepz=5"], [], ["did you mean 'train.steps'"]),
    # wrong types
    ("int-given-a-word", None, ["model.loops=four"], [], ["model.loops: expected int, got 'four'"]),
    ("int-given-a-fraction", None, ["model.loops=2.5"], [], ["model.loops: expected int"]),
    ("bool-given-a-word", None, ["train.deterministic=maybe"], [], ["train.deterministic: expected bool"]),
    ("choice-misspelt", None, ["model.readout=rmsnrom"], [], ["model.readout", "did you mean 'rmsnorm'"]),
    ("section-not-a-mapping", "model: 5\n", [], [], ["model: expected a mapping"]),
    ("list-given-a-number", None, ["optim.betas=0.9"], [], ["optim.betas: expected list"]),
    ("float-given-a-word", None, ["optim.lr=fast"], [], ["optim.lr: expected float"]),
    ("override-without-value", None, ["model.loops"], [], ["expected KEY=VALUE"]),
    ("override-empty-key-part", None, ["model..loops=2"], [], ["dotted names"]),
    # impossible combinations
    ("heads-do-not-divide-width", None, ["model.n_heads=3"], [], ["model.n_heads", "do not divide d_model=32"]),
    ("exit-gated-without-gate", None, ["objective.supervision=exit_gated"], [], ["set model.exit_gate=true"]),
    ("backprop-deeper-than-loops", None, ["objective.backprop_loops=5"], [], ["objective.backprop_loops",
                                                                              "between 1 and the loop count (2)"]),
    ("loop-weights-wrong-length", None, ["objective.loop_weights=[1]"], [], ["one weight per exit (2)"]),
    ("depth-max-below-min", None, ["objective.depth.mode=uniform", "objective.depth.min=2", "objective.depth.max=1"],
     [], ["objective.depth.max", "below min depth 2"]),
    ("fixed-depth-with-max", None, ["objective.depth.max=3"], [], ["use mode=uniform"]),
    ("rope-odd-head-dim", None, ["model.positions=rope", "model.d_model=30"], [], ["rope needs an even head"]),
    ("state-zeros-without-injection", None, ["model.initial_state=zeros"], [], ["set model.injection"]),
    ("warn-above-halt", None, ["monitor.final_rms.warn=5000"], [], ["monitor.final_rms.warn",
                                                                    "above halt threshold 1000"]),
    ("one-beta", None, ["optim.betas=[0.9]"], [], ["optim.betas: needs two values"]),
    ("two-ranks-single-backend", None, [], ["--nproc", "2"], ["--nproc 2 = 2 ranks",
                                                               "add parallel.backend=fsdp2"]),
    ("global-batch-does-not-divide", None, ["parallel.backend=fsdp2", "train.global_batch_size=7"],
     ["--nproc", "2"], ["train.global_batch_size=7", "divisible by 2 ranks"]),
    # values that used to pass validation and fail (or silently misbehave) later: key, value and range named
    ("lr-nan", None, ["optim.lr=nan"], [], ["optim.lr: must be a finite number > 0, got nan"]),
    ("lr-inf", None, ["optim.lr=.inf"], [], ["optim.lr: must be a finite number > 0, got inf"]),
    ("lr-negative", None, ["optim.lr=-0.001"], [], ["optim.lr: must be a finite number > 0, got -0.001"]),
    ("beta1-one", None, ["optim.betas=[1.0,0.95]"], [], ["optim.betas[0]: must be a finite number in [0, 1)"]),
    ("beta2-negative", None, ["optim.betas=[0.9,-0.1]"], [], ["optim.betas[1]", "in [0, 1), got -0.1"]),
    ("eps-negative", None, ["optim.eps=-1e-8"], [], ["optim.eps: must be a finite number >= 0"]),
    ("weight-decay-negative", None, ["optim.weight_decay=-0.01"], [], ["optim.weight_decay", ">= 0, got -0.01"]),
    ("d-model-1e20", None, ["model.d_model=100000000000000000000"], [],
     ["model.d_model: must be an integer in [1, 131072]"]),
    ("mlp-ratio-nan", None, ["model.mlp_ratio=nan"], [], ["model.mlp_ratio", "got nan"]),
    ("warmup-negative", None, ["optim.schedule.warmup_steps=-5"], [], ["optim.schedule.warmup_steps",
                                                                       "integer >= 0, got -5"]),
    ("clip-negative", None, ["optim.clip_grad_norm=-1"], [], ["optim.clip_grad_norm", ">= 0", "no clipping"]),
    ("norm-eps-negative", None, ["model.norm_eps=-1e-5"], [], ["model.norm_eps", "in (0, 1]"]),
    ("checkpoint-every-negative", None, ["checkpoint.every=-1"], [], ["checkpoint.every: must be an integer >= 0"]),
    ("num-workers-negative", None, ["data.num_workers=-1"], [], ["data.num_workers", "in [0, 1024], got -1"]),
    ("patience-zero", None, ["monitor.final_rms.patience=0"], [], ["monitor.final_rms.patience", ">= 1", "got 0"]),
    ("nproc-negative", None, [], ["--nproc", "-1"], ["--nproc -1: must be an integer >= 1"]),
    ("nproc-zero", None, [], ["--nproc", "0"], ["--nproc 0: must be an integer >= 1"]),
    ("dropout-one", None, ["model.dropout=1.0"], [], ["model.dropout", "in [0, 1), got 1.0"]),
    ("min-lr-ratio-above-one", None, ["optim.schedule.min_lr_ratio=1.5"], [], ["optim.schedule.min_lr_ratio",
                                                                               "in [0, 1]"]),
    ("loop-weight-nan", None, ["objective.loop_weights=[1,.nan]"], [], ["objective.loop_weights[1]", "got nan"]),
    ("norm-penalty-inf", None, ["objective.norm_penalty.weight=.inf"], [], ["objective.norm_penalty.weight",
                                                                            "got inf"]),
    ("keep-last-zero", None, ["checkpoint.keep_last=0"], [], ["checkpoint.keep_last", "always resume"]),
    ("steps-zero", None, ["train.steps=0"], [], ["train.steps: must be an integer >= 1, got 0"]),
    ("seed-negative", None, ["train.seed=-1"], [], ["train.seed", "got -1"]),
    ("depth-sigma-nan", None, ["objective.depth.sigma=nan"], [], ["objective.depth.sigma", "got nan"]),
    ("threshold-nan", None, ["monitor.final_rms.halt=nan"], [], ["monitor.final_rms.halt", "got nan"]),
    # run names that would leave out_dir
    ("name-dotdot", None, ["name=.."], [], ["name: '..' is not a single directory name", "e.g. name=run1"]),
    ("name-dot", None, ["name=."], [], ["name: '.' is not a single directory name"]),
    ("name-nested", None, ["name=a/b"], [], ["name: 'a/b' is not a single directory name"]),
    ("name-absolute", None, ["name=/tmp/looptrain-escaped"], [], ["is not a single directory name"]),
    ("name-empty", None, ["name="], [], ["name: '' is not a single directory name"]),
    ("name-dash", None, ["name=-rf"], [], ["leading '-'"]),
    # files that are not recipes
    ("empty-mapping-list", "- a\n- b\n", [], [], ["a recipe file must be a YAML mapping", "got list"]),
    ("scalar-file", "hello\n", [], [], ["a recipe file must be a YAML mapping", "got str"]),
    ("malformed-yaml", "model:\n  d_model: [64\n", [], [], ["line 3, column 1: malformed YAML", "fix the syntax"]),
    ("python-object-tag", "model: !!python/object/apply:os.system ['touch {marker}']\n", [], [],
     ["could not determine a constructor", "python/object/apply:os.system"]),
    ("python-name-tag", "model: {d_model: !!python/name:os.system }\n", [], [],
     ["could not determine a constructor"]),
    ("python-module-tag", "x: !!python/module:subprocess\n", [], [], ["could not determine a constructor"]),
    ("base-missing", "base: nowhere.yaml\n", [], [], ["nowhere.yaml: recipe file not found", "check the path"]),
    ("base-not-a-path", "base: 5\n", [], [], ["base: must be a path or a list of paths"]),
    ("recursive-alias", "model: &m {d_model: 32}\ntrain: &t [*t]\n", [], [], ["refers to its own anchor"]),
    ("alias-bomb-in-override", None, [f"model.d_model={billion_laughs(7)}"], [], ["override model.d_model",
                                                                                  "alias bomb"]),
    ("alias-bomb-in-any-mapping", f"parallel:\n  deepspeed: {{x: {billion_laughs(7)}}}\n", [], [],
     ["alias bomb", "share settings with base:"]),
    ("nested-too-deeply", "model: " + "[" * 3000 + "]" * 3000 + "\n", [], [], ["nested too deeply"]),
]


@pytest.mark.parametrize("text, overrides, flags, needles", [c[1:] for c in RECIPE_CASES],
                         ids=[c[0] for c in RECIPE_CASES])
def test_recipe_is_refused_before_anything_is_written(tmp_path, capsys, text, overrides, flags, needles):
    marker = tmp_path / "MARKER"
    runs = tmp_path / "runs"
    path = tmp_path / "recipe.yaml"
    if text is None:
        write_recipe(path, tiny_recipe(runs, str(tmp_path / "no-data")))
    else:
        path.write_text(text.replace("{marker}", str(marker)))
    code, err = cli(["train", path, *overrides, *flags], capsys)
    assert code == 2
    assert_one_line(err, "looptrain: error:", *needles)
    assert not runs.exists() and not marker.exists()
    assert not Path("/tmp/looptrain-escaped").exists()


def test_base_cycle_is_named(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    code, err = cli(["train", tmp_path / "a.yaml"], capsys)
    assert code == 2
    assert_one_line(err, "base: recipes inherit in a cycle", "a.yaml -> ", "b.yaml -> ")


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", b"\x00\x01\x02\xff" * 64], ids=["latin-1", "binary"])
def test_a_recipe_that_is_not_utf8_text(tmp_path, capsys, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    code, err = cli(["train", path], capsys)
    assert code == 2
    assert_one_line(err, f"{path}: not a UTF-8 text file", "a recipe file is YAML text")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_recipe_path_that_is_not_a_file(tmp_path, capsys, kind):
    path = tmp_path / "r.yaml"
    if kind == "directory":
        path.mkdir()
    code, err = cli(["info", path], capsys)
    assert code == 2
    assert_one_line(err, "recipe file not found", "check the path")


def test_an_empty_recipe_means_all_defaults(tmp_path, capsys, monkeypatch):
    """An empty file is the default recipe; training it here fails on the missing default dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    code, err = cli(["train", "empty.yaml"], capsys)
    assert code == 2
    assert_one_line(err, "data/quickstart", "no dataset here", "looptrain prepare")
    assert not (tmp_path / "runs").exists()


def test_a_billion_laughs_recipe_is_refused_instead_of_hanging(tmp_path):
    """Before the expansion bound this took 100% CPU until killed (the message repr()s the value)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"model:\n  d_model: {billion_laughs()}\n")
    run = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=subprocess_env(tmp_path))
    assert run.returncode == 2, run.stderr
    assert_one_line(run.stderr.strip().splitlines(), "aliases expand to more than 100,000 values", "alias bomb")


def _fields(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, key + ".")
        else:
            yield key, tp, f


def _numeric(tp) -> Optional[type]:
    """int or float when the field holds numbers (possibly Optional or a list of them)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    for arg in args:
        if typing.get_origin(arg) is list:
            arg = typing.get_args(arg)[0]
        if arg in (int, float):
            return arg
    return None


NUMERIC_FIELDS = [(key, _numeric(tp), f) for key, tp, f in _fields(Recipe) if _numeric(tp)]


def test_every_numeric_key_declares_its_range():
    missing = [key for key, _, f in NUMERIC_FIELDS if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numeric recipe keys without a Range: {missing}"
    assert len(NUMERIC_FIELDS) > 50


def _override(key: str, kind: type, value: str) -> str:
    if key == "optim.betas":
        return f"{key}=[{value},0.95]"
    if key == "objective.loop_weights":
        return f"{key}=[{value},1,1,1]"
    return f"{key}={value}"


@pytest.mark.parametrize("key", [k for k, kind, _ in NUMERIC_FIELDS if kind is float])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_key_refuses_non_finite_values(key, value):
    from looptrain.config.loader import apply_overrides, recipe_from_dict

    with pytest.raises(RecipeError, match=rf"^{key}(\[0\])?: must be a finite number"):
        recipe_from_dict(apply_overrides({}, [_override(key, float, value)]))


@pytest.mark.parametrize("key", [k for k, _, _ in NUMERIC_FIELDS])
def test_every_numeric_key_refuses_values_outside_its_range(key):
    from looptrain.config.loader import apply_overrides, recipe_from_dict

    kind, field = next((kind, f) for k, kind, f in NUMERIC_FIELDS if k == key)
    rng: Range = field.metadata["range"]
    outside = []
    if rng.ge is not None:
        outside.append(rng.ge - 1 if kind is int else rng.ge - 1e-3)
    if rng.gt is not None:
        outside.append(rng.gt)
    if rng.le is not None:
        outside.append(rng.le + 1 if kind is int else rng.le * 2 + 1)
    if rng.lt is not None:
        outside.append(rng.lt)
    assert outside
    for value in outside:
        value = int(value) if kind is int else float(value)
        with pytest.raises(RecipeError, match=rf"^{key}(\[0\])?: must be .*got {value!r}"):
            recipe_from_dict(apply_overrides({}, [_override(key, kind, repr(value))]))


def test_a_monitor_rule_set_in_part_keeps_its_other_defaults():
    """`monitor.final_rms.warn=50` used to reset the rule to RuleConfig's class defaults: halt threshold gone."""
    from looptrain.config.loader import apply_overrides, recipe_from_dict

    rule = recipe_from_dict(apply_overrides({}, ["monitor.final_rms.warn=50"])).monitor.final_rms
    assert (rule.warn, rule.halt, rule.patience, rule.action) == (50.0, 1000.0, 2, "halt")


# ------------------------------------------------------ data given to training


def _copy_dataset(bible_data: str, dst: Path) -> Path:
    shutil.copytree(bible_data, dst)
    return dst


DATA_CASES = [
    ("data-dir-missing", lambda d, t: t / "nowhere", [], ["no dataset here", "looptrain prepare"]),
    ("data-dir-not-a-dataset", lambda d, t: _notes_dir(t), [], ["looptrain prepare"]),
    ("dataset-json-garbage", lambda d, t: _garbage(_copy_dataset(d, t / "ds"), "dataset.json"), [],
     ["dataset.json: unreadable", "looptrain prepare --overwrite"]),
    ("tokenizer-garbage", lambda d, t: _garbage(_copy_dataset(d, t / "ds"), "tokenizer.model"), [],
     ["tokenizer.model: differs from the tokenizer the shards were made with"]),
    ("tokenizer-missing", lambda d, t: _remove(_copy_dataset(d, t / "ds"), "tokenizer.model"), [],
     ["tokenizer.model"]),
    ("shard-missing", lambda d, t: _remove(_copy_dataset(d, t / "ds"), "train/block-00000/shard.00000.mds"), [],
     ["train/block-00000/shard.00000.mds: shard missing", "looptrain prepare --overwrite"]),
    ("seq-len-mismatch", lambda d, t: Path(d), ["model.max_seq_len=128"], ["set model.max_seq_len=64"]),
    ("vocab-too-small", lambda d, t: Path(d), ["model.vocab_size=100"], ["set model.vocab_size=512"]),
]


def _notes_dir(tmp_path: Path) -> Path:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    return tmp_path / "notes"


def _garbage(root: Path, rel: str) -> Path:
    (root / rel).write_bytes(b"{not what it should be \x00\xff")
    return root


def _remove(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


@pytest.mark.parametrize("make, overrides, needles", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_dataset_is_refused_before_the_run_directory_exists(tmp_path, capsys, bible_data, make, overrides,
                                                                 needles):
    data_dir = make(bible_data, tmp_path)
    before = snapshot(Path(data_dir))
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(runs, str(data_dir)))
    code, err = cli(["train", recipe, *overrides], capsys)
    assert code == 2
    assert_one_line(err, "looptrain: error:", *needles)
    assert not runs.exists()
    assert snapshot(Path(data_dir)) == before


PREPARE_CASES = [
    ("binary-corpus", lambda t: (t / "c.txt").write_bytes(bytes(range(256)) * 8), ["not UTF-8 text",
                                                                                    "convert it to UTF-8"]),
    ("latin1-corpus", lambda t: (t / "c.txt").write_bytes("café olé\n".encode("latin-1") * 50),
     ["not UTF-8 text", "convert it to UTF-8"]),
    ("empty-corpus", lambda t: (t / "c.txt").write_text(""), ["no documents", "every input is empty"]),
    ("missing-corpus", lambda t: None, ["c.txt: no such file or directory"]),
    ("jsonl-garbage-line", lambda t: (t / "c.jsonl").write_text('{"text": "a"}\nnot json\n'),
     ["not valid JSON", "each line must be one JSON object"]),
]


@pytest.mark.parametrize("make, needles", [c[1:] for c in PREPARE_CASES], ids=[c[0] for c in PREPARE_CASES])
def test_prepare_refuses_corpora_that_are_not_text(tmp_path, capsys, make, needles):
    make(tmp_path)
    corpus = tmp_path / ("c.jsonl" if (tmp_path / "c.jsonl").exists() else "c.txt")
    before = snapshot(tmp_path)
    code, err = cli(["prepare", corpus, "--out", tmp_path / "out", "--vocab-size", "300", "--seq-len", "16",
                     "--no-progress"], capsys)
    assert code == 2
    assert_one_line(err, *needles)
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained_run(bible_data, tmp_path_factory) -> Path:
    """A finished tiny run with two checkpoints (steps 2 and 4); tests copy it before damaging anything."""
    from looptrain.cli import main

    tmp = tmp_path_factory.mktemp("bad-input-run")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(tmp / "runs", bible_data))
    assert main(["train", recipe]) == 0
    return tmp / "runs" / "run"


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "run"
    shutil.copytree(trained_run, run)
    return run


def _truncate_shard(ckpt: Path) -> Path:
    shard = next((ckpt / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    return ckpt


def _flip_byte(ckpt: Path) -> Path:
    shard = next((ckpt / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return ckpt


def _garbage_manifest(ckpt: Path) -> Path:
    (ckpt / "manifest.json").write_text("{garbage")
    return ckpt


def _no_manifest(ckpt: Path) -> Path:
    (ckpt / "manifest.json").unlink()
    return ckpt


CHECKPOINT_DAMAGE = {
    "truncated-shard": (_truncate_shard, "100 bytes but manifest.json says"),
    "flipped-byte": (_flip_byte, "modified or damaged after the save"),
    "garbage-manifest": (_garbage_manifest, "manifest.json: unreadable"),
    "no-manifest": (_no_manifest, "no checkpoint here"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_refused_and_changes_nothing(trained_run, tmp_path, capsys, bible_data,
                                                                         damage):
    make, needle = CHECKPOINT_DAMAGE[damage]
    ckpt = make(shutil.copytree(trained_run / "checkpoints" / "step_00000004", tmp_path / "ckpt"))
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(runs, bible_data, checkpoint={"resume": str(ckpt)}))
    before = snapshot(ckpt)
    code, err = cli(["train", recipe, "train.steps=6"], capsys)
    assert code == 2
    assert_one_line(err, "looptrain: error:", needle)
    assert not runs.exists(), "a refused resume leaves no run directory"
    assert snapshot(ckpt) == before


def test_resume_path_that_does_not_exist(tmp_path, capsys, bible_data):
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(runs, bible_data))
    code, err = cli(["train", recipe, f"checkpoint.resume={tmp_path / 'nowhere'}"], capsys)
    assert code == 2
    assert_one_line(err, "checkpoint.resume=", "no checkpoint here (no such directory)",
                    "pass a checkpoint directory")
    assert not runs.exists()


def test_auto_resume_with_every_checkpoint_damaged_keeps_the_run_as_it_was(trained_run, tmp_path, capsys):
    """Nothing is lost: the refused start neither rewrites recipe.yaml nor touches the checkpoints."""
    run = _copy_run(trained_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("step_*"):
        _truncate_shard(ckpt)
    recipe = write_recipe(tmp_path / "r.yaml", yaml.safe_load((run / "recipe.yaml").read_text())
                          | {"out_dir": str(tmp_path / "runs")})
    before = snapshot(run)
    code, err = cli(["train", recipe, "train.steps=6", "optim.lr=1e-3"], capsys)
    assert code == 2
    assert_one_line(err, "none of the checkpoints step_00000004, step_00000002 passed validation",
                    "checkpoint.resume=none")
    assert snapshot(run) == before


TOOL_CASES = [(c, t) for c in ("inspect", "export", "eval")
              for t in ("missing", "not-a-checkpoint", "truncated-shard", "garbage-manifest")
              if (c, t) != ("inspect", "truncated-shard")]  # inspect shows a damaged checkpoint: test below


@pytest.mark.parametrize("command, target", TOOL_CASES, ids=[f"{c}-{t}" for c, t in TOOL_CASES])
def test_checkpoint_tools_refuse_what_is_not_a_valid_checkpoint(trained_run, tmp_path, capsys, command, target):
    if target == "missing":
        path = tmp_path / "nowhere"
    elif target == "not-a-checkpoint":
        path = _notes_dir(tmp_path)
    else:
        damage = _truncate_shard if target == "truncated-shard" else _garbage_manifest
        path = damage(shutil.copytree(trained_run / "checkpoints" / "step_00000004", tmp_path / "ckpt"))
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    args = {"inspect": ["inspect", path], "export": ["export", path, out],
            "eval": ["eval", path, "--batches", "1", "--out", out]}[command]
    code, err = cli(args, capsys)
    assert code == 2
    hint = {"missing": "no", "not-a-checkpoint": "no", "truncated-shard": "100 bytes but manifest.json says",
            "garbage-manifest": "manifest.json: unreadable"}[target]
    assert_one_line(err, "error:", hint)
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_inspect_names_a_truncated_shard(trained_run, tmp_path, capsys):
    ckpt = _truncate_shard(shutil.copytree(trained_run / "checkpoints" / "step_00000004", tmp_path / "ckpt"))
    from looptrain.cli import main

    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "status       INVALID:" in out and "100 bytes but manifest.json says" in out


# ------------------------------------------------------- one training per run


LOCK_HOLDER = """
import sys, time
from looptrain.run_lock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(tmp_path))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_directory_held_by_another_process_is_refused(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path)
    holder = _hold_lock(run, tmp_path)
    try:
        recipe = write_recipe(tmp_path / "r.yaml", yaml.safe_load((run / "recipe.yaml").read_text())
                              | {"out_dir": str(tmp_path / "runs")})
        before = snapshot(run)
        code, err = cli(["train", recipe, "train.steps=6"], capsys)
        assert code == 2
        assert_one_line(err, f"run directory {run} is in use by another training", f"pid {holder.pid} on host",
                        "wait for it to finish, or pick another name=")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block_the_run(trained_run, tmp_path, capsys):
    """kill -9 releases the lock with the process: the next start resumes (as a Slurm requeue does)."""
    run = _copy_run(trained_run, tmp_path)
    holder = _hold_lock(run, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run / ".lock").read_text()  # the leftover file names the dead holder
    recipe = write_recipe(tmp_path / "r.yaml", yaml.safe_load((run / "recipe.yaml").read_text())
                          | {"out_dir": str(tmp_path / "runs")})
    from looptrain.cli import main

    assert main(["train", recipe, "train.steps=6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_00000006").is_dir()


def test_a_filesystem_without_locks_warns_and_trains(tmp_path, capsys, monkeypatch):
    """Some network filesystems answer ENOLCK: the run says it is unprotected and goes on."""
    import errno
    import fcntl

    from looptrain import run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    run_dir = tmp_path / "runs" / "run"
    run_lock.acquire(str(run_dir))
    run_lock.release(str(run_dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert_one_line(err, "looptrain: warning:", "does not support file locks", "not protected against a second")


@pytest.mark.slow
def test_two_concurrent_trainings_of_one_run_directory(tmp_path, bible_data):
    """Two real training processes in one run directory: the second refuses at once (exit 2, one line
    naming the holder) and writes nothing; the first finishes with every step logged once. The first
    is paused (SIGSTOP) while the second starts, so that it cannot finish first on a slow machine."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", bible_data,
                                                           train={"steps": 30}, checkpoint={"every": 10}))
    run = tmp_path / "runs" / "run"
    env = subprocess_env(tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "looptrain.cli", "train", recipe], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "recipe.yaml").exists():  # written once the first holds the lock
            assert first.poll() is None and time.time() < deadline, "the first training did not start"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run)
        second = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", recipe], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert snapshot(run) == before
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stdout + second.stderr
        assert_one_line(second.stderr.strip().splitlines(), f"run directory {run} is in use by another training",
                        f"pid {first.pid} on host", "pick another name=")
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    from looptrain.tracking.metrics_file import read_metrics

    steps = [int(r["step"]) for r in read_metrics(str(run)) if "train/loss" in r]
    assert steps == list(range(1, 31)), "every step logged exactly once"


@pytest.mark.slow
@pytest.mark.parametrize("save_async", [False, True], ids=["sync", "async"])
def test_kill_during_a_save_then_resume_loads_the_previous_good_checkpoint(tmp_path, bible_data, save_async):
    """kill -9 while a checkpoint is being written (a model large enough to make the save take a while);
    the next start (the lock of the killed process is gone) resumes from the last committed checkpoint."""
    from looptrain.checkpoint.layout import committed
    from looptrain.checkpoint.manifest import validate

    data = tiny_recipe(tmp_path / "runs", bible_data, train={"steps": 1000, "micro_batch_size": 1},
                       checkpoint={"every": 1, "keep_last": 2, "save_async": save_async})
    data["model"].update({"d_model": 128, "n_heads": 4, "core_layers": 2})
    recipe = write_recipe(tmp_path / "r.yaml", data)
    root = tmp_path / "runs" / "run" / "checkpoints"
    env = subprocess_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "looptrain.cli", "train", recipe], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_while_saving(proc, root, timeout_s=300)
    done = committed(root)
    assert done
    for path in done:
        validate(path)
    # The next start (here, in this process) takes the dead process's lock and resumes from the last commit.
    from looptrain.config import load_recipe
    from looptrain.parallel import init_distributed
    from looptrain.run_lock import release
    from looptrain.train import Trainer

    loaded = load_recipe(recipe)
    try:
        trainer = Trainer(loaded, init_distributed("cpu"))
        assert trainer.checkpointer.resumed_from == done[-1]
        assert trainer.state.step == int(done[-1].name.split("_")[1])
        trainer.tracker.finish(0)
    finally:
        release(loaded.run_dir)


@pytest.mark.slow
def test_every_rank_of_a_job_stops_when_the_run_directory_is_held(trained_run, tmp_path):
    """Rank 0 takes the lock for its job and tells the other ranks: a refused 2-rank start ends both
    ranks with exit 2 (none left waiting in a collective) and writes nothing."""
    run = _copy_run(trained_run, tmp_path)
    holder = _hold_lock(run, tmp_path)
    try:
        recipe = write_recipe(tmp_path / "r.yaml", yaml.safe_load((run / "recipe.yaml").read_text())
                              | {"out_dir": str(tmp_path / "runs")})
        before = snapshot(run)
        job = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", recipe, "parallel.backend=fsdp2",
                              "train.micro_batch_size=1", "train.steps=6", "--nproc", "2"], cwd=tmp_path,
                             env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)
        output = job.stdout + job.stderr
        assert job.returncode == 2, output
        assert "Traceback" not in output
        assert f"[rank 0] looptrain: error: run directory {run} is in use by another training (pid {holder.pid}" \
            in output
        assert "[rank 1] looptrain: error: run directory" in output
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
