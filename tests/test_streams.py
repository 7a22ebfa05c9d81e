"""Stream mixtures: weights as configured, exact resume, per-stream validation, refusals."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looptrain import exit_codes
from looptrain.config.loader import apply_overrides, recipe_from_dict
from looptrain.config.schema import DataConfig, StreamConfig
from looptrain.data.corpus import DocumentSource, corpus_text
from looptrain.data.errors import DataError
from looptrain.data.loader import InfiniteBatches, build_train_loader, build_val_loaders
from looptrain.data.prepare import prepare_dataset, read_dataset_json
from looptrain.data.streams import resolve_streams

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 512, 32


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    from looptrain.data.loader import SINGLE_PROCESS_ENV

    for key, value in SINGLE_PROCESS_ENV.items():
        monkeypatch.setenv(key, value)


def _chapters(first: int, last: int) -> DocumentSource:
    return DocumentSource(
        describe={"corpus": "bible", "chapters": [first, last]},
        documents=lambda: itertools.islice(corpus_text("bible"), first, last),
    )


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Path]:
    """Two datasets with one tokenizer (Genesis, then Exodus onwards), one with another
    tokenizer and one with another sequence length."""
    root = tmp_path_factory.mktemp("streams")
    out = {name: root / name for name in ("genesis", "exodus", "other_tok", "other_len")}
    prepare_dataset(_chapters(0, 50), out["genesis"], vocab_size=VOCAB, seq_len=SEQ_LEN, val_fraction=0.1,
                    progress=False)
    tokenizer = out["genesis"] / "tokenizer.model"
    prepare_dataset(_chapters(50, 80), out["exodus"], tokenizer_path=tokenizer, seq_len=SEQ_LEN, val_fraction=0.1,
                    progress=False)
    prepare_dataset(_chapters(50, 80), out["other_tok"], vocab_size=VOCAB - 40, seq_len=SEQ_LEN, progress=False)
    prepare_dataset(_chapters(50, 80), out["other_len"], tokenizer_path=tokenizer, seq_len=SEQ_LEN * 2,
                    progress=False)
    return out


def _mix(streams, **weights) -> DataConfig:
    return DataConfig(streams=[StreamConfig(path=str(streams[name]), **w) for name, w in weights.items()])


def _rows(path: Path) -> set[tuple[int, ...]]:
    loader = build_train_loader(DataConfig(dir=str(path), shuffle=False), seq_len=SEQ_LEN, vocab_size=VOCAB,
                                micro_batch_size=1)
    return {tuple(r) for batch in loader for r in batch.tolist()}


def test_mixture_draws_each_stream_in_its_proportion(streams):
    genesis, exodus = _rows(streams["genesis"]), _rows(streams["exodus"])
    assert genesis and exodus and not genesis & exodus
    cfg = _mix(streams, genesis={"proportion": 0.25}, exodus={"proportion": 0.75})
    loader = build_train_loader(cfg, seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=1)
    epoch = [tuple(r) for batch in loader for r in batch.tolist()]
    total = len(genesis) + len(exodus)  # the epoch keeps the underlying size, reweighted
    assert len(epoch) == total
    from_genesis = sum(r in genesis for r in epoch)
    assert sum(r in exodus for r in epoch) == total - from_genesis
    assert abs(from_genesis - 0.25 * total) <= 1, (from_genesis, total)

    # Absolute weights: Genesis twice per epoch, 40 samples of Exodus.
    cfg = _mix(streams, genesis={"repeat": 2.0}, exodus={"choose": 40})
    loader = build_train_loader(cfg, seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=1)
    epoch = [tuple(r) for batch in loader for r in batch.tolist()]
    assert sum(r in exodus for r in epoch) == 40 and sum(r in genesis for r in epoch) == 2 * len(genesis)


@pytest.mark.parametrize("consumed", [5, 70])
def test_mixture_resumes_at_the_exact_next_batch(streams, consumed):
    cfg = _mix(streams, genesis={"proportion": 0.4}, exodus={"proportion": 0.6})
    kw = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=8)
    reference = InfiniteBatches(build_train_loader(cfg, **kw))
    for _ in range(consumed):  # 70 crosses an epoch boundary (about 62 batches per epoch)
        next(reference)
    state = json.loads(json.dumps(reference.state_dict()))
    expected = [next(reference) for _ in range(6)]
    resumed = InfiniteBatches(build_train_loader(cfg, **kw))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)


def test_one_stream_is_the_same_as_data_dir(streams):
    kw = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=4)
    a = build_train_loader(DataConfig(dir=str(streams["genesis"])), **kw)
    b = build_train_loader(DataConfig(streams=[StreamConfig(path=str(streams["genesis"]))]), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_val_loaders_per_stream(streams):
    cfg = _mix(streams, genesis={}, exodus={})
    loaders = build_val_loaders(cfg, seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=4)
    assert list(loaders) == ["genesis", "exodus"]
    for name, loader in loaders.items():
        rows = torch.cat(list(loader))
        assert len(rows) == read_dataset_json(streams[name])["splits"]["val"]["sequences"]
    # A stream without a val split is trained on but not validated.
    cfg = _mix(streams, genesis={}, other_len={})
    cfg.streams[1].path = str(streams["exodus"])  # keep the seq_len; name it something else
    cfg.streams[1].name = "ex"
    assert list(build_val_loaders(cfg, seq_len=SEQ_LEN, vocab_size=VOCAB, micro_batch_size=4)) == ["genesis", "ex"]


@pytest.mark.parametrize("weights, message", [
    ({"genesis": {"proportion": 0.5}, "exodus": {"proportion": 0.3}},
     r"data.streams: proportions sum to 0.8 \(0.5 \+ 0.3\), not 1; make them add up to 1"),
    ({"genesis": {"proportion": 1.0}, "exodus": {}}, r"proportion is set on some streams but not on data.streams\[1\]"),
    ({"genesis": {"proportion": 0.5, "repeat": 2.0}, "exodus": {}}, r"sets proportion and repeat; give at most one"),
    ({"genesis": {}, "other_len": {}}, r"stream 'other_len': .*sequences hold 64 tokens .* model.max_seq_len=32"),
    ({"genesis": {}, "other_tok": {}},
     r"streams 'genesis' \(.*genesis\) and 'other_tok' \(.*other_tok\) were prepared with different tokenizers"),
])
def test_bad_mixtures_are_refused_naming_the_stream(streams, weights, message):
    with pytest.raises(DataError, match=message) as caught:
        resolve_streams(_mix(streams, **weights), seq_len=SEQ_LEN, vocab_size=VOCAB, splits=("train",))
    assert "\n" not in str(caught.value)


def test_duplicate_names_and_small_model_vocabulary(streams):
    cfg = DataConfig(streams=[StreamConfig(path=str(streams["genesis"])), StreamConfig(path=str(streams["genesis"]))])
    with pytest.raises(DataError, match=r"data.streams\[0\] and data.streams\[1\] are both named 'genesis'"):
        resolve_streams(cfg, seq_len=SEQ_LEN, vocab_size=VOCAB)
    with pytest.raises(DataError, match=f"stream 'genesis': .*the tokenizer has {VOCAB} tokens but "
                                        f"model.vocab_size=300; set model.vocab_size={VOCAB}"):
        resolve_streams(_mix(streams, genesis={}, exodus={}), seq_len=SEQ_LEN, vocab_size=300)


def _recipe(streams: dict[str, Path], tmp_path: Path, name: str, **data) -> dict:
    return {
        "name": name,
        "out_dir": str(tmp_path),
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_heads": 2, "core_layers": 1, "loops": 2,
                  "max_seq_len": SEQ_LEN, "dropout": 0.1},
        "data": {"streams": [{"path": str(streams["genesis"]), "proportion": 0.5},
                             {"path": str(streams["exodus"]), "name": "ex", "proportion": 0.5}], **data},
        "optim": {"lr": 3e-3},
        "train": {"steps": 4, "micro_batch_size": 4, "log_every": 1, "val_every": 2, "val_batches": 2,
                  "device": "cpu", "seed": 3},
        "checkpoint": {"every": 0},
        "tracking": {"mode": "disabled"},
    }


def test_training_on_a_mixture_reports_validation_per_stream(streams, tmp_path):
    from looptrain.parallel import init_distributed
    from looptrain.train import Trainer

    recipe = recipe_from_dict(_recipe(streams, tmp_path, "mix"))
    trainer = Trainer(recipe, init_distributed("cpu"))
    result = trainer.run()
    trainer.tracker.finish(result.exit_code)
    assert result.exit_code == exit_codes.OK
    for k in (1, 2):
        for prefix in ("val/loss", "val/loss/genesis", "val/loss/ex", "val/ppl/genesis"):
            assert f"{prefix}/{k}" in result.final_metrics, sorted(result.final_metrics)
        low, high = sorted([result.final_metrics[f"val/loss/genesis/{k}"], result.final_metrics[f"val/loss/ex/{k}"]])
        assert low <= result.final_metrics[f"val/loss/{k}"] <= high  # the token-weighted mean of the two


def test_cli_refuses_proportions_that_do_not_sum(streams, tmp_path):
    import yaml

    data = apply_overrides(_recipe(streams, tmp_path, "bad"), ["data.streams=" + json.dumps(
        [{"path": str(streams["genesis"]), "proportion": 0.7}, {"path": str(streams["exodus"]), "proportion": 0.7}]
    )])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == exit_codes.BAD_INPUT, run.stderr
    assert "proportions sum to 1.4" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "bad" / "recipe.yaml").exists()


@pytest.mark.slow
def test_two_rank_mixture_killed_and_resumed_gives_the_identical_losses(streams, tmp_path):
    """kill -9 of a 2-rank FSDP2 run over two streams after a checkpoint; the restarted
    run's losses equal an uninterrupted run's, step for step."""
    from test_checkpoint import Job, assert_continues, step_losses

    def recipe(name: str) -> dict:
        data = _recipe(streams, tmp_path, name, num_canonical_nodes=2)
        data["train"].update({"steps": 16, "micro_batch_size": 4, "global_batch_size": 8, "val_every": 8})
        data["checkpoint"].update({"every": 4, "keep_last": 10})
        data["parallel"] = {"backend": "fsdp2"}
        return data

    straight = Job(recipe("straight"), 2, tmp_path).wait()
    killed = recipe("killed")
    Job(killed, 2, tmp_path).kill_after_commit(4)
    resumed = Job(killed, 2, tmp_path).wait()
    assert_continues(resumed, step_losses(straight.run_dir), exact=True)
    from looptrain.tracking.metrics_file import read_metrics

    val = [r for r in read_metrics(str(resumed.run_dir)) if "val/loss/ex/2" in r]
    assert val and all("val/loss/genesis/2" in r for r in val)
