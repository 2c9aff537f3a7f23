"""Lenses side by side on held-out text (Belrose et al. 2023, Fig. 3): KL to the final layer, cross-entropy.

:func:`compare_lenses` captures the token windows once and reads every batch through every lens with
the accumulator of :func:`reslens.lens.lens_stats` (bounded memory, pads and special tokens
left out), and keeps, per lens and layer, the mean ``KL(p_final || p_lens)``, the cross-entropy
against the actual next token (``-mean log p(next)``, nats) and the top-1 agreement with the final layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_bool, check_int
from reslens._distributed import shard_of
from reslens._saving import Saveable
from reslens._text import html_table, pandas
from reslens.arch import adapter
from reslens._stream import batches
from reslens.lens._data import corpus_windows
from reslens.lens.stats import QUANTILES, _read
from reslens.lens.values import as_lens

__all__ = ["LensComparison", "compare_lenses"]


@dataclass(frozen=True, repr=False, eq=False)
class LensComparison(Saveable):
    """Per-layer scores of ``K`` lenses on the same tokens. ``R`` = number of ``resid`` layers.

    - ``lenses``: the lenses' names, ``layers``: the ``resid`` layers (the last one is the output)
    - ``kl_final_layer: [K, R]``: mean KL(p_final || p_lens) (nats)
    - ``cross_entropy: [K, R]``: mean -log p_lens(actual next token) (nats)
    - ``top1_agreement: [K, R]``: fraction of positions whose top-1 is the final top-1
    - ``n_tokens``: positions scored
    """

    lenses: tuple[str, ...]
    layers: tuple[int, ...]
    kl_final_layer: torch.Tensor
    cross_entropy: torch.Tensor
    top1_agreement: torch.Tensor
    n_tokens: int

    def __post_init__(self) -> None:
        shape = (len(self.lenses), len(self.layers))
        for name in ("kl_final_layer", "cross_entropy", "top1_agreement"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {shape}")

    def to_frame(self):
        """Long-form ``pandas.DataFrame``: one row per (lens, layer)."""
        pd = pandas()
        rows = [
            (
                name,
                layer,
                float(self.kl_final_layer[k, r]),
                float(self.cross_entropy[k, r]),
                float(self.top1_agreement[k, r]),
            )
            for k, name in enumerate(self.lenses)
            for r, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(
            rows, columns=["lens", "layer", "kl_final_layer", "cross_entropy", "top1_agreement"]
        )

    def table(self) -> str:
        """Per layer: each lens's KL(final || lens) and cross-entropy, in nats."""
        cells = [[f"{float(self.kl_final_layer[k, r]):.3f} / {float(self.cross_entropy[k, r]):.3f}"
                  for k in range(len(self.lenses))] for r in range(len(self.layers))]
        width = max(len(c) for row in cells for c in row + list(self.lenses))
        head = f"{'layer':>5} " + " ".join(f"{n:>{width}}" for n in self.lenses)
        lines = [f"{self.n_tokens} tokens; KL(final ‖ lens) / cross-entropy with the next token (nats)",
                 head, "-" * len(head)]
        for layer, row in zip(self.layers, cells):
            lines.append(f"{layer:>5} " + " ".join(f"{c:>{width}}" for c in row))
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """KL(final || lens) and cross-entropy per layer, one line per lens (a figure)."""
        from reslens.lens._plot import plot_lens_comparison

        return plot_lens_comparison(self, ax=ax)

    def _repr_html_(self) -> str:
        header = ("layer", *(f"{n} {what}" for n in self.lenses for what in ("KL", "CE")))
        rows = [(layer, *(f"{float(t[k, r]):.3f}" for k in range(len(self.lenses))
                          for t in (self.kl_final_layer, self.cross_entropy)))
                for r, layer in enumerate(self.layers)]
        note = "(nats; KL = KL(final ‖ lens), CE = cross-entropy with the next token)"
        return html_table(repr(self), header, rows, note=note)

    def __repr__(self) -> str:
        return (
            f"LensComparison(lenses={list(self.lenses)}, layers={self.layers[0]}..{self.layers[-1]}, "
            f"tokens={self.n_tokens})"
        )


def _check_lenses(lenses: Any, arch: Any) -> list[Any]:
    """``lenses`` as lens values, each checked against the model, no two of a kind."""
    if isinstance(lenses, (str, bytes)) or not hasattr(lenses, "__iter__"):
        raise TypeError(
            f"lenses must be a list of lenses (None for the logit lens); got {type(lenses).__name__}"
        )
    chosen = [as_lens(lens) for lens in lenses]
    if not chosen:
        raise ValueError("lenses is empty; give at least one lens (None for the logit lens)")
    names = [lens.name for lens in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"lenses has two of the same kind ({names}); compare different kinds, or call twice")
    for lens in chosen:
        lens.check(arch)
    return chosen


def compare_lenses(
    model: Any,
    corpus: Any,
    lenses: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 20_000,
    max_length: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    group: Any = None,
) -> LensComparison:
    """Score every lens in ``lenses`` on the first ``max_tokens`` tokens of ``corpus``.

    ``lenses``: a list of lenses (``None`` or ``"logit"`` for the logit lens, a
    :class:`~reslens.lens.TunedLens`, a :class:`~reslens.lens.LinearShortcut`, ...), each read
    at every ``resid`` layer. ``corpus``: a ``.txt`` file, a folder, a list of files or an iterable
    of strings (hold out what the lenses were trained on), read in windows of ``max_length``
    tokens led by the tokenizer's start tokens (never scored). The corpus is captured once, and
    every batch's residuals feed every lens, so ``K`` lenses cost one forward per batch.
    ``group``: a torch.distributed process group (None = the default group under torchrun, else
    one process; see :mod:`reslens._distributed`): each rank reads every ``world``-th batch and
    every rank returns the merged scores.
    """
    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        chosen = _check_lenses(lenses, arch)
        check_int(batch_size, "batch_size", low=1)
        check_bool(progress, "progress")
        windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
    names = [lens.name for lens in chosen]
    total = -(-len(windows) // batch_size)
    kept = tuple(range(arch.n_layer + 1))
    shard.same((kept, total), "the layers and batch count")
    shard.same_model(arch, chosen)
    scores = _read(arch, batches(tokenizer, windows, batch_size), total, chosen, kept, 1, 384, False,
                   progress, shard)
    stats = [acc.result(kept, QUANTILES, 1, lens.name) for acc, lens in zip(scores, chosen)]
    for s in stats:
        bad = int(s.n_non_finite.sum())
        if bad and shard.primary:
            warnings.warn(f"compare_lenses: {bad} {s.lens_name} cells (layer, position) had non-finite "
                          "logits (NaN or inf) and are left out of its scores", RuntimeWarning, stacklevel=2)
    return LensComparison(
        lenses=tuple(names),
        layers=kept,
        kl_final_layer=torch.stack([s.mean.kl_final_layer for s in stats]),
        cross_entropy=torch.stack([-s.mean.target_logprob for s in stats]),
        top1_agreement=torch.stack([s.top1_agreement for s in stats]),
        n_tokens=stats[0].n_tokens,
    )
