"""Corpus helpers shared by ``train_embedded.py`` and ``eval_embedded.py`` (not part of the package).

The corpus is ``../shared/corpus`` (33 public-domain books, ``MANIFEST.tsv``). Three whole
books are held out for validation, as the corpus README suggests. Token arrays are cached
as uint16 ``.npy`` under ``runs/cache/`` (gitignored), never inside the repository's tracked
files.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_DIR = REPO / "src" / "reslens" / "data" / "embedded"
HELD_OUT_BOOKS = (
    "105-persuasion.txt",
    "2852-hound-of-the-baskervilles.txt",
    "12-through-the-looking-glass.txt",
)
EOS_ID = 50256


def default_corpus() -> Path:
    """``../shared/corpus`` beside the repository, else ``shared/corpus`` inside it."""
    for candidate in (REPO.parent / "shared" / "corpus", REPO / "shared" / "corpus"):
        if (candidate / "MANIFEST.tsv").is_file():
            return candidate
    return REPO.parent / "shared" / "corpus"


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    """Rows of ``MANIFEST.tsv``: ``file, gutenberg_id, title, author, chars, sha256``."""
    with open(corpus / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def split_books(corpus: Path) -> tuple[list[str], list[str]]:
    """``(train_files, held_out_files)``, split by whole book."""
    files = [row["file"] for row in read_manifest(corpus)]
    missing = [name for name in HELD_OUT_BOOKS if name not in files]
    if missing:
        raise FileNotFoundError(f"held-out books {missing} are not in {corpus / 'MANIFEST.tsv'}")
    return [f for f in files if f not in HELD_OUT_BOOKS], list(HELD_OUT_BOOKS)


def encode_books(tokenizer, corpus: Path, files: list[str]) -> list[np.ndarray]:
    """Token ids of each book, no special tokens. Returns one ``[n_tokens]`` uint16 array per book."""
    texts = [(corpus / name).read_text(encoding="utf-8") for name in files]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint16) for e in encodings]


def _cache_key(corpus: Path, tokenizer_dir: Path) -> str:
    digest = hashlib.sha256((corpus / "MANIFEST.tsv").read_bytes())
    digest.update((tokenizer_dir / "tokenizer.json").read_bytes())
    return digest.hexdigest()[:16]


def load_token_arrays(tokenizer, tokenizer_dir: Path, corpus: Path, cache_root: Path) -> dict:
    """Tokenise the corpus once and cache it.

    Returns ``{"train": [n_train] uint16, "val": [n_val] uint16, "meta": dict}``; books are
    joined with ``<|endoftext|>`` after each one. ``meta`` holds the files, token and byte counts.
    """
    cache = cache_root / f"tokens-{_cache_key(corpus, tokenizer_dir)}"
    if not (cache / "meta.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        train_files, val_files = split_books(corpus)
        meta = {"corpus": str(corpus), "train_files": train_files, "val_files": val_files}
        for split, files in (("train", train_files), ("val", val_files)):
            books = encode_books(tokenizer, corpus, files)
            eos = np.asarray([EOS_ID], dtype=np.uint16)
            joined = np.concatenate([part for book in books for part in (book, eos)])
            np.save(cache / f"{split}.npy", joined)
            meta[f"{split}_tokens"] = int(sum(len(b) for b in books))
            meta[f"{split}_bytes"] = int(sum((corpus / f).stat().st_size for f in files))
        (cache / "meta.json").write_text(json.dumps(meta, indent=1))
    return {
        "train": np.load(cache / "train.npy"),
        "val": np.load(cache / "val.npy"),
        "meta": json.loads((cache / "meta.json").read_text()),
    }


def common_tokens(train: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequent token ids of ``train`` (``<|endoftext|>`` excluded), most frequent first."""
    counts = np.bincount(train.astype(np.int64), minlength=EOS_ID + 1)
    counts[EOS_ID] = 0
    return np.argsort(-counts, kind="stable")[:k]
