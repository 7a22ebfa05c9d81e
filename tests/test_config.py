"""Recipes: inheritance, overrides, strict validation, every shipped recipe builds."""

import glob
import os

import pytest
import torch

from looptrain.config import RecipeError, load_recipe, recipe_from_dict, save_resolved
from looptrain.config.loader import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path / "a.yaml", "model: {d_model: 64, n_heads: 4, loops: 2}\noptim: {lr: 0.1}\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nmodel: {loops: 3}\n")
    c = write(tmp_path / "sub" / "c.yaml", "base: b.yaml\nname: chained\noptim: {weight_decay: 0.5}\n")
    r = load_recipe(c, ["optim.lr=1e-3", "model.loops=8", "objective.norm_penalty.weight=0.01"])
    assert r.name == "chained"
    assert r.model.d_model == 64 and r.model.n_heads == 4  # from the grandparent
    assert r.model.loops == 8  # override beats the chain
    assert r.optim.lr == pytest.approx(1e-3) and r.optim.weight_decay == 0.5
    assert r.objective.norm_penalty.weight == pytest.approx(0.01)


def test_unknown_key_names_path_and_closest(tmp_path):
    p = write(tmp_path / "r.yaml", "model: {d_modle: 64}\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'model\.d_modle'; did you mean 'model\.d_model'"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim\.schedule\.warmup'.*'optim\.schedule\.warmup_steps'"):
        load_recipe(write(tmp_path / "ok.yaml", "{}"), ["optim.schedule.warmup=3"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'modle'; did you mean 'model'"):
        recipe_from_dict({"modle": {}})


def test_wrong_type_and_bad_choice():
    with pytest.raises(RecipeError, match=r"model\.loops: expected int, got 'four'"):
        recipe_from_dict({"model": {"loops": "four"}})
    with pytest.raises(RecipeError, match=r"train\.deterministic: expected bool"):
        recipe_from_dict({"train": {"deterministic": "yes"}})
    with pytest.raises(RecipeError, match=r"model\.readout: 'rmsnrom' is not one of .*did you mean 'rmsnorm'"):
        recipe_from_dict({"model": {"readout": "rmsnrom"}})
    # YAML reads 3e-4 as a string; a float field still accepts it.
    assert recipe_from_dict({"optim": {"lr": "3e-4"}}).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.loops=0"], r"model\.loops: must be an integer in \[1, 10000\] \(the loop count\), got 0"),
        (["model.n_heads=7"], r"model\.n_heads: 7 heads do not divide d_model=512"),
        (["objective.backprop_loops=9"], r"objective\.backprop_loops: .* between 1 and the loop count \(4\)"),
        (["objective.supervision=exit_gated"], r"needs a learned exit gate: set model\.exit_gate=true"),
        (["objective.loop_weights=[1,2]"], r"one weight per exit \(4\)"),
        (["parallel.zero_stage=4"], r"parallel\.zero_stage: must be an integer in \[0, 3\] \(the DeepSpeed ZeRO stage\)"),
        (["train.peak_tflops=0"], r"train\.peak_tflops: must be a finite number > 0"),
    ],
)
def test_impossible_combinations(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(apply_overrides({}, overrides))


def test_malformed_yaml_and_missing_file(tmp_path):
    p = write(tmp_path / "bad.yaml", "model:\n  d_model: [64\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: line \d+, column \d+: malformed YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match=r"expected KEY=VALUE"):
        load_recipe(write(tmp_path / "ok.yaml", "{}"), ["model.loops"])
    a = write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(a)


def test_resolved_recipe_saved_and_reloads(tmp_path):
    r = recipe_from_dict({"name": "x", "model": {"loops": 3}})
    path = save_resolved(r, str(tmp_path / "run"))
    again = load_recipe(path)
    assert again == r


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "recipes")))
def test_every_recipe_loads_and_builds(path):
    from looptrain.model import build_model

    recipe = load_recipe(path)
    with torch.device("meta"):
        model = build_model(recipe.model)
    assert model.parameter_counts()["total"] > 0


def test_info_command_prints_counts_and_flops(capsys):
    from looptrain.cli import main

    assert main(["info", os.path.join(ROOT, "recipes/paper/44m/perloop_rmsnorm.yaml"), "model.loops=8"]) == 0
    out = capsys.readouterr().out
    assert "loops: 8" in out and "core" in out and "total" in out
    assert "model FLOPs per token at depth 8" in out


def test_cli_reports_recipe_error_in_one_line(tmp_path, capsys):
    from looptrain.cli import main

    p = write(tmp_path / "r.yaml", "model: {d_modle: 64}\n")
    assert main(["info", p]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'model.d_model'" in err[0]


def test_cli_rejects_a_world_size_before_starting_workers(capsys):
    from looptrain.cli import main

    quickstart = os.path.join(ROOT, "recipes/quickstart.yaml")
    # Overrides may also follow the options; a single-process backend cannot run 2 ranks.
    assert main(["train", quickstart, "--nproc", "2", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc 2 = 2 ranks, but parallel.backend=single" in err[0]
    assert main(["train", quickstart, "parallel.backend=fsdp2", "train.micro_batch_size=3",
                 "train.global_batch_size=8", "--nproc", "2"]) == 2
    assert "x 2 ranks = 6: set train.micro_batch_size=4 train.grad_accum=1" in capsys.readouterr().err


def test_cli_accepts_the_deepspeed_launchers_local_rank():
    from looptrain.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "train", "r.yaml", "optim.lr=1e-3"])
    assert args.recipe == "r.yaml" and args.overrides == ["optim.lr=1e-3"]


def test_a_failed_start_writes_nothing_into_the_run_directory(tmp_path, bible_data, capsys):
    from looptrain.cli import main

    args = ["train", os.path.join(ROOT, "recipes/quickstart.yaml"), f"data.dir={bible_data}", f"out_dir={tmp_path}",
            "name=r", "model.vocab_size=512", "model.max_seq_len=64", "train.global_batch_size=7"]
    assert main(args) == 2
    assert "train.global_batch_size=7" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_quickstart_refuses_a_data_directory_that_is_not_a_dataset(tmp_path, capsys):
    from looptrain.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert main(["quickstart", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists but holds no prepared dataset" in err[0]
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_every_subpackage_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "looptrain")) if "__init__.py" in files
    }
    assert found | {"looptrain.recipes"} == listed
