"""Reading text for the data-set passes: the corpus's texts, sentences, token ids and start tokens.

A corpus is a text file, a folder of ``.txt`` files (read in name order), a list of files, or an
iterable of strings; texts are streamed, one at a time. :mod:`reslens._stream` cuts them into
units (windows or sentences) and batches; this module is the text layer beneath it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from reslens._checks import check_tokenizer

__all__ = ["UNITS", "corpus_files", "corpus_texts", "sentences", "encode", "start_ids"]

UNITS = ("sentence", "window")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Mme.", "Messrs.", "Mlle.", "Capt.", "Col.", "Prof.")
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"'”’)\]_]*(?=\s|$)|$)", re.S)
_PARAGRAPH = re.compile(r"\n\s*\n")


def corpus_files(path: str | os.PathLike, *, name: str = "corpus") -> list[Path]:
    """The file itself, or a folder's ``.txt`` files in name order; clear errors otherwise.

    An empty path (``""``) is refused: ``Path("")`` would be the current folder.
    """
    if not os.fspath(path).strip():
        raise ValueError(f"{name}={os.fspath(path)!r} is an empty path; give a .txt file or a folder of them "
                         "(use '.' for the current folder)")
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{name} folder {os.fspath(path)!r} holds no .txt file")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(
        f"{name}={os.fspath(path)!r} is neither a file nor a folder; to use text held in memory pass a list "
        "of strings"
    )


def corpus_texts(corpus: Any, *, name: str = "corpus") -> tuple[Iterator[str], str]:
    """The texts of ``corpus``, streamed, and a description of where they come from.

    ``corpus``: a path (a file or a folder of ``.txt`` files), a list or tuple of file paths
    (``pathlib.Path`` or other ``os.PathLike``, read in the order given; plain strings in an
    iterable are texts, not paths), or an iterable of strings.
    """
    if isinstance(corpus, (str, os.PathLike)):
        files = corpus_files(corpus, name=name)
        texts = (f.read_text(encoding="utf-8") for f in files)
        return texts, f"{len(files)} file(s) under {os.fspath(corpus)}"
    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(f, os.PathLike) for f in corpus):
        files = [Path(f).expanduser() for f in corpus]
        for i, f in enumerate(files):
            if not f.is_file():
                raise FileNotFoundError(f"{name}[{i}]={os.fspath(f)!r} is not a file")
        folders = sorted({os.fspath(f.parent) for f in files})
        where = folders[0] if len(folders) == 1 else f"{len(folders)} folders"
        return (f.read_text(encoding="utf-8") for f in files), f"{len(files)} file(s) under {where}: " + \
            ", ".join(f.name for f in files)
    if isinstance(corpus, (bytes, Mapping)) or not isinstance(corpus, Iterable):
        raise TypeError(
            f"{name} must be a path, a folder of .txt files, or an iterable of strings; "
            f"got {type(corpus).__name__}"
        )

    def texts() -> Iterator[str]:
        for i, text in enumerate(corpus):
            if not isinstance(text, str):
                raise TypeError(f"{name} item {i} is {type(text).__name__}; expected str")
            yield text

    return texts(), "iterable of strings"


def sentences(text: str) -> list[str]:
    """Sentences of a text: paragraphs on blank lines, lines joined, split after . ! ? (not Mr. etc.)."""
    out: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        paragraph = " ".join(paragraph.split())
        pending = ""
        for match in _SENTENCE.finditer(paragraph):
            sentence = (pending + " " + match.group().strip()).strip()
            if sentence.endswith(_ABBREVIATIONS):
                pending = sentence
                continue
            pending = ""
            out.append(sentence)
        if pending:
            out.append(pending)
    return out


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens.

    Long texts are expected (callers cut them), so HuggingFace's "longer than the maximum
    length" warning is off.
    """
    from transformers import PreTrainedTokenizerBase

    check_tokenizer(tokenizer)
    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, **quiet)["input_ids"]]


def start_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer puts before a text by its own convention (e.g. a BOS), or ``()``.

    Found by tokenizing one word with and without special tokens; tokens it adds at the end
    (an EOS) are not start tokens.
    """
    plain = encode(tokenizer, ["a"])[0]
    full = list(tokenizer(["a"], add_special_tokens=True)["input_ids"][0])
    for n in range(len(full) - len(plain) + 1):
        if full[n : n + len(plain)] == plain:
            return tuple(int(i) for i in full[:n])
    return ()
