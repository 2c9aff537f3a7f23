"""The PCA experiment's sample: prediction positions drawn from token windows, and their residual stacks.

:func:`sample_windows` cuts texts into windows and draws the positions; :func:`experiment_stacks`
captures each chosen position's residual at every layer, one batch of windows at a time (led by the
tokenizer's start tokens), and under a process group each rank captures its share of the batches;
both read :mod:`reslens._stream`.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from reslens._distributed import Shard
from reslens._corpus import start_ids
from reslens._inputs import pad_token_id
from reslens._stream import batch_of, chunks, stream, units
from reslens.arch import Arch
from reslens.residuals import Residuals

__all__ = ["experiment_stacks", "model_top1", "sample_windows"]


def model_top1(arch: Arch, residuals: Residuals, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's own top-1 ``[E]``: the final raw residual through the final norm and the unembedding."""
    with torch.no_grad():
        final = residuals.get("resid", arch.n_layer)[seq, pos].to(device=arch.device, dtype=arch.dtype)
        return arch.logits(final).float().argmax(-1)


def sample_windows(tokenizer: Any, texts: Any, n: int, seed: int, max_length: int, min_context: int):
    """``n`` distinct (window, position) predictions sampled from the texts' token windows.

    Windows are :func:`reslens._stream.units` of ``max_length`` tokens, every one kept (even a
    text's last single token: windows are numbered as cut); a position counts the window's tokens
    from 0, the tokenizer's start tokens not included.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a list of strings")
    windows = list(units(tokenizer, list(texts), max_length=max_length, min_length=1, name="texts"))
    candidates = [(w, p) for w, ids in enumerate(windows) for p in range(min_context, len(ids))]
    if not candidates:
        raise ValueError(f"texts hold no position with at least {min_context} tokens of context; "
                         "give longer texts")
    if n > len(candidates):
        raise ValueError(f"n={n} is larger than the {len(candidates)} prediction positions "
                         "available in texts")
    chosen = sorted(random.Random(seed).sample(candidates, n))
    return windows, chosen


def experiment_stacks(arch: Arch, tokenizer: Any, windows: list[list[int]], chosen: list[tuple[int, int]],
                      batch_size: int, progress: bool, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stacks ``[n, n_layer + 1, d_model]`` and final predictions ``[n]`` of the chosen positions.

    The windows holding a chosen position are read in batches of ``batch_size``
    (:func:`reslens._stream.stream`: under a process group this rank captures the batches ``b``
    with ``b % world == rank``), and every rank gets all ``n``, in the order of ``chosen``.
    """
    from tqdm.auto import tqdm

    by_window: dict[int, list[int]] = {}
    for w, p in chosen:
        by_window.setdefault(w, []).append(p)
    order = sorted(by_window)
    firsts = [0]  # the number of the first example of each window, in the order of chosen (sorted)
    for w in order:
        firsts.append(firsts[-1] + len(by_window[w]))
    start, pad_id = start_ids(tokenizer), pad_token_id(tokenizer)
    groups = list(chunks(order, batch_size))
    rows = (batch_of([windows[w] for w in group], start, pad_id) for group in groups)
    read = stream(arch, rows, sites=("resid",), shard=shard)
    stacks, finals, numbers = [], [], []
    with shard.together():  # a batch that fails on one rank stops every rank at the gather
        for b, _, res in tqdm(read, total=len(range(shard.rank, len(groups), shard.world)),
                              desc="pca residuals", unit="batch", disable=not (progress and shard.primary)):
            group = groups[b]
            seq = torch.tensor([row for row, w in enumerate(group) for _ in by_window[w]])
            pos = torch.tensor([len(start) + p for w in group for p in by_window[w]])
            stacks.append(res.resid[:, seq, pos].transpose(0, 1))  # [e, n_layer + 1, d_model]
            finals.append(model_top1(arch, res, seq, pos))
            first = b * batch_size
            numbers.append(torch.arange(firsts[first], firsts[first + len(group)]))
    if not numbers:  # a rank with no batch (more ranks than batches)
        stacks.append(torch.empty(0, arch.n_layer + 1, arch.d_model, device=arch.device))
        finals.append(torch.empty(0, dtype=torch.long, device=arch.device))
        numbers.append(torch.empty(0, dtype=torch.long))
    stack, final, number = torch.cat(stacks), torch.cat(finals), torch.cat(numbers)
    if shard.parallel:
        where = shard.cat(number).argsort()
        stack, final = shard.cat(stack)[where], shard.cat(final)[where]
    return stack, final
