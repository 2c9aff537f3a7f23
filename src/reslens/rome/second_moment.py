"""ROME's key statistics: :class:`SecondMoment`, ``C = E[k k^T]`` of one layer's MLP keys over a corpus.

ROME's ``layer_stats(..., "mom2")``, as an object the caller computes once, saves, loads and
passes to :func:`reslens.rome.rank_one_edit`. No statistics are cached in memory; with
``cache_dir`` they are kept on disk under a key of the weights' content (hashed once per
weights version), the layer, the corpus and the limits.

Under a process group (``group=``, see :mod:`reslens._distributed`) rank ``r`` reads the batches
numbered ``i`` with ``i % world == r``; the float64 sums of ``k k^T`` and the token counts are
summed over the ranks, so every rank holds the one-process matrix (up to the order of float64
additions), and only rank 0 writes the cache file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_block, check_finite, check_int
from reslens._corpus import corpus_files, corpus_texts, start_ids
from reslens._distributed import Shard, shard_of
from reslens._saving import Saveable
from reslens._stream import batches, limit, stream, units, window_size
from reslens._text import html_table
from reslens.arch import Arch, adapter

__all__ = ["SecondMoment", "mlp_key_second_moment"]

logger = logging.getLogger(__name__)

# --- the key statistics ---------------------------------------------------------------------


class WeightsKey:
    """In-process identity of the weights that shape a layer's keys, cheap to build and compare.

    The tensors of ``arch.key_parameters(layer)`` held weakly (so a freed model whose memory is
    reused never matches), with each one's version counter (bumped by every in-place change) and shape.
    """

    __slots__ = ("refs", "versions")

    def __init__(self, arch: Arch, layer: int) -> None:
        params = arch.key_parameters(layer)
        self.refs = tuple(weakref.ref(p) for p in params)
        self.versions = tuple((p._version, tuple(p.shape)) for p in params)

    def same(self, arch: Arch, layer: int) -> bool:
        """Whether ``arch``'s key parameters of ``layer`` are these tensors, unchanged since."""
        params = arch.key_parameters(layer)
        return (len(params) == len(self.refs) and all(r() is p for r, p in zip(self.refs, params))
                and self.versions == tuple((p._version, tuple(p.shape)) for p in params))

    def __repr__(self) -> str:
        return f"WeightsKey({len(self.refs)} tensors)"


#: ``(id of each key parameter, layer) -> (WeightsKey, content hash)``: the last few hashes (strings,
#: never tensors), each valid only while its WeightsKey is the same.
_HASHES: dict[tuple, tuple[WeightsKey, str]] = {}
_MAX_HASHES = 16


def _weights_hash(arch: Arch, layer: int) -> str:
    """SHA-1 of the family, sizes, layer and every weight of ``arch.key_parameters(layer)`` (stored dtype).

    Computed once per weights version: a later call with the same, unchanged tensors reuses it.
    """
    slot = (tuple(id(p) for p in arch.key_parameters(layer)), layer)
    found = _HASHES.get(slot)
    if found is not None and found[0].same(arch, layer):
        return found[1]
    h = hashlib.sha1(f"{arch.family}/{arch.n_layer}/{arch.d_model}/{arch.d_mlp}/{layer}".encode())
    for p in arch.key_parameters(layer):
        h.update(p.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    _HASHES.pop(slot, None)
    while len(_HASHES) >= _MAX_HASHES:
        _HASHES.pop(next(iter(_HASHES)))
    _HASHES[slot] = (WeightsKey(arch, layer), h.hexdigest())
    return h.hexdigest()


def _corpus_key(corpus: Any) -> tuple[Any, torch.Tensor | None, str]:
    """``(texts or None, ids or None, identity)`` of a statistics corpus.

    A file / folder of ``.txt`` files (identity: paths, sizes, mtimes), an iterable of strings
    (their hash), or ids ``[n, pos]`` (their hash).
    """
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2 or corpus.dtype.is_floating_point or corpus.dtype == torch.bool:
            raise ValueError(f"stats_corpus as a tensor must be integer ids [n, pos]; "
                             f"got {tuple(corpus.shape)} {corpus.dtype}")
        return None, corpus.long(), "ids:" + hashlib.sha1(corpus.long().cpu().numpy().tobytes()).hexdigest()
    if isinstance(corpus, (str, os.PathLike)):
        files = corpus_files(corpus, name="stats_corpus")
        key = "files:" + "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return corpus_texts(corpus, name="stats_corpus")[0], None, key
    texts = list(corpus_texts(corpus, name="stats_corpus")[0])
    if not texts:
        raise ValueError("stats_corpus is empty; give at least one string")
    return texts, None, "texts:" + hashlib.sha1("\x00".join(texts).encode()).hexdigest()


def _windows(texts: Any, ids: torch.Tensor | None, tokenizer: Any, max_tokens: int,
             size: int) -> list[list[int]]:
    """Windows of at most ``size`` tokens, ``max_tokens`` in all (texts read only as far as needed).

    Texts are cut by :func:`reslens._stream.units`; id rows are cut to ``size`` and taken whole
    (the last one cut to what is left) until ``max_tokens``.
    """
    if ids is not None:
        return list(limit((row[:size] for row in ids.tolist()), max_tokens, min_length=1))
    windows = list(units(tokenizer, texts, max_length=size, max_tokens=max_tokens,
                         name="stats_corpus"))
    if not windows:
        raise ValueError("stats_corpus tokenizes to no window of at least 2 tokens")
    return windows


@dataclass(frozen=True, eq=False, repr=False)
class SecondMoment(Saveable):
    """ROME's key statistics of one layer: ``C = E[k k^T]`` of its MLP keys (``mlp_act``) over a corpus.

    Compute once with :meth:`compute`, keep with :meth:`save` / :meth:`load`, and pass to
    :func:`rank_one_edit` as ``second_moment=``. A non-finite matrix is refused.
    """

    mom2: torch.Tensor     # [d_mlp, d_mlp] float32: the uncentred second moment of the keys
    n_tokens: int          # the tokens averaged
    layer: int             # the block whose MLP keys these are
    weights: str = ""      # SHA-1 of arch.key_parameters(layer), computed once by compute() ("" = unknown)
    corpus: str = ""       # SHA-1 of the corpus identity and the limits used ("" = unknown)
    #: in-process identity of the weights at compute time (the tensors, weakly, and their versions); not saved
    key: WeightsKey | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        mom2 = self.mom2
        if not isinstance(mom2, torch.Tensor) or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
            got = tuple(self.mom2.shape) if isinstance(self.mom2, torch.Tensor) else type(self.mom2).__name__
            raise ValueError(f"mom2 must be a square [d_mlp, d_mlp] tensor; got {got}")
        if not self.mom2.dtype.is_floating_point:
            raise TypeError(f"mom2 must be a floating tensor; got {self.mom2.dtype}")
        check_finite(self.mom2, "the second moment mom2")
        check_int(self.n_tokens, "n_tokens", low=1)
        check_int(self.layer, "layer", low=0)

    @property
    def d_mlp(self) -> int:
        """The key width."""
        return self.mom2.shape[0]

    @classmethod
    def compute(cls, model: Any, layer: int, corpus: Any, *, tokenizer: Any = None,
                max_tokens: int = 100_000, max_length: int | None = None, batch_size: int = 16,
                cache_dir: str | os.PathLike | None = None, progress: bool = False,
                group: Any = None) -> SecondMoment:
        """``E[k k^T]`` of block ``layer``'s MLP keys over the tokens of ``corpus`` (ROME's ``layer_stats``).

        ``corpus``: a text file, a folder of ``.txt`` files, an iterable of strings (these need
        ``tokenizer``), or token ids ``[n, pos]``. Texts are cut into windows of ``max_length``
        tokens (default: the model's context) that never cross from one text into the next, each
        led by the start tokens the tokenizer adds (a BOS for Llama-style tokenizers; none for
        GPT-2 or SmolLM2), which count in the context and never in the statistics (see
        :mod:`reslens._stream`); at most ``max_tokens`` tokens are used, and files are read only
        as far as that needs.
        With ``cache_dir`` the statistics are kept there as ``mom2-<key>.safetensors`` (key: the
        weights' content hash, the layer, the corpus and the limits) and read back by later
        calls; an unreadable or inconsistent file there is rebuilt.

        ``group``: a torch.distributed process group; None = the default group under torchrun,
        else one process; see :mod:`reslens._distributed`. Each rank reads every ``world``-th
        batch of ``batch_size`` windows; every rank returns the merged statistics, which rank 0
        alone writes to ``cache_dir`` (the others wait for it).
        """
        shard = shard_of(group)
        with shard.together():  # an argument refused on one rank is refused on every rank
            arch = adapter(model)
            layer = check_block(layer, arch.n_layer)
            max_tokens = check_int(max_tokens, "max_tokens", low=1)
            if max_length is not None:
                max_length = min(check_int(max_length, "max_length", low=1), arch.n_ctx)
            max_length = arch.n_ctx if max_length is None else max_length
            batch_size = check_int(batch_size, "batch_size", low=1)
            texts, ids, corpus_id = _corpus_key(corpus)
            if texts is not None and tokenizer is None:
                raise TypeError("stats_corpus holds text, so tokenizer= is required (e.g. from "
                                "reslens.load_model())")
            start = () if texts is None else start_ids(tokenizer)
            size = window_size(arch, start, max_length)
            weights = _weights_hash(arch, layer)
            read = f"{corpus_id}|{max_tokens}|{size}" + (f"|start={list(start)}" if start else "")
            corpus_hash = hashlib.sha1(read.encode()).hexdigest()
            file = None if cache_dir is None else Path(cache_dir).expanduser() / (
                "mom2-" + hashlib.sha1(f"{weights}|{layer}|{corpus_hash}".encode()).hexdigest()[:20]
                + ".safetensors")
            cached = None if file is None else _read_cached(file, arch, layer, weights, corpus_hash)
        if file is not None:
            shard.same(cached is not None, f"whether {os.fspath(file)!r} holds these statistics")
            if cached is not None:
                object.__setattr__(cached, "key", WeightsKey(arch, layer))
                return cached
        with shard.together():
            windows = _windows(texts, ids, tokenizer, max_tokens, size)
        shard.same((weights, corpus_hash, batch_size, len(windows)), "the weights, corpus and batch size")
        mine = len(range(shard.rank, -(-len(windows) // batch_size), shard.world))
        read = batches(tokenizer if texts is not None else None, windows, batch_size)
        mom2, count = _accumulate(arch, layer, read, mine, progress, shard)
        if not bool(torch.isfinite(mom2).all()):
            raise ValueError(f"the keys of layer {layer} over this corpus have a non-finite second moment "
                             "(NaN or inf: an overflow in the model's dtype?); compute it with the model in "
                             "float32")
        stats = cls(mom2=mom2, n_tokens=count, layer=layer, weights=weights, corpus=corpus_hash)
        object.__setattr__(stats, "key", WeightsKey(arch, layer))
        if file is not None:
            if shard.primary:
                stats.save(file)
            shard.barrier()
        return stats

    def matches(self, model: Any) -> bool:
        """Whether the weights that shape this layer's keys are the ones these statistics come from."""
        arch = adapter(model)
        if self.key is not None and self.key.same(arch, self.layer):
            return True
        return bool(self.weights) and self.weights == _weights_hash(arch, self.layer)

    def __repr__(self) -> str:
        return (f"SecondMoment(layer={self.layer}, d_mlp={self.d_mlp}, n_tokens={self.n_tokens}, "
                f"weights={self.weights[:12] or '?'})")

    def _repr_html_(self) -> str:
        diag = self.mom2.diagonal()
        rows = [("layer", self.layer), ("d_mlp", self.d_mlp), ("tokens", self.n_tokens),
                ("mean diagonal", float(diag.mean())), ("weights", self.weights[:12] or "?")]
        return html_table("SecondMoment E[k kᵀ]", ("", "value"), rows)


def _read_cached(file: Path, arch: Arch, layer: int, weights: str, corpus: str) -> SecondMoment | None:
    """The statistics cached in ``file`` if it holds these; ``None`` (logged) if it is missing or bad."""
    if not file.is_file():
        return None
    try:
        stats = SecondMoment.load(file)
    except (ValueError, TypeError) as error:
        logger.warning("rebuilding the cached key statistics %s: %s", file, error)
        return None
    if (stats.layer, stats.weights, stats.corpus, stats.d_mlp) != (layer, weights, corpus, arch.d_mlp):
        logger.warning("rebuilding the cached key statistics %s: it holds other statistics", file)
        return None
    return stats


def _accumulate(arch: Arch, layer: int, batches: Any, mine: int, progress: bool,
                shard: Shard) -> tuple[torch.Tensor, int]:
    """``(sum k k^T / n, n)`` over the real, non-special tokens of ``batches`` (float64 sums; float32 CPU).

    This rank reads its share (``mine``) of the batches; the sums and counts are summed over the ranks.
    """
    from tqdm.auto import tqdm

    total = torch.zeros(arch.d_mlp, arch.d_mlp, dtype=torch.float64, device=arch.device)
    count = 0
    read = stream(arch, batches, sites="mlp_act", layers=layer, shard=shard)
    with shard.together():  # a batch that fails on one rank stops every rank at the merge
        for _, _, res in tqdm(read, total=mine, desc=f"MLP key second moment (layer {layer})", unit="batch",
                              disable=not progress or not shard.primary):
            k = res.mlp_act[0]  # [b, pos, d_mlp]
            k = k[res.stat_mask.to(k.device)].double()  # [tokens, d_mlp]
            total += k.T @ k
            count += k.shape[0]
    if shard.parallel:
        total = shard.sum(total)
        count = int(shard.sum(torch.tensor([count], dtype=torch.float64)).item())
    return (total / count).float().cpu(), count


def mlp_key_second_moment(model: Any, layer: int, corpus: Any, *, tokenizer: Any = None,
                          max_tokens: int = 100_000, max_length: int | None = None, batch_size: int = 16,
                          cache_dir: str | os.PathLike | None = None, progress: bool = False,
                          group: Any = None) -> torch.Tensor:
    """``C = E[k k^T]`` ``[d_mlp, d_mlp]`` (float32, model's device): ``SecondMoment.compute(...).mom2``.

    A fresh tensor on every call; prefer :class:`SecondMoment`, which also says which layer,
    weights and corpus the matrix comes from. ``group``: a torch.distributed process group;
    None = the default group under torchrun, else one process; see :mod:`reslens._distributed`.
    """
    stats = SecondMoment.compute(model, layer, corpus, tokenizer=tokenizer, max_tokens=max_tokens,
                                 max_length=max_length, batch_size=batch_size, cache_dir=cache_dir,
                                 progress=progress, group=group)
    return stats.mom2.to(adapter(model).device, copy=True)
