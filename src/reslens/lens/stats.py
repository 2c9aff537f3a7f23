"""Per-layer logit-lens statistics of a data set (Geva et al. 2021, Figs. 9-10), in bounded memory.

:func:`lens_stats` streams batches through the same lens as :func:`reslens.lens.logit_lens` and
keeps only running sums and a uniform sample of positions per metric (for the quantiles). Pad
positions never enter a statistic, nor do special tokens the tokenizer's convention added (a
:class:`~reslens.Batch`'s ``special_mask``, e.g. a Llama-family BOS), nor non-finite lens cells (NaN
or inf in the residual stream): those are counted per layer in :attr:`LensStats.n_non_finite`, with
one warning.

Under a process group (``group=``, see :mod:`reslens._distributed`) rank ``r`` reads the batches whose
number ``i`` has ``i % world == r``; the float64 sums and counts are summed over the ranks, and the
samples merged (see :func:`lens_stats`), so every rank returns the one-process statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from reslens._checks import check_bool, check_int, check_layers
from reslens._distributed import Shard, shard_of
from reslens._corpus import start_ids
from reslens.lens._metrics import VS_FINAL
from reslens._saving import Saveable
from reslens._stream import batches, stream, units, window_size
from reslens._text import html_table, pandas
from reslens.arch import adapter
from reslens.lens._metrics import resolve_targets
from reslens.lens.result import METRICS, LensResult, _check_lens, _lens_of, _lens_rows

__all__ = ["LensStats", "MetricStats", "lens_stats", "QUANTILES"]

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class MetricStats:
    """One statistic of every lens metric, per layer: ``[R]`` (means) or ``[R, Q]`` (quantiles).

    The metrics are :data:`reslens.lens.METRICS` (see :mod:`reslens.lens` for their definitions).
    """

    target_logprob: torch.Tensor
    target_rank: torch.Tensor
    entropy: torch.Tensor
    kl_final_layer: torch.Tensor
    kl_layer_final: torch.Tensor
    js: torch.Tensor
    max_prob: torch.Tensor
    final_top1_prob: torch.Tensor

    def __repr__(self) -> str:
        return f"MetricStats({', '.join(f.name for f in fields(self))}: {tuple(self.entropy.shape)} each)"

    def _repr_html_(self) -> str:
        """One row per lens row; a quantile statistic shows its ``Q`` values in one cell."""
        names = [f.name for f in fields(self)]

        def cell(t: torch.Tensor) -> Any:
            return float(t) if t.ndim == 0 else " ".join(f"{float(v):.3g}" for v in t)

        rows = [(r, *(cell(getattr(self, n)[r]) for n in names)) for r in range(self.entropy.shape[0])]
        return html_table(repr(self), ("row", *names), rows)


@dataclass(frozen=True, repr=False)
class LensStats(Saveable):
    """Per-layer logit-lens statistics of a data set. ``R`` = number of residual layers in ``layers``.

    - ``n_tokens``, ``n_sequences``: real tokens (positions) scored, sequences read (special tokens
      such as a BOS marked in ``Batch.special_mask`` are not scored, like pads)
    - ``mean``: :class:`MetricStats` of ``[R]`` means over every real, finite position (target
      metrics: positions with a target); ``mean.final_top1_prob`` is the mean probability a
      layer gives the final top-1 token
    - ``quantiles``: :class:`MetricStats` of ``[R, len(quantile_levels)]`` quantiles, from a
      uniform sample of at most ``max_samples`` positions (exact when ``exact_quantiles``)
    - ``top1_agreement: [R]``: fraction of positions whose top-1 equals the final top-1
    - ``input_token_top1: [R]``: fraction whose top-1 is the *input* token at that position
    - ``n_non_finite: [R]`` (int64): positions left out of layer ``r``'s statistics because its
      lens logits (or the final layer's) were NaN or inf
    - ``lens_name``: the name of the lens read (``"logit lens"`` unless ``lens_stats(..., lens=...)``
      read another)
    """

    layers: tuple[int, ...]
    n_tokens: int
    n_sequences: int
    mean: MetricStats
    quantiles: MetricStats
    quantile_levels: tuple[float, ...]
    top1_agreement: torch.Tensor
    input_token_top1: torch.Tensor
    exact_quantiles: bool
    n_non_finite: torch.Tensor
    lens_name: str = "logit lens"

    def to_frame(self):
        """``pandas.DataFrame`` with one row per layer and a column per statistic."""
        pd = pandas()
        columns: dict[str, Any] = {"layer": list(self.layers)}
        for name in METRICS:
            columns[f"mean_{name}"] = getattr(self.mean, name).numpy()
        for name in METRICS:
            values = getattr(self.quantiles, name)
            for j, level in enumerate(self.quantile_levels):
                columns[f"q{round(level * 100):02d}_{name}"] = values[:, j].numpy()
        columns["top1_agreement"] = self.top1_agreement.numpy()
        columns["input_token_top1"] = self.input_token_top1.numpy()
        columns["n_non_finite"] = self.n_non_finite.numpy()
        return pd.DataFrame(columns)

    def _rows(self) -> list[tuple[Any, ...]]:
        median = len(self.quantile_levels) // 2
        m = self.mean
        return [(layer, float(self.top1_agreement[r]), float(m.final_top1_prob[r]),
                 float(self.input_token_top1[r]), float(m.kl_final_layer[r]), float(m.entropy[r]),
                 float(m.target_logprob[r]),
                 float(self.quantiles.target_rank[r, median]))
                for r, layer in enumerate(self.layers)]

    def table(self) -> str:
        """A per-layer text table of the headline statistics."""
        head = (f"{'layer':>5} {'top1=final':>10} {'p(final)':>9} {'top1=input':>10} {'KL(f||l)':>9} "
                f"{'entropy':>8} {'logp(next)':>10} {'med rank':>8}")
        lines = [f"{self.lens_name}: {self.n_tokens} tokens in {self.n_sequences} sequences", head,
                 "-" * len(head)]
        for layer, agree, p_final, is_input, kl, entropy, logp, rank in self._rows():
            lines.append(f"{layer:>5} {agree:>10.3f} {p_final:>9.3f} {is_input:>10.3f} {kl:>9.3f} "
                         f"{entropy:>8.3f} {logp:>10.3f} {rank:>8.0f}")
        if int(self.n_non_finite.sum()):
            lines.append(f"(non-finite positions left out, per layer: {self.n_non_finite.tolist()})")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """Per-layer curves: agreement with the final top-1, p(final top-1), KL, entropy (a figure)."""
        from reslens.lens._plot import plot_lens_stats

        return plot_lens_stats(self, ax=ax)

    def _repr_html_(self) -> str:
        header = ("layer", "top1=final", "p(final)", "top1=input", "KL(f||l)", "entropy", "logp(next)",
                  "med rank")
        note = (f"— {self.lens_name} over {self.n_tokens} tokens, one row per layer (0 = the embedding): "
                "how often the layer's top-1 is the model's final top-1 or the input token, the mean p of "
                "the final top-1, KL(final ‖ layer) and entropy in nats, the mean log p and median rank "
                "(0 = top-1) of the actual next token.")
        return html_table(repr(self), header, self._rows(), note=note)

    def __repr__(self) -> str:
        lens = "" if self.lens_name == "logit lens" else f", lens_name={self.lens_name!r}"
        return f"LensStats(layers={self.layers[0]}..{self.layers[-1]}, tokens={self.n_tokens}{lens})"


class _Reservoir:
    """A uniform sample of at most ``size`` columns of ``[R, n]`` value streams."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0):
        self.size, self.seen, self.seed = size, 0, seed
        self.values: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank its own stream

    def add(self, values: torch.Tensor) -> None:  # values: [R, n]
        n = values.shape[1]
        if self.values is None:
            self.values = values[:, : self.size].clone()
            taken = self.values.shape[1]
        else:
            room = self.size - self.values.shape[1]
            taken = min(room, n)
            self.values = torch.cat([self.values, values[:, :taken]], dim=1)
        rest = values[:, taken:]
        if rest.shape[1]:
            t = torch.arange(self.seen + taken, self.seen + n) + 1
            slot = (torch.rand(rest.shape[1], generator=self.gen) * t).long()
            keep = slot < self.size
            self.values[:, slot[keep]] = rest[:, keep]
        self.seen += n

    def merge(self, shard: Shard, n_rows: int) -> None:
        """Make this the sample of every rank's values (the same on every rank; nothing alone).

        At most ``size`` values seen over all ranks: all of them (in rank order; a quantile does not
        depend on the order, so it is the one-process quantile exactly). More: a uniform sample of
        ``size`` of them: how many come from each rank is a multivariate hypergeometric draw (seeded
        with ``seed``, the same on every rank) over the ranks' counts, and each rank gives that many of
        its own uniform sample, chosen uniformly.
        """
        if not shard.parallel:
            return
        values = self.values if self.values is not None else torch.zeros(n_rows, 0)
        seen = [int(n) for n in shard.gather_objects(self.seen)]
        if sum(seen) > self.size:
            counts = np.random.default_rng(self.seed).multivariate_hypergeometric(seen, self.size)
            gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + shard.rank)
            pick = torch.randperm(values.shape[1], generator=gen)[: int(counts[shard.rank])]
            values = values[:, pick.sort().values]
        self.values, self.seen = shard.cat(values.contiguous(), dim=1), sum(seen)

    def quantiles(self, levels: torch.Tensor) -> torch.Tensor:
        """``[R, Q]`` quantiles of the sample; NaN entries (non-finite cells) are left out."""
        values = self.values.float()
        if bool(values.isnan().any()):
            return torch.nanquantile(values, levels, dim=1).T
        return torch.quantile(values, levels, dim=1).T


class _Sums:
    """Running per-layer sums, counts and samples of every metric over real, finite cells."""

    def __init__(self, n_rows: int, max_samples: int, rank: int = 0):
        zeros = lambda: torch.zeros(n_rows, dtype=torch.float64)  # noqa: E731
        self.n_rows = n_rows
        self.sums = {name: zeros() for name in METRICS}
        self.counts = {name: zeros() for name in METRICS}
        self.reservoirs = {name: _Reservoir(max_samples, seed=i, rank=rank) for i, name in enumerate(METRICS)}
        self.agree, self.agree_n, self.is_input, self.is_input_n = zeros(), zeros(), zeros(), zeros()
        self.non_finite = torch.zeros(n_rows, dtype=torch.long)
        self.n_tokens = self.n_sequences = 0

    def add(self, lens: LensResult, stat_mask: torch.Tensor) -> None:
        """Add a lens's cells at ``stat_mask [B, P]`` (real, non-special positions)."""
        mask = stat_mask.cpu()
        has_target = (lens.targets.cpu() >= 0) & mask
        top1_all = lens.top_ids[..., 0].cpu()  # [R, B, P]
        cell_ok = top1_all >= 0  # real positions: False where the cell's logits were not finite
        final_ok = lens.final_top1.cpu() >= 0
        for name in METRICS:
            use = has_target if name.startswith("target_") else mask
            values = getattr(lens, name).cpu()[:, use].double()  # [R, n]
            ok = (cell_ok & final_ok)[:, use] if name in VS_FINAL else cell_ok[:, use]
            if bool(ok.all()):
                self.sums[name] += values.sum(1)
                self.counts[name] += values.shape[1]
            else:
                values = values.masked_fill(~ok, torch.nan)
                self.sums[name] += values.nan_to_num(0.0).sum(1)
                self.counts[name] += ok.sum(1)
            self.reservoirs[name].add(values.float())
        top1, final = top1_all[:, mask], lens.final_top1.cpu()[mask]
        ok, ok_final = cell_ok[:, mask], final_ok[mask]
        self.agree += ((top1 == final) & ok & ok_final).sum(1)
        self.agree_n += (ok & ok_final).sum(1)
        self.is_input += ((top1 == lens.input_ids.cpu()[mask]) & ok).sum(1)
        self.is_input_n += ok.sum(1)
        self.non_finite += (~(ok & ok_final)).sum(1)
        self.n_tokens += int(mask.sum())
        self.n_sequences += mask.shape[0]

    def merge(self, shard: Shard) -> None:
        """Sum the ranks' sums and counts (one float64 all-reduce, exact for counts); merge the samples."""
        if not shard.parallel:
            return
        names = list(METRICS)
        rows = [*(self.sums[n] for n in names), *(self.counts[n] for n in names), self.agree, self.agree_n,
                self.is_input, self.is_input_n, self.non_finite.double()]
        sizes = torch.tensor([self.n_tokens, self.n_sequences], dtype=torch.float64)
        total = shard.sum(torch.cat([*rows, sizes]))
        parts, k = list(total[:-2].split(self.n_rows)), len(names)
        self.sums, self.counts = dict(zip(names, parts[:k])), dict(zip(names, parts[k : 2 * k]))
        self.agree, self.agree_n, self.is_input, self.is_input_n, non_finite = parts[2 * k :]
        self.non_finite = non_finite.round().long()
        self.n_tokens, self.n_sequences = int(total[-2]), int(total[-1])
        for reservoir in self.reservoirs.values():
            reservoir.merge(shard, self.n_rows)

    def _mean(self, name: str) -> torch.Tensor:
        """``[R]`` float32 means; NaN for a layer with no finite cell."""
        counts = self.counts[name]
        return torch.where(counts > 0, self.sums[name] / counts.clamp(min=1), torch.nan).float()

    def result(self, kept: tuple[int, ...], quantiles: tuple[float, ...], max_samples: int,
               lens: str) -> LensStats:
        if self.n_tokens == 0:
            raise ValueError("data is empty: no position was scored")
        if self.reservoirs["target_logprob"].seen == 0:
            raise ValueError(f"data holds {self.n_sequences} sequences of 1 real token each: no position "
                             "has a next token to score; expected sequences of at least 2 tokens")
        levels = torch.tensor(quantiles, dtype=torch.float32)
        return LensStats(
            layers=kept,
            n_tokens=self.n_tokens,
            n_sequences=self.n_sequences,
            mean=MetricStats(**{name: self._mean(name) for name in METRICS}),
            quantiles=MetricStats(**{name: self.reservoirs[name].quantiles(levels) for name in METRICS}),
            quantile_levels=tuple(quantiles),
            top1_agreement=(self.agree / self.agree_n).float(),
            input_token_top1=(self.is_input / self.is_input_n).float(),
            exact_quantiles=all(r.seen <= max_samples for r in self.reservoirs.values()),
            n_non_finite=self.non_finite,
            lens_name=lens,
        )


def _check_quantiles(quantiles: Any) -> tuple[float, ...]:
    levels = tuple(quantiles) if isinstance(quantiles, (tuple, list)) else None
    def level(q: Any) -> bool:
        return isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < 1

    if not levels or not all(level(q) for q in levels):
        raise ValueError(f"quantiles must be levels strictly between 0 and 1; got {quantiles!r}")
    return tuple(float(q) for q in levels)


def _input_batches(data: Any, tokenizer: Any, arch: Any, max_length: int, batch_size: int):
    """``(batches, number of them or None)`` of ``data``: texts cut into windows, or its own batches."""
    texts = [data] if isinstance(data, str) else data
    if isinstance(data, (bytes, Mapping, torch.Tensor)) or not isinstance(data, Iterable):
        raise TypeError("data must be a text, a list of texts, or an iterable of Batch / [batch, pos] id "
                        f"tensors; got {type(data).__name__}")
    if not isinstance(data, (str, list, tuple)) or not all(isinstance(t, str) for t in texts):
        return data, (len(data) if hasattr(data, "__len__") else None)
    if not texts:
        raise TypeError("data must be a string, a list of strings, or an iterable of Batch / id tensors")
    if tokenizer is None:
        raise TypeError("text data needs tokenizer= (e.g. from reslens.load_model())")
    size = window_size(arch, start_ids(tokenizer), max_length)
    windows = list(units(tokenizer, list(texts), max_length=size, name="data"))
    if not windows:
        raise ValueError("data holds no text of at least 2 tokens")
    return batches(tokenizer, windows, batch_size), -(-len(windows) // batch_size)


def _read(arch: Any, data: Any, total: int | None, lenses: list[Any], kept: tuple[int, ...], make: Any,
          chunk_size: int, fused: bool, progress: bool, shard: Shard, desc: str = "lens stats") -> list[Any]:
    """Every lens's running sums over this rank's batches of ``data`` (merged), each batch captured once.

    ``make()`` makes one lens's empty sums (:class:`_Sums` here; the lens bench's ``BenchSums``).
    """
    from tqdm.auto import tqdm

    sums = [make() for _ in lenses]
    mine = None if total is None else len(range(shard.rank, total, shard.world))
    rows = _lens_rows(kept, ("resid",), arch.n_layer)  # the options were checked once, by the caller
    read = stream(arch, data, sites=("resid",), layers=sorted({*kept, arch.n_layer}), shard=shard)
    with shard.together():  # a batch that fails on one rank stops every rank at the merge
        for _, _, res in tqdm(read, total=mine, desc=desc, unit="batch",
                              disable=not progress or not shard.primary):
            mask = res.attention_mask.to(arch.device)
            target_ids = resolve_targets("next", res.input_ids.to(arch.device), mask, arch.d_vocab)
            for lens, acc in zip(lenses, sums):
                acc.add(_lens_of(res, arch, rows=rows, lens=lens, target_ids=target_ids, top_k=1,
                                 chunk_size=chunk_size, fused=fused, tokenizer=None, warn=False),
                        res.stat_mask)
    for acc in sums:
        acc.merge(shard)
    return sums


def lens_stats(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    layers: Any = None,
    max_length: int = 128,
    batch_size: int = 8,
    quantiles: tuple[float, ...] = QUANTILES,
    max_samples: int = 100_000,
    chunk_size: int = 384,
    fused: bool = False,
    progress: bool = True,
    lens: Any = None,
    group: Any = None,
) -> LensStats:
    """Stream ``data`` through the logit lens and return per-layer statistics.

    ``data``: a text, a list of texts, or an iterable of :class:`~reslens.Batch` / ``[batch, pos]``
    id tensors. Texts are read as their tokenizer gives them to the model: cut into windows of
    ``max_length`` tokens, each led by the start tokens the tokenizer adds (a BOS for Llama-style
    tokenizers, none for GPT-2 or SmolLM2), which count in the model's context and are never
    scored (see :mod:`reslens._stream`). Memory stays bounded: only running sums and a sample of
    ``max_samples`` positions per metric are kept. Pads and special tokens (``Batch.special_mask``,
    e.g. a BOS) are never scored. Each batch is checked once, when it is captured. Shows
    a tqdm progress bar unless ``progress=False``. ``fused=True`` compiles the per-row reduction
    (see :func:`~reslens.lens.logit_lens`), which pays off over a data set. ``lens``: None (the
    logit lens) or a learned lens from :mod:`reslens.lens`.
    Non-finite lens cells are left out of every statistic, with one warning at the end.

    ``group``: a torch.distributed process group; None = the default group under torchrun, else
    one process; see :mod:`reslens._distributed`. Rank ``r`` reads the batches numbered ``i``
    with ``i % world == r`` (batches of windows, or ``data``'s own batches) and every rank returns
    the merged statistics: counts and agreements exactly the one-process ones, means equal up to
    the order of float64 additions, and quantiles exactly the one-process ones while at most
    ``max_samples`` positions are seen in all. Beyond that the merged sample is a uniform sample
    of ``max_samples`` positions of all ranks (each rank contributes in proportion to what it saw,
    by a seeded hypergeometric draw), but not the one-process sample: as there, a quantile read
    from a uniform sample of ``m`` values is off by about ``sqrt(q (1 - q) / m) <= 1 / (2 sqrt(m))``
    in rank (0.0016 for the default 100,000).
    """
    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        kept = check_layers(layers, arch.n_layer, what=f"a {arch.n_layer}-layer model's residual stream")
        quantiles = _check_quantiles(quantiles)
        for name, value in (("max_length", max_length), ("batch_size", batch_size),
                            ("max_samples", max_samples), ("chunk_size", chunk_size)):
            check_int(value, name, low=1)
        check_bool(fused, "fused")
        check_bool(progress, "progress")
        lens = _check_lens(lens, arch, ("resid",))
        data, total = _input_batches(data, tokenizer, arch, max_length, batch_size)
    shard.same((kept, quantiles, max_samples, total), "the layers, quantiles, max_samples and batch count")
    shard.same_model(arch, [lens])
    (sums,) = _read(arch, data, total, [lens], kept, lambda: _Sums(len(kept), max_samples, shard.rank),
                    chunk_size, fused, progress, shard)
    stats = sums.result(kept, quantiles, max_samples, lens.name)
    if int(stats.n_non_finite.sum()) and shard.primary:
        warnings.warn(f"lens_stats: {int(stats.n_non_finite.sum())} lens cells (layer, position) had "
                      "non-finite logits (NaN or inf) and are left out of the statistics; per layer: "
                      f"{stats.n_non_finite.tolist()}", RuntimeWarning, stacklevel=2)
    return stats
