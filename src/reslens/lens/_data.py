"""The corpus pass learned lenses are fitted on: token windows, then every layer's residual at real tokens.

Both read :mod:`reslens._stream`: windows of the corpus's texts (led by the tokenizer's start tokens,
which are never fitted on), captured one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from reslens._checks import check_int
from reslens._corpus import start_ids
from reslens._stream import ONE, batches, stream, units, window_size
from reslens._distributed import Shard
from reslens.arch import Arch

__all__ = ["corpus_windows", "residual_batches", "model_name"]


def corpus_windows(
    arch: Arch, corpus: Any, tokenizer: Any, max_tokens: int, max_length: int
) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens (and the model's context), ``max_tokens`` in all.

    ``corpus``: a ``.txt`` file, a folder of them, a list of files, or an iterable of strings
    (see :func:`reslens._corpus.corpus_texts`). The tokenizer's start tokens are not counted.
    """
    check_int(max_tokens, "max_tokens", low=2)
    check_int(max_length, "max_length", low=2)
    if tokenizer is None:
        raise TypeError("corpus holds text, so tokenizer= is required (e.g. from reslens.load_model())")
    size = window_size(arch, start_ids(tokenizer), max_length)
    windows = list(units(tokenizer, corpus, max_length=size, max_tokens=max_tokens))
    if not windows:
        raise ValueError("corpus tokenizes to no window of at least 2 tokens")
    return windows


def residual_batches(arch: Arch, tokenizer: Any, windows: list[list[int]], batch_size: int,
                     shard: Shard = ONE) -> Iterator[torch.Tensor]:
    """Per batch of windows (this rank's): ``resid: [n_layer + 1, tokens, d_model]`` at its real tokens."""
    for _, _, res in stream(arch, batches(tokenizer, windows, batch_size), sites=("resid",), shard=shard):
        yield res.resid[:, res.stat_mask.to(res.resid.device)]  # [L + 1, tokens, d_model]


def model_name(arch: Arch) -> str:
    """What a learned lens's config records as its model: the checkpoint's name or path, else the class."""
    return arch.checkpoint_name or type(arch.model).__name__
