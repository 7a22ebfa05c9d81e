"""Evaluation: depth curves, early-exit policies, scale diagnostics, plots and the CLI.

Models are tiny and untrained unless a test says otherwise; where a test needs
a property that only trained weights would have, it says how the weights were
chosen and why the check can fail.
"""

import json
import math
import os

import pytest
import torch

from looptrain import exit_codes
from looptrain.config.schema import ModelConfig, ObjectiveConfig
from looptrain.data.loader import SINGLE_PROCESS_ENV
from looptrain.eval.collect import ExitData, collect_exit_data
from looptrain.eval.depth import evaluate_depths
from looptrain.eval.diagnostics import radial_clamp_effect, radial_gradient_shares, run_loops
from looptrain.eval.exits import (
    POLICIES,
    available_policies,
    chosen_ce,
    evaluate_exits,
    evaluate_threshold,
    exit_indices,
    sweep_thresholds,
)
from looptrain.model import build_model
from looptrain.train_module import LoopedLMTrainModule, split_batch

VOCAB, SEQ = 512, 64


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, core_layers=1, loops=3, max_seq_len=SEQ)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw)).eval()


def random_batches(n: int = 2, batch: int = 4, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq + 1), generator=g) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def streaming_env():
    """The process-group variables mosaicml-streaming reads, for this module's loaders."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SINGLE_PROCESS_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def val_batches(bible_data):
    from looptrain.eval.run import load_eval_batches

    return load_eval_batches(bible_data, tiny_cfg(), batches=3, batch_size=4)


# ----------------------------------------------------------------- depth curve


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["rmsnorm", "final_only"])
def test_full_depth_loss_equals_trainer_validation_loss(val_batches, readout):
    """The eval's loss at the trained depth is the trainer's validation loss on the same batches.

    The trainer averages `compute_objective`'s per-exit CE over equal-sized
    batches; with equal batches that is the token mean the eval reports.
    """
    model = tiny_model(readout=readout)
    assert len({b.shape for b in val_batches}) == 1 and len(val_batches) == 3
    module = LoopedLMTrainModule(model, ObjectiveConfig()).eval()
    trainer = torch.zeros(model.cfg.loops, dtype=torch.float64)
    with torch.no_grad():
        for batch in val_batches:
            tokens, targets = split_batch(batch)
            trainer += module(tokens, targets, measure_all_exits=True).result.ce_per_exit.double()
    trainer /= len(val_batches)

    result = evaluate_depths(model, val_batches, depths=range(1, 2 * model.cfg.loops + 1))
    k = model.cfg.loops
    assert all(math.isfinite(v) and 0 < v < 3 * math.log(VOCAB) for v in result.loss)
    assert result.loss_at(k) == pytest.approx(float(trainer[-1]), rel=1e-6, abs=1e-6)
    # The intermediate exits of the deep pass are the trainer's intermediate exits.
    assert result.exit_loss[: k - 1] == pytest.approx(trainer[:-1].tolist(), rel=1e-6, abs=1e-6)
    assert result.tokens == sum(b[:, 1:].numel() for b in val_batches)
    if readout == "final_only":  # depth k < K reads the state through the final norm, exit k does not
        assert all(abs(a - b) > 1e-7 for a, b in zip(result.loss[: k - 1], result.exit_loss[: k - 1]))


@pytest.mark.parametrize("readout", ["rmsnorm", "raw", "final_only", "alpha"])
def test_depth_k_from_one_deep_pass_equals_running_at_depth_k(readout):
    """One pass at D gives the loss a depth-k model would have, for every k <= D (extrapolation included)."""
    model = tiny_model(readout=readout, exit_gate=True)
    batches = random_batches()
    result = evaluate_depths(model, batches, depths=[1, 2, 3, 4, 5])
    with torch.no_grad():
        for depth in result.depths:
            total, count = 0.0, 0
            for batch in batches:
                tokens, targets = split_batch(batch)
                logits = model.logits(model(tokens, depth=depth).features[-1]).float()
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
            assert result.loss_at(depth) == pytest.approx(total / count, rel=1e-5)


def test_loop_norm_statistics_match_the_states():
    model = tiny_model()
    batches = random_batches(n=1)
    result = evaluate_depths(model, batches, depths=[1, 2, 3, 4])
    with torch.no_grad():
        states = model(split_batch(batches[0])[0], depth=4).states
    for stats, h in zip(result.norms, states):
        norms = h.norm(dim=-1).reshape(-1)
        assert stats.mean == pytest.approx(norms.mean().item(), rel=1e-5)
        assert stats.max == pytest.approx(norms.max().item(), rel=1e-6)
        assert stats.p99 == pytest.approx(torch.quantile(norms, 0.99).item(), rel=1e-5)
        assert stats.rms == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-5)
        assert stats.quantiles["p01"] <= stats.quantiles["p50"] <= stats.p99 <= stats.max


def test_ignored_targets_are_left_out():
    model = tiny_model()
    batch = random_batches(n=1)[0]
    data = collect_exit_data(model, [batch], 3)
    tokens, targets = split_batch(batch)
    masked = targets.clone()
    masked[:, ::2] = -100
    # Feed the masked targets through the same path the collector uses.
    from looptrain.eval.collect import exit_token_numbers

    with torch.no_grad():
        out = model(tokens, depth=3)
        ce, _, scores = exit_token_numbers(model, out.features, out.features, masked)
    assert ce.shape == (3, targets.numel() // 2)
    assert torch.allclose(ce, data.ce_exit.view(3, *targets.shape)[:, :, 1::2].reshape(3, -1), atol=1e-6)
    assert all(s.shape == ce.shape for s in scores.values())


# ------------------------------------------------------------------ early exit


def test_exit_choice_and_loss_on_hand_made_numbers():
    """First exit whose confidence reaches the threshold; the last exit reads the final readout."""
    conf = torch.tensor([[0.1, 0.9, 0.5], [0.6, 0.95, 0.4], [0.2, 0.1, 0.3]])  # (E=3, N=3)
    assert exit_indices(conf, 0.0).tolist() == [0, 0, 0]
    assert exit_indices(conf, 0.5).tolist() == [1, 0, 0]
    assert exit_indices(conf, 0.92).tolist() == [2, 1, 2]
    assert exit_indices(conf, 2.0).tolist() == [2, 2, 2]
    ce_exit = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    ce_final = ce_exit + 100.0
    data = ExitData(ce_exit, ce_final, {"max_prob": conf}, None, torch.ones(3, 3), d_model=4, trained_depth=3)
    assert chosen_ce(data, torch.tensor([1, 0, 2]), 3).tolist() == [4.0, 2.0, 109.0]
    # With E = 2 the second exit is the last one: it reads the final readout of exit 2.
    assert chosen_ce(data, torch.tensor([1, 0, 1]), 2).tolist() == [104.0, 2.0, 106.0]
    point = evaluate_threshold(data, "max_prob", 0.5)
    assert point.mean_loops == pytest.approx(4 / 3) and point.loss == pytest.approx((4 + 2 + 3) / 3)


@pytest.fixture(scope="module")
def gated_exit_data():
    model = tiny_model(seed=3, exit_gate=True, loops=4)
    return collect_exit_data(model, random_batches(n=2, seed=5), depth=4)


def test_every_policy_threshold_zero_exits_at_depth_one(gated_exit_data):
    """Threshold semantics: exit at the first k with confidence >= threshold, so 0 stops at once."""
    data = gated_exit_data
    assert available_policies(data) == list(POLICIES)
    for policy in POLICIES:
        point = evaluate_threshold(data, policy, 0.0)
        assert point.mean_loops == 1.0, policy
        assert point.loss == pytest.approx(data.ce_exit[0].double().mean().item()), policy


def test_logit_margin_confidence_follows_the_logit_gap_at_any_scale():
    from looptrain.eval.collect import chunk_scores

    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0], [30.0, 10.0, 0.0, -20.0]])
    scores = chunk_scores(torch.log_softmax(logits, dim=-1), None)
    assert scores["logit_margin"].tolist() == pytest.approx([1 - math.exp(-2.0), 1 - math.exp(-20.0)])
    # The probability margin of the scaled logits saturates; the logit margin keeps ordering them.
    assert scores["logit_margin"][1] > scores["logit_margin"][0]


@pytest.mark.parametrize("unreachable", [1.0 + 1e-6, math.inf])
def test_every_policy_unreachable_threshold_uses_all_loops(gated_exit_data, unreachable):
    """Confidences lie in [0, 1], so any threshold above 1 never triggers: all E loops, full-depth loss."""
    data = gated_exit_data
    full = data.ce_final[3].double().mean().item()
    for policy in POLICIES:
        point = evaluate_threshold(data, policy, unreachable)
        assert point.mean_loops == 4.0, policy
        assert point.loss == pytest.approx(full), policy


def test_sweeps_are_monotone_and_the_pick_respects_the_tolerance(gated_exit_data):
    data = gated_exit_data
    for policy in POLICIES:
        conf = data.scores[policy] if policy in data.scores else None
        if conf is not None:
            assert float(conf.min()) >= 0.0 and float(conf.max()) <= 1.0, policy
        thresholds = sweep_thresholds(data, policy)
        assert thresholds[0] == 0.0 and thresholds[-1] == math.inf
        loops = [evaluate_threshold(data, policy, t).mean_loops for t in thresholds]
        assert loops == sorted(loops), policy  # a higher bar never exits earlier
    report = evaluate_exits(data, tolerance=0.01)
    assert report.depth == 4
    for policy, res in report.policies.items():
        assert res.pick.ppl <= report.full_ppl * 1.01 * (1 + 1e-9), policy
        assert res.loops_saved == pytest.approx(4 - res.pick.mean_loops)
        feasible = [p.mean_loops for p in res.curve if p.ppl <= report.full_ppl * 1.01 * (1 + 1e-9)]
        assert res.pick.mean_loops == min(feasible)


def test_gate_policy_needs_a_gate():
    data = collect_exit_data(tiny_model(), random_batches(n=1), depth=3)
    assert "gate" not in available_policies(data)
    with pytest.raises(ValueError, match="exit_gate"):
        evaluate_threshold(data, "gate", 0.5)


# ----------------------------------------------------------------- diagnostics


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(recurrence="rmsnorm", exit_gate=True),
        dict(recurrence="contractive", injection="contractive", initial_state="zeros"),
        dict(injection="concat", prelude_layers=1, coda_layers=1, readout="final_only", positions="rope"),
    ],
)
def test_manual_loops_reproduce_the_model_forward(kw):
    """The diagnostics re-run the loops by hand; unclamped, they must be the model's forward exactly."""
    model = tiny_model(**kw)
    tokens = random_batches(n=1)[0][:, :-1]
    with torch.no_grad():
        ref = model(tokens, depth=4)
        mine = run_loops(model, tokens, 4)
    for a, b in zip(ref.states + ref.features, mine.states + mine.features):
        assert torch.equal(a, b)
    if ref.gate_logits is not None:
        assert all(torch.equal(a, b) for a, b in zip(ref.gate_logits, mine.gate_logits))


def test_radial_share_is_zero_for_rmsnorm_readout_and_large_for_raw():
    """<dL/dh, h> = 0 through an RMSNorm readout (up to eps); a raw readout passes the radial part.

    torch_default init keeps the state's RMS near 1, so the RMSNorm eps (1e-5)
    bounds the share at ~1e-5. The loss of all exits also flows through the
    later loops: a residual recurrence is not scale-invariant there, an
    inter-loop RMSNorm is.
    """
    batches = random_batches(n=1, seq=24)
    norm = radial_gradient_shares(tiny_model(readout="rmsnorm", init="torch_default", loops=4), batches)
    raw = radial_gradient_shares(tiny_model(readout="raw", init="torch_default", loops=4), batches)
    normed_loop = radial_gradient_shares(
        tiny_model(readout="rmsnorm", recurrence="rmsnorm", init="torch_default", loops=4), batches)
    assert max(norm.exit_loss) < 1e-4
    assert min(raw.exit_loss) > 0.1
    assert max(normed_loop.exit_loss + normed_loop.total_loss) < 1e-4
    assert norm.total_loss[0] > 100 * norm.exit_loss[0]  # the residual loops see the scale of h_1
    assert norm.tokens == batches[0][:, 1:].numel()


def test_radial_clamp_barely_moves_an_rmsnorm_recurrence_but_moves_a_residual_one():
    """Same weights, two recurrences, the radial clamp on loops 2..6.

    How the weights make this a real check: init N(0, 0.02) gives updates that
    are small next to a unit-RMS state but comparable to the (small) embedding
    state a residual recurrence starts from. The readout gain is raised to 25
    (in both models) so that the logits are O(1), as in a trained model, and the
    loss responds to the state's direction. With an inter-loop RMSNorm every
    loop starts from unit RMS, so removing the radial part of its small update
    is nearly a rescaling, which the RMSNorm readout and the next carry norm
    discard. In the residual recurrence the radial parts of the updates build
    the state (the clamp keeps the norm from growing, see the norms), so later
    updates weigh differently and the loss moves. The check fails if the clamp
    did nothing (both changes 0) or removed more than the radial part (the
    rmsnorm model would move too).
    """
    batches = random_batches(n=2, seq=32)
    effects = {}
    for recurrence in ("residual", "rmsnorm"):
        model = tiny_model(seed=1, recurrence=recurrence, loops=6, d_model=64)
        with torch.no_grad():
            model.readout.norm.weight.mul_(25.0)
        effects[recurrence] = radial_clamp_effect(model, batches)
    residual, normed = effects["residual"], effects["rmsnorm"]
    assert residual.loss[0] == pytest.approx(normed.loss[0])  # same weights, loop 1 is never clamped
    assert residual.rel_change[0] == 0.0 and normed.rel_change[0] == 0.0
    assert max(abs(c) for c in normed.rel_change) < 1e-3
    assert abs(residual.rel_change[-1]) > 5e-3
    assert abs(residual.rel_change[-1]) > 20 * max(abs(c) for c in normed.rel_change)
    assert residual.norm_mean_clamped[-1] < 0.7 * residual.norm_mean[-1]


# ------------------------------------------------------------------ reporting


@pytest.fixture(scope="module")
def two_results():
    from looptrain.eval.run import evaluate_model

    batches = random_batches(n=2, seq=16)
    return [
        evaluate_model(tiny_model(seed=0), batches, name="norm", diagnostics=True, device="cpu"),
        evaluate_model(tiny_model(seed=1, readout="raw", exit_gate=True), batches, [1, 2, 3, 4, 5, 6, 7],
                       name="raw", device="cpu"),
    ]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_plots_are_written(two_results, tmp_path):
    from looptrain.eval.plots import write_plots

    paths = write_plots(two_results, tmp_path / "plots")
    assert sorted(paths) == ["depth", "exits", "norm_hist", "norms"]
    assert all(_is_png(p) for p in paths.values())


def test_reports_hold_every_run(two_results, tmp_path):
    import csv

    from looptrain.eval.report import markdown, write_reports

    paths = write_reports(two_results, tmp_path)
    loaded = json.loads(open(paths["json"]).read())
    assert [r["name"] for r in loaded] == ["norm", "raw"]
    assert loaded[0]["depth"]["depths"] == [1, 2, 3, 4, 5, 6]  # default: 1..2K
    assert "gate" in loaded[1]["exits"]["policies"] and "gate" not in loaded[0]["exits"]["policies"]
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 6 + 7 and float(rows[0]["ppl"]) > 1
    md = markdown(two_results)
    assert "| depth | norm | raw |" in md and "| 7 | - |" in md and "Scale diagnostics" in md


# ------------------------------------------------------------------------- CLI


def _export(model, out_dir):
    """An exported model directory in the `looptrain export` format."""
    from looptrain.checkpoint.exported import save_exported

    return save_exported(model.state_dict(), model.cfg, out_dir)


def test_load_model_for_eval_reads_an_export(tmp_path):
    from looptrain.eval.load import load_model_for_eval

    model = tiny_model(seed=4, readout="alpha", exit_gate=True)
    loaded, recipe, data_dir = load_model_for_eval(_export(model, tmp_path / "export"))
    assert recipe is None and data_dir is None and loaded.cfg == model.cfg and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_paths_and_arguments_are_named(tmp_path, capsys):
    from looptrain.cli import main

    assert main(["eval", str(tmp_path / "missing")]) == exit_codes.BAD_INPUT
    assert "missing: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == exit_codes.BAD_INPUT
    assert "neither an export" in capsys.readouterr().err
    export = _export(tiny_model(), tmp_path / "export")
    assert main(["eval", str(export)]) == exit_codes.BAD_INPUT  # no recipe, no --data
    assert "pass --data" in capsys.readouterr().err
    assert main(["eval", str(export), "--depths", "3..x", "--data", str(tmp_path)]) == exit_codes.BAD_INPUT
    assert "--depths" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_on_an_export(tmp_path, bible_data, capsys):
    from looptrain.cli import main

    export = _export(tiny_model(seed=2, exit_gate=True), tmp_path / "export")
    out = tmp_path / "eval"
    code = main(["eval", str(export), "--data", bible_data, "--depths", "1..4", "--batches", "2",
                 "--batch-size", "4", "--out", str(out), "--diagnostics", "--device", "cpu"])
    assert code == exit_codes.OK
    captured = capsys.readouterr()
    printed = captured.out
    assert "| depth | export |" in printed and "| 3 |" in printed
    assert printed.count("## Perplexity by inference depth") == 1
    assert "export: depths 1..4" in captured.err and "2/2" in captured.err  # progress bars on stderr
    for name in ("results.json", "results.csv", "exits.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    for name in ("depth.png", "exits.png", "norms.png", "norm_hist.png"):
        assert _is_png(out / name)
    (result,) = json.loads((out / "results.json").read_text())
    assert result["depth"]["depths"] == [1, 2, 3, 4] and result["tokens"] == 2 * 4 * SEQ
    assert result["exits"]["depth"] == 3 and result["data_dir"] == bible_data
    assert len(result["diagnostics"]["radial"]["exit_loss"]) == 4


@pytest.mark.slow
def test_cli_on_a_trained_run_directory(tmp_path, bible_data, capsys, monkeypatch):
    """A real run directory (recipe.yaml + sharded checkpoint): data, batch size and batch count come
    from its recipe, and the loss at the trained depth is the trainer's logged validation loss."""
    from looptrain.cli import main
    from looptrain.config import load_recipe
    from looptrain.eval.load import load_model_for_eval, source_name
    from looptrain.train import main_worker

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_recipe(os.path.join(root, "recipes/quickstart.yaml"), [
        f"data.dir={bible_data}", f"out_dir={tmp_path}", "name=tiny", f"model.vocab_size={VOCAB}",
        f"model.max_seq_len={SEQ}", "model.d_model=32", "model.n_heads=4", "model.core_layers=1", "model.loops=3",
        "train.micro_batch_size=4", "train.steps=2", "train.val_every=2", "train.val_batches=3",
        "optim.schedule.warmup_steps=0",
    ])
    assert main_worker(recipe) == exit_codes.OK
    capsys.readouterr()
    model, loaded_recipe, data_dir = load_model_for_eval(recipe.run_dir)
    assert loaded_recipe == recipe and data_dir == bible_data and model.cfg == recipe.model
    checkpoint = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    assert source_name(checkpoint) == "tiny@2"
    same, ckpt_recipe, _ = load_model_for_eval(checkpoint)
    assert ckpt_recipe == recipe
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))

    monkeypatch.chdir(tmp_path)  # the default --out, ./eval_out/NAMES, is relative to the current directory
    assert main(["eval", recipe.run_dir, "--depths", "2..5", "--device", "cpu"]) == exit_codes.OK
    assert "| depth | tiny |" in capsys.readouterr().out
    assert not (tmp_path / "tiny" / "eval").exists()  # nothing written into the run directory
    (result,) = json.loads((tmp_path / "eval_out" / "tiny" / "results.json").read_text())
    assert result["depth"]["depths"] == [2, 3, 4, 5] and result["batch_size"] == 4
    assert result["tokens"] == 3 * 4 * SEQ and result["recipe"]["supervision"] == "per_loop"
    with open(tmp_path / "tiny" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if "val/loss/3" in line]
    assert [row["step"] for row in logged] == [2]
    for depth in (2, 3):
        got = result["depth"]["loss"][result["depth"]["depths"].index(depth)]
        assert got == pytest.approx(logged[0][f"val/loss/{depth}"], rel=1e-5)
    assert result["exits"]["depth"] == 3 and result["diagnostics"] is None
