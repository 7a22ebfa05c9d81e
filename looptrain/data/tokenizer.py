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
