"""Trigger mining: stream a corpus once and keep, for every (layer, key), its top-k examples.

The running state is bounded (``[layers, d_mlp, top_k]`` plus the token ids of the examples in
some top-k list). A run can save snapshots and be resumed: each snapshot is one file written
atomically, carrying a fingerprint of the corpus read so far and of the weights that shape the
keys, and a resume refuses another corpus, other reading options or another model.

Signs. A GELU coefficient (GPT-2) is never below about -0.17, so a key's strong uses are its
positive ones, and an example scores by its largest coefficient, as in Geva et al. A gated
coefficient ``act(g·x̂)(u·x̂)`` is linear in the up key's reading, so it is as often large and
negative (writing ``-v``) as positive. Gated MLPs are therefore mined *signed*: an example scores
by its coefficient of largest ``|m|``, ranked by ``|m|``, with the sign kept. One list ranked by
``|m|`` rather than a top-k of each sign: it keeps a key's strongest writes whichever side they
are on, in the same ``[layers, d_mlp, top_k]`` memory, without ranking a key's weak side next to
its strong one; each trigger's sign says which side of the value it wrote (the agreement reads
the value's bottom token for a negative one), and one sign alone is a filter of that list.

Data parallel (``group=``, see :mod:`reslens._distributed`). Every rank reads the whole token
stream (tokenising is cheap next to the forward passes; it keeps the examples' numbers, the
groups and the corpus fingerprint the same everywhere) and runs the batches ``b`` of the run with
``b % world == rank``, each padded exactly as one process pads it. The merge is exact: a key's
one-process top-k is the top-k, by the same order (rank descending, then the earlier example),
of the union of the ranks' top-k lists, since every member of it is in its own rank's list. Merges
happen only at a snapshot and at the end, one layer at a time (memory ``world x d_mlp x top_k``).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_int, check_layers, check_tokenizer
from reslens._corpus import UNITS, corpus_texts, start_ids
from reslens._distributed import Shard, shard_of
from reslens._inputs import pad_token_id
from reslens._stream import ONE, batch_of, chunks, stream
from reslens._stream import units as stream_units
from reslens.arch import Arch, adapter
from reslens.kv_memory.triggers import TriggerIndex

__all__ = ["mine_triggers", "model_fingerprint"]


def _order_key(scores: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """An int64 that orders by float32 ``scores`` descending, then ``example`` ascending.

    The float's bits, with the magnitude bits of negatives flipped, order like the floats
    (``-inf`` included); they fill the high 32 bits, ``2^31 - 1 - example`` the low ones.
    """
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.long() << 32) | (2**31 - 1 - example)


class _Miner:
    """Running top-k state of :func:`mine_triggers`; memory bounded by layers x d_mlp x top_k.

    ``signed=False`` ranks an example by its largest coefficient; ``signed=True`` by the
    largest ``|m|``, keeping the coefficient's sign in ``scores``.
    """

    def __init__(self, n_layers: int, d_mlp: int, top_k: int, start: TriggerIndex | None, signed: bool):
        self.signed = signed
        if start is None:
            self.scores = torch.full((n_layers, d_mlp, top_k), float("-inf"))
            self.example = torch.full((n_layers, d_mlp, top_k), -1, dtype=torch.long)
            self.position = torch.full((n_layers, d_mlp, top_k), -1, dtype=torch.long)
            self.stored: dict[int, list[int]] = {}
        else:
            self.scores, self.example = start.scores.clone(), start.example.clone()
            self.position = start.position.clone()
            self.stored = {int(e): start.tokens(int(e)) for e in start.example_ids.tolist()}

    def _rank(self, scores: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        """What the slots are ordered by: the score, or (signed) ``|score|`` with ``-inf`` for empty slots."""
        if not self.signed:
            return scores
        return torch.where(example >= 0, scores.abs(), float("-inf"))

    def _best(self, act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[L, d_mlp, B]`` float32: each example's score; pads become ``-inf`` in ``act`` (in place).

        Unsigned: the largest coefficient. Signed: the coefficient of largest magnitude (the
        positive one when a positive and a negative one have the same magnitude).
        """
        penalty = torch.zeros(mask.shape, dtype=act.dtype, device=act.device)
        penalty.masked_fill_(~mask, float("-inf"))
        penalty = penalty[None, :, :, None]
        # -min over the real positions (pads -inf); before act itself is changed
        low = torch.neg(act).add_(penalty).amax(dim=2) if self.signed else None
        act.add_(penalty)  # pads -> -inf (an add: far cheaper than a broadcast masked_fill)
        best = act.amax(dim=2)
        if low is not None:
            best = torch.where(best >= low, best, -low)
        return best.float().transpose(1, 2).cpu()  # [L, d_mlp, B]; positions for winners only

    def add(self, units: list[list[int]], numbered: torch.Tensor, act: torch.Tensor,
            mask: torch.Tensor) -> None:
        """Merge one batch: ``act: [L, B, P, d_mlp]`` (overwritten), ``mask: [B, P]``, ``numbered: [B]``.

        Order: rank descending, ties to the earlier example, so batching never changes the result.
        Only keys where some new example beats the current k-th rank are re-sorted.
        """
        best = self._best(act, mask)
        rank_new, rank_old = (best.abs(), self._rank(self.scores, self.example)) if self.signed else (
            best, self.scores)
        kth, kth_example = rank_old[..., -1:], self.example[..., -1:]  # [L, d_mlp, 1]
        beats = (rank_new > kth) | ((rank_new == kth) & (numbered < kth_example))
        layer, key = beats.any(-1).nonzero(as_tuple=True)  # the keys whose top-k changes
        if not len(layer):
            return
        top_k, batch = self.scores.shape[-1], best.shape[-1]
        scores = torch.cat([self.scores[layer, key], best[layer, key]], dim=-1)  # [R, top_k + B]
        rank = torch.cat([rank_old[layer, key], rank_new[layer, key]], dim=-1) if self.signed else scores
        example = torch.cat([self.example[layer, key], numbered.expand(len(layer), batch)], dim=-1)
        keep = _order_key(rank, example).topk(top_k, dim=-1).indices  # one top-k instead of two sorts
        position = self.position[layer, key].gather(-1, keep.clamp(max=top_k - 1))  # [R, top_k]
        row, slot = (keep >= top_k).nonzero(as_tuple=True)  # slots filled from this batch
        at = act.device
        seen = act[layer[row].to(at), (keep[row, slot] - top_k).to(at), :, key[row].to(at)]  # [n, P]
        if self.signed:  # the first position holding the winning coefficient
            target = scores[row, keep[row, slot]].to(at)
            where = (seen.float() == target[:, None]).int().argmax(-1)
        else:
            where = seen.argmax(-1)  # the first position of the maximum, as max(dim) gives
        position[row, slot] = where.cpu()
        self.scores[layer, key] = scores.gather(-1, keep)
        self.example[layer, key] = example.gather(-1, keep)
        self.position[layer, key] = position
        row_of = {int(e): r for r, e in enumerate(numbered.tolist())}
        for e in self.example[layer, key][keep >= top_k].unique().tolist():
            self.stored[e] = units[row_of[e]]

    @classmethod
    def merged(cls, miner: _Miner, shard: Shard) -> _Miner:
        """The state one process would hold, from every rank's ``miner`` (collective; ``miner`` alone)."""
        if not shard.parallel:
            return miner
        top_k = miner.scores.shape[-1]
        out = cls.__new__(cls)
        out.signed = miner.signed
        out.scores, out.example = torch.empty_like(miner.scores), torch.empty_like(miner.example)
        out.position = torch.empty_like(miner.position)
        for layer in range(miner.scores.shape[0]):  # one layer at a time: world x d_mlp x top_k in memory
            scores, example, position = (shard.cat(t[layer], dim=-1)
                                         for t in (miner.scores, miner.example, miner.position))
            keep = _order_key(miner._rank(scores, example), example).topk(top_k, dim=-1).indices
            out.scores[layer], out.example[layer] = scores.gather(-1, keep), example.gather(-1, keep)
            out.position[layer] = position.gather(-1, keep)
        # the token ids of the examples kept: each is stored by the one rank that read it
        kept = set(out.example[out.example >= 0].unique().tolist())
        mine = [e for e in sorted(miner.stored) if e in kept]
        ids = shard.cat(torch.tensor(mine, dtype=torch.long))
        lengths = shard.cat(torch.tensor([len(miner.stored[e]) for e in mine], dtype=torch.long))
        tokens = shard.cat(torch.tensor([t for e in mine for t in miner.stored[e]], dtype=torch.long))
        out.stored = {e: part.tolist() for e, part in zip(ids.tolist(), tokens.split(lengths.tolist()))}
        return out

    def prune(self) -> None:
        referenced = set(self.example[self.example >= 0].unique().tolist())
        self.stored = {e: ids for e, ids in self.stored.items() if e in referenced}

    def index(self, **meta: Any) -> TriggerIndex:
        self.prune()
        order = sorted(self.stored)
        lengths = torch.tensor([0] + [len(self.stored[e]) for e in order], dtype=torch.long)
        tokens = [t for e in order for t in self.stored[e]]
        return TriggerIndex(
            scores=self.scores, example=self.example, position=self.position,
            example_ids=torch.tensor(order, dtype=torch.long), example_offsets=lengths.cumsum(0),
            example_tokens=torch.tensor(tokens, dtype=torch.long), **meta,
        )


# --- fingerprints ---------------------------------------------------------------------------------


def model_fingerprint(model: Any, layers: Iterable[int]) -> str:
    """SHA-256 (hex) of every weight that shapes the keys' coefficients at ``layers``.

    Those are :meth:`reslens.arch.Arch.key_parameters` of the last layer, hashed with their
    shapes and dtypes. Two models of the same shape give different fingerprints unless those weights are equal
    bit for bit. :meth:`~reslens.arch.Arch.weights_digest`, cached per weights version.
    """
    return adapter(model).weights_digest(max(layers))


def _hash_unit(digest: Any, ids: list[int]) -> None:
    digest.update(len(ids).to_bytes(8, "little"))
    digest.update(array("q", ids).tobytes())


def _skip_read(units: Iterator[list[int]], index: TriggerIndex, digest: Any) -> None:
    """Read again the ``n_examples`` units ``index`` has read, hashing them into ``digest``.

    Refuses to go on when they are not the units it read (another corpus, tokenizer or cut).
    """
    n, tokens = 0, 0
    for ids in units if index.n_examples else ():
        _hash_unit(digest, ids)
        n, tokens = n + 1, tokens + len(ids)
        if n == index.n_examples:
            break  # before pulling one more unit from the stream: it belongs to the new part
    if n < index.n_examples:
        raise ValueError(f"cannot resume: this corpus holds {n} {index.unit}s, but the index has read "
                         f"{index.n_examples} (of {index.corpus or 'its corpus'}); it is another corpus")
    if digest.hexdigest() != index.corpus_fingerprint or tokens != index.n_tokens:
        raise ValueError(
            f"cannot resume: the first {index.n_examples} {index.unit}s of this corpus are not the ones the "
            f"index read from {index.corpus or 'its corpus'} (corpus fingerprint {digest.hexdigest()[:12]}, "
            f"{tokens} tokens; the index has {index.corpus_fingerprint[:12]}, {index.n_tokens} tokens); "
            "resume with the same corpus, tokenizer, unit and window"
        )


def _unit_groups(units: Iterable[list[int]], *, n_tokens: int, max_tokens: int | None, size: int,
                 digest: Any) -> Iterator[list[list[int]]]:
    """Lists of up to ``size`` units in corpus order, until the corpus ends or ``max_tokens``.

    Stops before the unit that would take the total (``n_tokens`` so far) past ``max_tokens``:
    units are never cut, so a resumed run starts at a unit boundary. A unit is hashed into
    ``digest`` when it enters a group, so between groups the digest covers exactly the units
    handed out.
    """
    if max_tokens is not None and n_tokens >= max_tokens:
        return
    group: list[list[int]] = []
    for ids in units:
        if max_tokens is not None and n_tokens + len(ids) > max_tokens:
            break
        _hash_unit(digest, ids)
        group.append(ids)
        n_tokens += len(ids)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# --- checks ---------------------------------------------------------------------------------------


def _check_options(arch: Arch, tokenizer: Any, layers: Any, top_k: Any, unit: Any, window: Any,
                   batch_size: Any, max_tokens: Any, save_every: Any, progress: Any,
                   signed: Any, out: Any) -> tuple[tuple[int, ...], int, bool, tuple[int, ...]]:
    """``(blocks, window, signed, start ids)`` after checking every mining option (and ``out``)."""
    if out is not None:
        _check_out(out)
    blocks = check_layers(layers, arch.n_layer - 1, what=f"a {arch.n_layer}-layer model's blocks")
    check_int(top_k, "top_k", low=1)
    check_int(batch_size, "batch_size", low=1)
    check_int(save_every, "save_every", low=1)
    check_choice(unit, UNITS, "unit")
    check_tokenizer(tokenizer, why="mining reads text")
    start = start_ids(tokenizer)
    room = arch.n_ctx - len(start)  # the tokenizer's start tokens go before every unit
    window = min(room, 128) if window is None else check_int(window, "window", low=2, high=room)
    if max_tokens is not None:
        check_int(max_tokens, "max_tokens", low=1)
    check_bool(progress, "progress")
    signed = arch.gated_mlp if signed is None else check_bool(signed, "signed (True, False or None)")
    return blocks, window, signed, start


def _check_out(out: Any) -> None:
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"out must be a file path for the index (e.g. 'index.safetensors'); got {out!r}")
    if Path(os.fspath(out)).is_dir():
        raise ValueError(f"out={os.fspath(out)!r} is a folder; give the index's file name (e.g. "
                         f"{os.path.join(os.fspath(out), 'index.safetensors')!r})")


def _check_resume(index: TriggerIndex, options: tuple[Any, ...], arch: Arch, fingerprint: str) -> None:
    """Refuse to resume ``index`` with other ``(layers, top_k, unit, window, signed, start_ids)`` or model."""
    theirs = (tuple(index.layers), index.top_k, index.unit, index.window, index.signed,
              tuple(index.start_ids))
    if theirs != options:
        raise ValueError(
            f"cannot resume: the index was mined with layers, top_k, unit, window, signed, start_ids = "
            f"{theirs}; this call asks for {options}"
        )
    names = ("n_layer", "d_model", "d_mlp", "d_vocab")
    sizes = {name: getattr(arch, name) for name in names}
    mined = {name: getattr(index, name) for name in names}
    if mined != sizes:
        raise ValueError(f"cannot resume: the index comes from a model with {mined}; this model has {sizes}")
    if not index.model_fingerprint or not index.corpus_fingerprint:
        raise ValueError("cannot resume: the index records no model or corpus fingerprint, so it cannot be "
                         "checked")
    if index.model_fingerprint != fingerprint:
        raise ValueError(
            f"cannot resume: the index was mined on a model with other weights "
            f"({index.model_name or 'unnamed'}, fingerprint {index.model_fingerprint[:12]}; this model's is "
            f"{fingerprint[:12]}): the same "
            "sizes, but different (or edited) weights shape its keys"
        )


def _resumed(resume: Any, options: tuple[Any, ...], arch: Arch, fingerprint: str,
             units: Iterator[list[int]], digest: Any) -> TriggerIndex | None:
    """The index to resume (loaded and checked, its units read again into ``digest``), or ``None``."""
    if resume is None:
        return None
    index = TriggerIndex.load(resume) if not isinstance(resume, TriggerIndex) else resume
    _check_resume(index, options, arch, fingerprint)
    _skip_read(units, index, digest)
    return index


# --- the run --------------------------------------------------------------------------------------


def _merge_group(arch: Arch, miner: _Miner, group: list[list[int]], first: int, blocks: tuple[int, ...],
                 batch_size: int, pad_id: int, bar: Any, prefix: tuple[int, ...] = (),
                 shard: Shard = ONE, batch_number: int = 0) -> int:
    """Run one group in length-sorted batches and merge them; examples are numbered from ``first``.

    ``prefix`` (the tokenizer's start tokens, e.g. BOS) goes before every unit and is left out
    of the statistics, as pads are; positions count from the unit's first token. The run's
    batches are numbered from ``batch_number``; this rank runs those ``shard`` owns
    (:func:`reslens._stream.stream`). Returns the number after this group's.
    """
    order = sorted(range(len(group)), key=lambda i: len(group[i]))
    rows = list(chunks(order, batch_size))
    sizes = [sum(len(group[i]) for i in r) for r in rows]  # tokens per batch: the bar shows the whole run
    shown = 0
    read = stream(arch, (batch_of([group[i] for i in r], prefix, pad_id) for r in rows), sites="mlp_act",
                  layers=blocks, shard=shard, first=batch_number)
    for number, batch, res in read:
        b = number - batch_number
        bar.update(sum(sizes[shown:b]))  # the other ranks' batches before this one
        shown = b + 1
        act = res.mlp_act  # [L, B, P, d_mlp]
        mask = batch.attention_mask.to(act.device)
        if prefix:  # right padding: the start tokens are the first positions of every row
            act, mask = act[:, :, len(prefix):], mask[:, len(prefix):]
        numbered = torch.tensor([first + i for i in rows[b]])  # examples are numbered in corpus order
        miner.add([group[i] for i in rows[b]], numbered, act, mask)
        bar.update(int(mask.sum()))
    bar.update(sum(sizes[shown:]))
    return batch_number + len(rows)


def _snapshot(miner: _Miner, shard: Shard, digest: Any, **meta: Any) -> TriggerIndex:
    """The one-process index of what has been read (collective under a group)."""
    shard.same(digest.hexdigest(), "the corpus read (its fingerprint)")
    return _Miner.merged(miner, shard).index(corpus_fingerprint=digest.hexdigest(), **meta)


def _save(index: TriggerIndex, out: str | os.PathLike, shard: Shard) -> None:
    """Rank 0 writes ``index`` to ``out`` (atomically); every rank goes on once the file is there."""
    if shard.primary:
        index.save(out)
    shard.barrier()


def mine_triggers(
    model: Any, tokenizer: Any, corpus: Any, *, layers: Any = None, top_k: int = 50, unit: str = "sentence",
    window: int | None = None, batch_size: int = 32, max_tokens: int | None = None,
    signed: bool | None = None, resume: TriggerIndex | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None, save_every: int = 500_000, progress: bool = True,
    group: Any = None,
) -> TriggerIndex:
    """Stream a corpus once and keep, for every (layer, key), its ``top_k`` trigger examples.

    ``corpus``: a text file, a folder of ``.txt`` files (sorted by name), a list of files, or
    an iterable of strings. ``unit="sentence"`` splits paragraphs into sentences (Geva et al.
    used sentences); ``"window"`` cuts the token stream of each text into windows of
    ``window`` tokens (default: the model's context, at most 128). Units are cut to
    ``window`` tokens; units shorter than 2 tokens are skipped. ``layers`` are blocks
    (default all). Examples are numbered in corpus order (0, 1, ...). The start tokens the
    tokenizer adds by its convention (e.g. a BOS; none for GPT-2 or SmolLM2) go before every
    unit and are left out of the statistics, as pads are.

    ``signed`` says how an example scores for a key. ``False`` (the default for an ungated
    MLP such as GPT-2's GELU): its largest coefficient ``max m_i``, ranked descending, as Geva
    et al. did. ``True`` (the default for a gated MLP, whose ``m_i = act(g_i·x̂)(u_i·x̂)`` is
    often large and negative, writing ``-v_i``): the coefficient of largest magnitude (the
    positive one on a tie, at its first position), ranked by ``|m_i|``, its sign kept in
    ``scores``. Why one list by ``|m|`` and not a top-k of each sign: see the module docstring.

    Memory does not grow with the corpus: the state is ``[layers, d_mlp, top_k]`` plus the
    token ids of examples that are in some top-k list. Batches are formed from length-sorted
    groups of ``16 * batch_size`` units to limit padding. ``max_tokens`` stops before the
    first unit that would pass that many tokens (in total, counting a resumed index's).

    ``out`` (a file, e.g. ``"index.safetensors"``) receives a snapshot every ``save_every``
    tokens and at the end, each written atomically as a whole, so an interrupted run leaves
    the last good snapshot. ``resume`` (an index or its file) continues from it: it must come
    from the same model weights (checked by fingerprint), layers, ``top_k``, ``unit``,
    ``window``, ``signed`` and start tokens, and the corpus must begin with the units it read
    (checked by re-reading and hashing them); anything else is a ``ValueError``. A resumed
    run ends with the index one uninterrupted run gives.

    ``group``: a torch.distributed process group; None = the default group under ``torchrun``,
    else one process; False = one process. Every rank must get the same arguments (checked) and
    returns the one-process index; rank 0 alone shows the bar and writes ``out``. An index
    written by a data-parallel run resumes with any number of processes, to the same result.
    """
    from tqdm.auto import tqdm

    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        blocks, window, signed, start = _check_options(arch, tokenizer, layers, top_k, unit, window,
                                                       batch_size, max_tokens, save_every, progress, signed,
                                                       out)
        (texts, description), fingerprint = corpus_texts(corpus), model_fingerprint(arch, blocks)
    shard.same((blocks, top_k, unit, window, signed, start, batch_size, max_tokens, save_every, fingerprint,
                description, out is None), "the mining options, model and corpus")
    units, digest = stream_units(tokenizer, texts, unit=unit, max_length=window), hashlib.sha256()
    with shard.together():  # an index refused (or unreadable) on one rank stops every rank
        resume = _resumed(resume, (blocks, top_k, unit, window, signed, start), arch, fingerprint, units,
                          digest)
    # a resumed index's examples go to rank 0 alone, so the merge counts each once
    miner = _Miner(len(blocks), arch.d_mlp, top_k, resume if shard.primary else None, signed)
    n_examples, n_tokens = (resume.n_examples, resume.n_tokens) if resume is not None else (0, 0)
    meta = dict(layers=blocks, top_k=top_k, unit=unit, window=window, n_layer=arch.n_layer,
                d_model=arch.d_model, d_vocab=arch.d_vocab, model_name=arch.checkpoint_name,
                model_fingerprint=fingerprint, corpus=description, signed=signed, start_ids=start)

    last_save, pad_id, batch_number = n_tokens, pad_token_id(tokenizer), 0
    groups = _unit_groups(units, n_tokens=n_tokens, max_tokens=max_tokens, size=16 * batch_size,
                          digest=digest)
    with tqdm(total=max_tokens, initial=n_tokens, unit="tok", unit_scale=True,
              disable=not (progress and shard.primary), desc="mining triggers") as bar:
        for units_read in groups:
            batch_number = _merge_group(arch, miner, units_read, n_examples, blocks, batch_size, pad_id, bar,
                                        start, shard, batch_number)
            n_examples, n_tokens = n_examples + len(units_read), n_tokens + sum(map(len, units_read))
            miner.prune()
            if out is not None and n_tokens - last_save >= save_every:
                read = dict(n_examples=n_examples, n_tokens=n_tokens)
                _save(_snapshot(miner, shard, digest, **read, **meta), out, shard)
                last_save = n_tokens
    if n_examples == 0:
        raise ValueError(f"corpus ({description}) holds no unit of at least 2 tokens")
    index = _snapshot(miner, shard, digest, n_examples=n_examples, n_tokens=n_tokens, **meta)
    if out is not None:
        _save(index, out, shard)
    return index
