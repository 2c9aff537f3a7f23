"""The sums of the lens bench (:func:`reslens.lens.compare_lenses`): lens statistics plus calibration bins.

:class:`BenchSums` is :mod:`reslens.lens.stats`'s accumulator with one addition, the calibration of each
lens's top-1 against the actual next token: per layer and bin of the top-1 probability (``N_BINS``
equal-width bins of ``[0, 1]``), the number of positions, the sum of their top-1 probabilities and how
many of them had the next token as top-1. Every sum is float64 and summed over the ranks like the others,
so the expected calibration error read from them is the one-process one.

:func:`read_bench` streams the batches once and feeds every lens (one capture for all of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from reslens._distributed import Shard
from reslens.lens.result import LensResult
from reslens.lens.stats import _Sums
from reslens.lens.values import as_lens

__all__ = ["N_BINS", "BenchSums", "read_bench", "check_lenses", "expected_calibration_error"]

#: equal-width bins of the top-1 probability for the calibration error
N_BINS = 10


def expected_calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """ECE ``[...]`` of bins ``[..., N_BINS, 3]`` (count, sum of top-1 probability, sum of hits).

    ``sum_b (n_b / N) |accuracy_b - confidence_b| = sum_b |hits_b - confidence sum_b| / N``; NaN where
    ``N = 0``.
    """
    n = bins[..., 0].sum(-1)
    gap = (bins[..., 2] - bins[..., 1]).abs().sum(-1)
    return torch.where(n > 0, gap / n.clamp(min=1), torch.nan)


class BenchSums(_Sums):
    """:class:`~reslens.lens.stats._Sums` plus ``bins: [R, N_BINS, 3]`` (count, sum p(top-1), sum hit)."""

    def __init__(self, n_rows: int, rank: int = 0):
        super().__init__(n_rows, 1, rank)  # one sample per metric: the bench reads means only
        self.bins = torch.zeros(n_rows, N_BINS, 3, dtype=torch.float64)

    def add(self, lens: LensResult, stat_mask: torch.Tensor) -> None:
        super().add(lens, stat_mask)
        mask = stat_mask.cpu()
        targets = lens.targets.cpu()
        use = (targets >= 0) & mask  # positions with a next token
        top1 = lens.top_ids[..., 0].cpu()[:, use]  # [R, n]
        conf = lens.top_probs[..., 0].cpu()[:, use].double()  # [R, n]
        ok = (top1 >= 0) & conf.isfinite()
        hit = (top1 == targets[use]).double()
        which = (conf.nan_to_num(0.0) * N_BINS).long().clamp(0, N_BINS - 1)  # [R, n]
        for column, values in enumerate((torch.ones_like(conf), conf.nan_to_num(0.0), hit)):
            self.bins[..., column].scatter_add_(1, which, values.masked_fill(~ok, 0.0))

    def merge(self, shard: Shard) -> None:
        super().merge(shard)
        if shard.parallel:
            self.bins = shard.sum(self.bins.contiguous())


def read_bench(arch: Any, data: Any, total: int | None, lenses: list[Any], kept: tuple[int, ...],
               progress: bool, shard: Shard) -> list[BenchSums]:
    """Every lens's bench sums over this rank's batches of ``data`` (merged), each batch captured once."""
    from reslens.lens.stats import _read

    return _read(arch, data, total, lenses, kept, lambda: BenchSums(len(kept), shard.rank), 384, False,
                 progress, shard, desc="lens bench")


def check_lenses(lenses: Any, arch: Any) -> tuple[list[str], list[Any]]:
    """``(labels, lenses)``: a list (labelled by kind, no two of a kind) or a mapping ``{label: lens}``."""
    if isinstance(lenses, Mapping):
        labels = list(lenses)
        bad = [label for label in labels if not isinstance(label, str) or not label]
        if bad:
            raise TypeError(f"lenses as a mapping needs non-empty str labels; got {bad[0]!r}")
        chosen = [as_lens(lens) for lens in lenses.values()]
    elif isinstance(lenses, (str, bytes)) or not hasattr(lenses, "__iter__"):
        raise TypeError("lenses must be a list of lenses (None for the logit lens) or a mapping "
                        f"{{label: lens}}; got {type(lenses).__name__}")
    else:
        chosen = [as_lens(lens) for lens in lenses]
        labels = [lens.name for lens in chosen]
        if len(set(labels)) != len(labels):
            raise ValueError(f"lenses has two of the same kind ({labels}); give a mapping {{label: lens}} "
                             "to compare two lenses of one kind (e.g. {'tuned, cold': a, 'tuned, warm': b})")
    if not chosen:
        raise ValueError("lenses is empty; give at least one lens (None for the logit lens)")
    for lens in chosen:
        lens.check(arch)
    return labels, chosen
