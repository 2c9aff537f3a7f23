"""The corpus pass learned lenses are fitted on: token windows, then every layer's residual at real tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from reslens._checks import check_int
from reslens._corpus import corpus_texts, text_windows
from reslens._inputs import pad_ids
from reslens.arch import Arch
from reslens.hooks import capture

__all__ = ["corpus_windows", "residual_batches", "model_name"]


def corpus_windows(
    arch: Arch, corpus: Any, tokenizer: Any, max_tokens: int, max_length: int
) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens (and the model's context), ``max_tokens`` in all.

    ``corpus``: a ``.txt`` file, a folder of them, a list of files, or an iterable of strings
    (see :func:`reslens._corpus.corpus_texts`).
    """
    check_int(max_tokens, "max_tokens", low=2)
    check_int(max_length, "max_length", low=2)
    texts, _ = corpus_texts(corpus)
    return text_windows(tokenizer, texts, max_tokens, min(max_length, arch.n_ctx))


def residual_batches(arch: Arch, windows: list[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Per batch of windows, ``resid: [n_layer + 1, tokens, d_model]`` at its real, non-special tokens."""
    check_int(batch_size, "batch_size", low=1)
    for start in range(0, len(windows), batch_size):
        batch = pad_ids(windows[start : start + batch_size]).to(arch.device)
        res = capture(arch, batch, sites=("resid",))
        yield res.resid[:, res.stat_mask.to(res.resid.device)]  # [L + 1, tokens, d_model]


def model_name(arch: Arch) -> str:
    """What a learned lens's config records as its model: the checkpoint's name or path, else the class."""
    return arch.checkpoint_name or type(arch.model).__name__
