"""A sentencepiece BPE tokenizer that gives back exactly the text it was given.

sentencepiece's default normaliser is lossy: it rewrites Unicode (NFKC),
strips leading/trailing whitespace, collapses runs of spaces and cannot emit
newlines. For code, poetry or any text where layout carries meaning, and for
honest perplexity numbers, `decode(encode(text)) == text` must hold for every
string. The training options below guarantee it:

- `normalization_rule_name="identity"`: no Unicode rewriting;
- `remove_extra_whitespaces=False`, `add_dummy_prefix=False`: spaces are kept
  as they are, none added;
- `allow_whitespace_only_pieces=True`: runs of spaces (indentation) become
  pieces of their own instead of being split oddly;
- `"\\n"` and `"\\t"` as user symbols: line breaks and tabs are tokens (the
  trainer reads text line by line, so it would never learn them otherwise);
- `byte_fallback=True`: any character outside the vocabulary (emoji, rare
  scripts) is spelled as UTF-8 byte pieces, so there is no `<unk>`;
- `split_digits=True`: numbers are spelled digit by digit, which keeps
  arithmetic-like text from being memorised as opaque chunks;
- printable ASCII is always in the vocabulary (`required_chars`), so digits
  and code punctuation never fall back to bytes on a small corpus.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from looptrain.data.errors import DataError

USER_SYMBOLS = ("\n", "\t")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# <unk>, <s>, </s>, the user symbols and the 256 byte pieces come before any merge.
RESERVED_PIECES = 3 + len(USER_SYMBOLS) + 256
# Printable ASCII always gets a piece of its own, even where the corpus is
# too small or too rare in digits/symbols for the trainer to keep them.
REQUIRED_CHARS = string.digits + string.ascii_letters + string.punctuation


class TokenizerError(DataError):
    """A tokenizer cannot be trained or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Tokenizer:
    """A loaded sentencepiece model with the few operations looptrain needs."""

    processor: spm.SentencePieceProcessor
    path: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(
                f"{path}: no tokenizer model here; train one with `looptrain prepare` or pass the right path"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{path}: not a sentencepiece model ({err}); re-run `looptrain prepare`") from err
        return cls(processor=processor, path=path)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once (sentencepiece spreads them over threads)."""
        return self.processor.Encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.DecodeIds([int(i) for i in ids])

    def sha256(self) -> str:
        """Hash of the serialized model: names the exact vocabulary a dataset was made with."""
        return file_sha256(self.path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _training_lines(documents: Iterable[str], max_lines: int, seed: int) -> Iterator[str]:
    """Non-empty lines of the documents, reservoir-sampled down to max_lines.

    sentencepiece learns from lines; newlines themselves are user symbols.
    Sampling here (rather than inside sentencepiece) keeps the choice of lines
    a deterministic function of `seed`.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for document in documents:
        for line in document.split("\n"):
            if not line:
                continue
            seen += 1
            if len(reservoir) < max_lines:
                reservoir.append(line)
            else:
                slot = rng.randrange(seen)
                if slot < max_lines:
                    reservoir[slot] = line
    return iter(reservoir)


def train_tokenizer(
    documents: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int,
    *,
    max_lines: int = 2_000_000,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = False,
) -> Path:
    """Train a lossless BPE tokenizer on `documents`; write it to `model_path` and return the path.

    `vocab_size` counts everything: the 3 special tokens, the 2 user symbols
    and the 256 byte pieces (RESERVED_PIECES) plus the learned merges. If the
    corpus is too small to learn that many pieces, sentencepiece's error is
    turned into one that says so. With `progress`, a line on stderr before and
    after each phase (sentencepiece reports no progress of its own).
    """
    smallest = RESERVED_PIECES + len(REQUIRED_CHARS) + 32
    if vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: {RESERVED_PIECES} ids are reserved for special, "
            f"newline/tab and byte pieces and {len(REQUIRED_CHARS)} for printable ASCII; use at least {smallest}"
        )
    start = time.perf_counter()
    say = _phase_printer(progress, start)
    say("tokenizer: sampling training lines")
    lines = list(_training_lines(documents, max_lines, seed))
    if not lines:
        raise TokenizerError("no text to train the tokenizer on: every input document is empty")
    size_mb = sum(len(line) for line in lines) / 1e6
    say(f"tokenizer: training a {vocab_size}-piece BPE on {len(lines):,} lines ({size_mb:.1f} M characters); "
        "no progress is shown while sentencepiece trains")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=list(USER_SYMBOLS),
            character_coverage=0.9995,
            required_chars=REQUIRED_CHARS,
            max_sentence_length=1 << 16,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size" in message or "vocab_size" in message:
            raise TokenizerError(
                f"cannot learn {vocab_size} pieces from this corpus ({message.strip()}); "
                "use a smaller --vocab-size or more text"
            ) from err
        raise
    say("tokenizer: trained")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    partial = model_path.with_name(model_path.name + f".tmp-{os.getpid()}")
    partial.write_bytes(model.getvalue())
    os.replace(partial, model_path)
    return model_path


def _phase_printer(enabled: bool, start: float):
    """`say(text)` prints `[elapsed] text` to stderr when enabled."""

    def say(text: str) -> None:
        if enabled:
            print(f"[{time.perf_counter() - start:6.1f} s] {text}", file=sys.stderr, flush=True)

    return say


# ------------------------------------------------------------ other tokenizers

# Names Hugging Face tokenizers give their end-of-text token, in order of preference.
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # what a prepared dataset may hold


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), with the same operations as Tokenizer.

    Documents are encoded without the tokenizer's own special tokens (BOS/CLS);
    the end-of-text token that separates documents is the first of
    HF_EOS_TOKENS that the vocabulary has.
    """

    tokenizer: object
    path: str
    eos_id: int

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = os.fspath(path)
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as err:
            raise TokenizerError(f"{path}: a tokenizer.json needs the `tokenizers` library: "
                                 "pip install 'looptrain[hf]'") from err
        try:
            tokenizer = _HF.from_file(path)
        except Exception as err:  # the Rust side raises plain Exception
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({str(err)[:120]})") from err
        for token in HF_EOS_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return cls(tokenizer=tokenizer, path=path, eos_id=int(token_id))
        raise TokenizerError(f"{path}: has none of the end-of-text tokens {', '.join(HF_EOS_TOKENS)}; "
                             "add one to the vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return -1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def sha256(self) -> str:
        return file_sha256(self.path)


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer file `--tokenizer PATH` means: a .model, a tokenizer.json, or a prepared dataset's."""
    path = Path(path)
    if path.is_dir():
        named = None
        meta = path / "dataset.json"
        if meta.is_file():
            import json

            try:
                named = json.loads(meta.read_text()).get("tokenizer_file")
            except (ValueError, AttributeError):
                named = None
        for name in ([named] if named else []) + list(TOKENIZER_FILES):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path}: a directory without {' or '.join(TOKENIZER_FILES)}; pass a tokenizer file "
                             "or a prepared dataset")
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer here; pass a sentencepiece .model, a tokenizer.json or a "
                             "prepared dataset directory")
    return path


def load_tokenizer(path: str | os.PathLike):
    """A sentencepiece model or a Hugging Face tokenizer.json (by file name), or a dataset's tokenizer."""
    path = tokenizer_file(path)
    if path.name.endswith(".json"):
        return HFTokenizer.load(path)
    return Tokenizer.load(path)
