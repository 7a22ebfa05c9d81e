"""The norm monitor on real training runs: halting, alerts, NaN and spikes."""

import json
import os

import pytest
import torch

from looptrain import exit_codes
from looptrain.config import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def recipe(tmp_path, data_dir, *extra):
    return load_recipe(
        os.path.join(ROOT, "recipes/quickstart.yaml"),
        [
            f"data.dir={data_dir}", f"out_dir={tmp_path}", "name=mon",
            "model.vocab_size=512", "model.max_seq_len=64", "model.d_model=64", "model.n_heads=4",
            "train.micro_batch_size=8", "train.steps=60", "train.log_every=5", "train.val_every=0",
            "optim.lr=1e-2", "optim.schedule.name=constant", "optim.schedule.warmup_steps=0",
            # A deliberately tight halt threshold on the final-loop RMS.
            "monitor.final_rms.warn=1.5", "monitor.final_rms.halt=3.0", "monitor.final_rms.patience=2",
            *extra,
        ],
    )


def events(run_dir):
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_blind_spot_run_is_halted_and_not_auto_resumed(tmp_path, bible_data, capsys):
    from looptrain.cli import main
    from looptrain.train import main_worker

    r = recipe(tmp_path, bible_data)
    assert main_worker(r) == exit_codes.HALTED
    halted = json.load(open(os.path.join(r.run_dir, "HALTED.json")))
    assert halted["rule"] == "final_rms" and halted["exit_status"] == exit_codes.HALTED
    assert halted["step"] < 60 and halted["values"]
    assert halted["extra"]["checkpoint"] and os.path.isdir(halted["extra"]["checkpoint"])
    levels = {(e["rule"], e["level"]) for e in events(r.run_dir)}
    assert ("final_rms", "ERROR") in levels
    # resume: auto refuses to continue a halted run ...
    capsys.readouterr()
    argv = ["train", os.path.join(ROOT, "recipes/quickstart.yaml")]
    overrides = [a for a in _overrides(tmp_path, bible_data)]
    assert main(argv + overrides) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert "HALTED" in err or "halted" in err
    assert "--force-resume" in err


def _overrides(tmp_path, data_dir):
    return [
        f"data.dir={data_dir}", f"out_dir={tmp_path}", "name=mon",
        "model.vocab_size=512", "model.max_seq_len=64", "model.d_model=64", "model.n_heads=4",
        "train.micro_batch_size=8", "train.steps=60", "train.log_every=5", "train.val_every=0",
        "optim.lr=1e-2", "optim.schedule.name=constant", "optim.schedule.warmup_steps=0",
        "monitor.final_rms.warn=1.5", "monitor.final_rms.halt=3.0", "monitor.final_rms.patience=2",
    ]


def test_scale_controlled_run_is_not_halted(tmp_path, bible_data):
    from looptrain.train import main_worker

    r = recipe(tmp_path, bible_data, "model.recurrence=rmsnorm", "model.readout=final_only")
    assert main_worker(r) == exit_codes.OK
    assert not os.path.exists(os.path.join(r.run_dir, "HALTED.json"))


def _trainer(r):
    from looptrain.parallel import init_distributed
    from looptrain.train import Trainer

    env = init_distributed(r.train.device)
    return Trainer(r, env)


def test_nan_halts_within_one_step(tmp_path, bible_data):
    r = recipe(tmp_path, bible_data, "model.recurrence=rmsnorm", "train.log_every=50")
    trainer = _trainer(r)

    def poison(module, inputs, output):  # a NaN appears in the forward pass at step 7
        return output * float("nan") if trainer.state.step == 7 else output

    trainer.backend.model.core.register_forward_hook(poison)
    before = [p.detach().clone() for p in trainer.backend.model.parameters()]
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    assert result.exit_code == exit_codes.HALTED and result.step == 8
    halted = json.load(open(os.path.join(r.run_dir, "HALTED.json")))
    assert halted["rule"] == "nonfinite"
    assert halted["extra"]["checkpoint"] is None  # a non-finite state is not checkpointed
    # The non-finite step was not applied: the weights are still finite.
    assert all(torch.isfinite(p).all() for p in trainer.backend.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.backend.model.parameters()))


def test_loss_spike_triggers_the_spike_rule(tmp_path, bible_data):
    # Warm up long enough that the running loss statistics see the plateau, not the initial descent.
    r = recipe(tmp_path, bible_data, "model.recurrence=rmsnorm", "train.log_every=1", "train.steps=60",
               "monitor.spike_warmup=35", "monitor.final_rms.enabled=false")
    trainer = _trainer(r)

    def spike(module, inputs, output):  # scramble the features once: the loss jumps
        return output.flip(-1) * 30 if trainer.state.step == 50 else output

    trainer.backend.model.core.register_forward_hook(spike)
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    assert result.exit_code == exit_codes.OK
    spikes = [e for e in events(r.run_dir) if e["rule"] == "loss_spike"]
    assert spikes and spikes[0]["step"] == 51 and spikes[0]["level"] in ("WARN", "ERROR")


def test_a_halt_never_costs_the_last_good_checkpoint(tmp_path, bible_data, capsys):
    """A run that crosses the halt threshold, checkpointing every 5 steps and keeping only the newest:
    the last checkpoint that passed every rule survives the halt, the halt checkpoint is marked as
    such, the halt message names the good one, and rerunning with a lower lr starts from it and
    does not halt. Resuming the halt checkpoint itself (explicitly) does not inherit the tripped
    rule's patience count."""
    from looptrain.checkpoint.layout import committed
    from looptrain.checkpoint.manifest import read_manifest
    from looptrain.train import main_worker

    # The lr warms up to a value that blows the state up within ~15 steps; RMS halt threshold 100.
    keep = ("checkpoint.every=5", "checkpoint.keep_last=1", "optim.schedule.name=warmup_cosine",
            "optim.schedule.warmup_steps=40", "optim.schedule.min_lr_ratio=1.0",
            "monitor.final_rms.warn=30", "monitor.final_rms.halt=100", "train.steps=25")
    r = recipe(tmp_path, bible_data, *keep, "optim.lr=0.2")
    capsys.readouterr()
    assert main_worker(r) == exit_codes.HALTED
    out = capsys.readouterr().out
    halted = json.load(open(os.path.join(r.run_dir, "HALTED.json")))
    halt_ckpt, good = halted["extra"]["checkpoint"], halted["extra"]["resume_from"]
    assert halt_ckpt and good and good != halt_ckpt
    assert f"a changed recipe (e.g. a lower optim.lr) to start from {good}" in out
    assert read_manifest(halt_ckpt)["reason"] == "halt" and read_manifest(halt_ckpt)["healthy"] is False
    assert read_manifest(good)["healthy"] is True
    names = [p.name for p in committed(os.path.join(r.run_dir, "checkpoints"))]
    assert os.path.basename(good) in names and os.path.basename(halt_ckpt) in names  # kept despite keep_last=1
    good_step = int(os.path.basename(good).split("_")[1])

    # Explicitly resuming the halt checkpoint under a changed recipe: the patience count starts afresh,
    # so the rule needs `patience` (2) new checks over the threshold before it halts again.
    explicit = recipe(tmp_path, bible_data, *keep, "optim.lr=1e-3", f"checkpoint.resume={halt_ckpt}", "name=again")
    code = main_worker(explicit)
    if code == exit_codes.HALTED:
        again = json.load(open(os.path.join(explicit.run_dir, "HALTED.json")))
        assert again["step"] >= halted["step"] + 2 * 5, (again["step"], halted["step"])

    # The advice followed: a lower lr in the same run directory starts from the good checkpoint.
    capsys.readouterr()
    lower = recipe(tmp_path, bible_data, *keep, "optim.lr=1e-3")
    assert main_worker(lower) == exit_codes.OK
    out = capsys.readouterr().out
    assert f"resumed from {good} at step {good_step}" in out
    assert not os.path.exists(os.path.join(r.run_dir, "HALTED.json"))
    # The diverged branch was set aside, so that no later `resume: auto` continues it.
    assert not os.path.exists(halt_ckpt)
    assert [p.name for p in committed(os.path.join(r.run_dir, "checkpoints"))][-1] == "step_00000025"
    assert any(p.startswith("superseded-" + os.path.basename(halt_ckpt)) for p in os.listdir(os.path.dirname(good)))
