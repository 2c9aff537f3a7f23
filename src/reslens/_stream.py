"""The corpus stream every data-set pass reads: corpus → units → batches → the captured sites.

Lens statistics, the learned lenses and their comparison, ROME's key statistics, the PCA experiment,
trigger mining and the command line read text through this one path, each adding only its own
accumulator and merge:

- :func:`units`: a corpus (a ``.txt`` file, a folder of them, a list of files, an iterable of
  strings; see :func:`reslens._corpus.corpus_texts`) read one text at a time and cut into token-id
  units that never cross from one text into the next: *windows* of the text's tokens (encoded
  without special tokens) or *sentences* (:func:`reslens._corpus.sentences`). **The edge rule**,
  written once in :func:`_windows` and :func:`limit`: a unit holds ``min_length`` (2) to
  ``max_length`` tokens; a text's last window shorter than ``min_length`` is dropped, a sentence is
  cut to ``max_length``; ``max_tokens`` keeps the first ``max_tokens`` tokens of the units, cutting
  the last unit kept (dropped when that leaves it shorter than ``min_length``).
- One reading of a text: a window's text is encoded whole, exactly as the tokenizer gives it (no
  blank lines squeezed, no piece boundaries where a tokenizer would read its text differently), the
  same for a text given to an analysis and for a book of a corpus; a corpus is read one text at a
  time and only as far as ``max_tokens`` needs.
- :func:`batches`: units padded on the right into :class:`~reslens.Batch` es, each row starting with
  the tokenizer's start tokens by its own convention (a BOS for Llama-2/3-, Mistral- or Gemma-style
  tokenizers; none for GPT-2 or SmolLM2, whose rows are the units alone), marked in
  ``Batch.special_mask`` so that no statistic counts them. The start tokens sit inside the model's
  context: a window holds at most ``n_ctx - len(start)`` tokens (:func:`window_size`).
- :func:`stream`: this process's batches, numbered in corpus order (rank ``r`` of ``W`` takes those
  numbered ``i`` with ``i % W == r``, :meth:`reslens._distributed.Shard.take`), each run once
  through :func:`reslens.hooks.capture` at the sites asked for (which checks the batch, once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from reslens._checks import check_choice, check_int
from reslens._corpus import UNITS, corpus_texts, encode, sentences, start_ids
from reslens._distributed import Shard
from reslens._inputs import Batch, pad_ids, pad_token_id
from reslens.hooks import capture
from reslens.residuals import Residuals

__all__ = ["units", "limit", "window_size", "batches", "batch_of", "stream", "chunks", "ONE"]

T = TypeVar("T")

#: One process: the shard of a pass run without a process group.
ONE = Shard(None, 0, 1)


def window_size(arch: Any, start: Sequence[int], max_length: int) -> int:
    """The longest window: ``max_length`` tokens, at most the model's context less the start tokens."""
    room = arch.n_ctx - len(start)
    if room < 1:
        raise ValueError(f"the model's context ({arch.n_ctx} positions) has no room after the tokenizer's "
                         f"{len(start)} start tokens")
    return min(max_length, room)


def _windows(pieces: Iterable[list[int]], size: int, min_length: int) -> Iterator[list[int]]:
    """One text's token ids (in pieces) cut into windows of ``size``; a last one under ``min_length`` dropped.

    The edge rule of every window in reslens.
    """
    buffer: list[int] = []
    for ids in pieces:
        buffer.extend(ids)
        if len(buffer) >= size:
            full = len(buffer) // size * size
            yield from (buffer[i : i + size] for i in range(0, full, size))
            buffer = buffer[full:]
    if len(buffer) >= min_length:
        yield buffer


def units(tokenizer: Any, corpus: Any, *, unit: str = "window", max_length: int,
          max_tokens: int | None = None, min_length: int = 2, name: str = "corpus") -> Iterator[list[int]]:
    """Token-id units of ``corpus``, texts read only as far as needed (see the module docstring).

    ``unit``: ``"window"`` (windows of ``max_length`` tokens of each text) or ``"sentence"``
    (sentences, tokenized 512 at a time and cut to ``max_length``). ``corpus``: anything
    :func:`reslens._corpus.corpus_texts` reads (a single text in memory goes in a list).
    """
    check_choice(unit, UNITS, "unit")
    check_int(max_length, "max_length", low=1)
    check_int(min_length, "min_length", low=1)
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"{name} holds text, so tokenizer= is required (e.g. from reslens.load_model())")
    texts, _ = corpus_texts(corpus, name=name)
    return limit(_cut(tokenizer, texts, unit, max_length, min_length), max_tokens, min_length)


def _cut(tokenizer: Any, texts: Iterable[str], unit: str, max_length: int,
         min_length: int) -> Iterator[list[int]]:
    """The units of each text in turn (see :func:`units`)."""
    for text in texts:
        if unit == "window":
            yield from _windows(encode(tokenizer, [text]), max_length, min_length)
            continue
        found = sentences(text)
        for start in range(0, len(found), 512):
            for ids in encode(tokenizer, found[start : start + 512]):
                if len(ids) >= min_length:
                    yield ids[:max_length]


def limit(units: Iterable[list[int]], max_tokens: int | None, min_length: int = 2) -> Iterator[list[int]]:
    """The first ``max_tokens`` tokens of ``units`` (all with None), the last unit cut to what is left.

    A cut unit shorter than ``min_length`` is dropped, as is every unit after it.
    """
    if max_tokens is None:
        yield from units
        return
    check_int(max_tokens, "max_tokens", low=1)
    left = max_tokens
    for ids in units:
        cut = ids[:left]
        if len(cut) >= min_length:
            yield cut
        left -= len(cut)
        if left <= 0:
            return


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batch_of(rows: Sequence[Sequence[int]], start: Sequence[int] = (), pad_id: int = 0) -> Batch:
    """Units as one right-padded :class:`~reslens.Batch`, ``start`` first in every row and marked special."""
    batch = pad_ids([[*start, *ids] for ids in rows], pad_id=pad_id)
    if not start:
        return batch
    special = torch.zeros_like(batch.attention_mask)
    special[:, : len(start)] = True  # right padding: the start tokens are every row's first positions
    return Batch(batch.input_ids, batch.attention_mask, batch.position_ids, special)


def batches(tokenizer: Any, units: Iterable[Sequence[int]], batch_size: int) -> Iterator[Batch]:
    """``units`` in batches of ``batch_size``, padded and led by the tokenizer's start tokens.

    ``tokenizer=None`` (units that are token ids already): no start tokens, padded with id 0.
    """
    check_int(batch_size, "batch_size", low=1)
    start = () if tokenizer is None else start_ids(tokenizer)
    pad = 0 if tokenizer is None else pad_token_id(tokenizer)
    for rows in chunks(units, batch_size):
        yield batch_of(rows, start, pad)


def stream(arch: Any, batches: Iterable[Any], *, sites: Any, layers: Any = None, shard: Shard = ONE,
           first: int = 0) -> Iterator[tuple[int, Any, Residuals]]:
    """``(number, batch, residuals)`` of this rank's batches (numbered from ``first``), each captured once.

    ``batches``: :class:`~reslens.Batch` es (or anything :func:`reslens.hooks.capture` takes); the
    residuals carry the batch's ``special_mask``, so ``residuals.stat_mask`` is the positions to count.
    """
    for number, batch in shard.take(batches, first=first):
        yield number, batch, capture(arch, batch, sites=sites, layers=layers)
