"""Any tokenizer and corpus form: sentencepiece, Hugging Face tokenizer.json, a dataset's
tokenizer, pre-tokenized ids, and Hugging Face `datasets` on disk."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from looptrain.config.schema import DataConfig
from looptrain.data.corpus import corpus_text
from looptrain.data.errors import DataError
from looptrain.data.loader import SINGLE_PROCESS_ENV, build_train_loader, check_dataset
from looptrain.data.prepare import prepare_dataset
from looptrain.data.tokenizer import HFTokenizer, Tokenizer

SEQ_LEN = 32


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for key, value in SINGLE_PROCESS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    return list(itertools.islice(corpus_text("bible"), 40))


@pytest.fixture(scope="module")
def jsonl(chapters, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "kjv.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chapters), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def spm_dataset(jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "spm"
    prepare_dataset([jsonl], out, vocab_size=512, seq_len=SEQ_LEN, progress=False)
    return out


def _shards(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.mds"))}


def _rows(root: Path, vocab: int):
    cfg = DataConfig(dir=str(root), shuffle=False)
    return [b for b in build_train_loader(cfg, seq_len=SEQ_LEN, vocab_size=vocab, micro_batch_size=4)]


def test_hugging_face_tokenizer_json(chapters, jsonl, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(chapters, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    loaded = HFTokenizer.load(path)
    assert loaded.eos_id == hf.token_to_id("<|endoftext|>") and loaded.decode(loaded.encode(chapters[3])) == chapters[3]

    out = tmp_path / "hfds"
    summary = prepare_dataset([jsonl], out, tokenizer_path=path, seq_len=SEQ_LEN, workers=2, progress=False)
    assert summary["tokenizer_file"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    info = check_dataset(out, SEQ_LEN, loaded.vocab_size)
    assert info.vocab_size == loaded.vocab_size
    first = _rows(out, loaded.vocab_size)[0][0].tolist()
    text = loaded.decode(first[: first.index(loaded.eos_id)] if loaded.eos_id in first else first)
    assert len(text) > 20 and text in "".join(chapters)
    # The model must hold the tokenizer's vocabulary: refused naming both sizes.
    with pytest.raises(DataError, match=f"the tokenizer has {loaded.vocab_size} tokens but model.vocab_size=512"):
        check_dataset(out, SEQ_LEN, 512)


def test_a_prepared_datasets_tokenizer_and_pre_tokenized_input(chapters, jsonl, spm_dataset, tmp_path):
    # --tokenizer DATASET_DIR reuses that dataset's tokenizer (same hash, same shards).
    again = prepare_dataset([jsonl], tmp_path / "again", tokenizer_path=spm_dataset, seq_len=SEQ_LEN, progress=False)
    assert again["tokenizer_sha256"] == json.loads((spm_dataset / "dataset.json").read_text())["tokenizer_sha256"]
    assert _shards(tmp_path / "again") == _shards(spm_dataset)

    # The same documents as token ids: the same dataset.
    tokenizer = Tokenizer.load(spm_dataset / "tokenizer.model")
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"ids": tokenizer.encode(c)}) + "\n" for c in chapters))
    pre = prepare_dataset([ids], tmp_path / "pre", tokenizer_path=spm_dataset, seq_len=SEQ_LEN, tokens_field="ids",
                          progress=False)
    assert _shards(tmp_path / "pre") == _shards(spm_dataset)
    assert pre["splits"] == again["splits"]

    with pytest.raises(DataError, match="the input is pre-tokenized: pass --tokenizer"):
        prepare_dataset([ids], tmp_path / "no_tok", seq_len=SEQ_LEN, tokens_field="ids", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ids": [1, 2, 99999]}) + "\n" + json.dumps({"ids": [3, 4]}) + "\n")
    with pytest.raises(DataError, match="holds id 99999, outside the tokenizer's 512 ids"):
        prepare_dataset([bad], tmp_path / "bad", tokenizer_path=spm_dataset, seq_len=1, tokens_field="ids",
                        progress=False)
    assert not (tmp_path / "bad").exists()


def test_hugging_face_datasets_on_disk(chapters, spm_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": chapters, "n": list(range(len(chapters)))})
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "kjv.parquet"))
    for name, source in [("saved", tmp_path / "saved"), ("parquet", tmp_path / "kjv.parquet")]:
        prepare_dataset([source], tmp_path / f"from_{name}", tokenizer_path=spm_dataset, seq_len=SEQ_LEN,
                        progress=False)
        assert _shards(tmp_path / f"from_{name}") == _shards(spm_dataset), name
    with pytest.raises(DataError, match="has no field 'body'"):
        prepare_dataset([tmp_path / "kjv.parquet"], tmp_path / "x", tokenizer_path=spm_dataset, seq_len=SEQ_LEN,
                        text_field="body", progress=False)
