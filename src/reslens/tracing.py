"""Causal tracing (Meng et al. 2022, "ROME") in batched form, and ROME's rank-one edit.

Causal tracing corrupts the subject's token embeddings with Gaussian noise, restores one
clean hidden state (or a window of MLP / attention outputs), and measures how much of the
answer's probability comes back: the *indirect effect* of that state. reslens follows
ROME's reference code (``experiments/causal_trace.py``) and says where it differs:

- **subject span**: the first occurrence of ``subject`` in ``prompt`` (ROME's
  ``find_token_range``), found through the tokenizer's offset mapping;
- **noise**: ``nu = noise * std``, where ``std`` is the standard deviation of the token
  embeddings (``wte`` rows) of the subject's tokens (ROME's ``collect_embedding_std``, which
  :func:`trace_many` computes over all the facts' subjects); ``embedding_std="vocab"`` uses
  the whole ``wte`` instead, a float gives it directly. The noise ``[samples, subject, d_model]``
  is drawn once from ``torch.Generator().manual_seed(seed)`` (ROME: ``numpy`` ``RandomState(1)``)
  and added to every corrupted row, so every restoration sees the same noise. It is added to
  ``resid`` layer 0 (``wte + wpe``); ROME adds it to the ``wte`` output: the same sum.
- **states** (``kind="resid"``): row ``l`` restores the output of block ``l`` (ROME's
  ``transformer.h.{l}``), i.e. ``resid`` layer ``l + 1`` in reslens' indexing;
  ``kind="mlp"`` / ``"attn"`` restore ``mlp_out`` / ``attn_out`` of the blocks
  ``max(0, l - window // 2) .. min(n_layer, l - (-window // 2)) - 1`` (ROME's
  ``trace_important_window``: ``l - 5 .. l + 4`` for ``window=10``), at one token.
- **probabilities**: ``p(answer)`` at the last position, averaged over the noise samples
  (ROME averages probabilities, not log-probabilities); the answer is the model's own top-1
  when none is given (ROME keeps only facts the model gets right). ROME runs the clean
  prompt as row 0 of every batch; reslens captures the clean states once instead.
- **batching**: ROME runs one forward of ``samples + 1`` rows per (layer, token) cell.
  reslens runs ``cells x samples`` rows per forward (chunked by ``batch_size``), each row
  corrupted with its sample's noise and restored at its own cell (``resid`` written into the
  block's input, ``mlp_out`` / ``attn_out`` through :func:`reslens.hooks.patch` functions that
  index rows). Shortcuts, all exact by causality (a position sees only itself and earlier
  ones), from the corrupted run's residual and keys/values (captured once):

  - a cell restoring token ``t`` equals the corrupted run at positions ``< t`` in every block,
    so only positions ``t ..`` are computed, attending to the corrupted run's keys/values of
    positions ``< t`` (cells are grouped by ``t``);
  - a row equals the corrupted run up to its first restored block, so it joins the forward
    of its chunk there, from the corrupted residual (a staged forward: cells sorted by that block);
  - the last block computes the last position only, the only one measured;
  - a state that cannot reach the last position (the last block's output, ``mlp_out`` or
    ``attn_out`` at an earlier token) is not restored: that cell's probability is the
    corrupted one; nor are cells at tokens before the subject run, since the corrupted state
    there is the clean one.

  Restored probabilities agree with ROME's per-cell forwards to float rounding (batch and
  kernel shapes differ), not bit for bit.

Indirect effect = restored - corrupted probability; total effect = clean - corrupted.

The rank-one edit (:func:`rank_one_edit`, ROME's ``rome_main.py``, ``compute_u.py``,
``compute_v.py``) writes a new key -> value pair into one MLP's ``c_proj`` and returns a
:class:`RankOneEdit` that is applied and restored explicitly (weights never change silently).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_block
from reslens._corpus import corpus_files, corpus_texts, encode, token_units
from reslens._gpt2 import GPT2
from reslens._saving import Saveable
from reslens.hooks import capture, patch

__all__ = [
    "KINDS",
    "BUCKETS",
    "TraceResult",
    "TraceSummary",
    "RankOneEdit",
    "causal_trace",
    "causal_trace_ids",
    "restored_prob",
    "trace_many",
    "subject_span",
    "embedding_std",
    "window_layers",
    "mlp_key_second_moment",
    "rank_one_edit",
    "rank_one_edit_ids",
]

#: What :func:`causal_trace` restores: block outputs (``resid`` layer ``l + 1``), or windows
#: of ``mlp_out`` / ``attn_out``.
KINDS = ("resid", "mlp", "attn")
_SITE_OF_KIND = {"resid": "resid", "mlp": "mlp_out", "attn": "attn_out"}
#: ROME's position buckets for averaged traces (:func:`trace_many`).
BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


# --- validation -----------------------------------------------------------------------------


def _int(value: Any, name: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    return value


def _float(value: Any, name: str, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be a finite number >= {low}; got {value}")
    return value


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    return kind


def _check_prompt_ids(g: GPT2, input_ids: Any) -> torch.Tensor:
    """One prompt as ids ``[pos]`` (a ``[1, pos]`` tensor or a list of ints is accepted)."""
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
            raise TypeError("input_ids given as a list must hold ints (token ids)")
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor [pos] or [1, pos] of token ids; got {type(input_ids).__name__}")
    if input_ids.ndim == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be one prompt, [pos] or [1, pos]; got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    n = input_ids.shape[0]
    if n == 0:
        raise ValueError("input_ids is empty; give at least one token")
    if n > g.n_positions:
        raise ValueError(
            f"the prompt has {n} tokens, more than the model's n_positions={g.n_positions}; shorten it"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= g.d_vocab:
        raise ValueError(f"input_ids contains token id {high if high >= g.d_vocab else low}, outside 0..{g.d_vocab - 1}")
    return input_ids.long().to(g.device)


def _check_span(span: Any, n_tokens: int) -> tuple[int, int]:
    if not (isinstance(span, (tuple, list)) and len(span) == 2):
        raise TypeError(f"subject_span must be a (start, end) pair of token indices; got {span!r}")
    start, end = (_int(x, "subject_span") for x in span)
    if not 0 <= start < end <= n_tokens:
        raise ValueError(
            f"subject_span={tuple(span)} must satisfy 0 <= start < end <= {n_tokens} (the prompt's tokens)"
        )
    return start, end


def window_layers(layer: int, window: int, n_layer: int) -> range:
    """The blocks ROME restores for window cell ``layer``: ``max(0, layer - window // 2)`` up
    to ``min(n_layer, layer - (-window // 2))`` (exclusive).

    >>> list(window_layers(6, 10, 12)), list(window_layers(0, 10, 12)), list(window_layers(3, 1, 12))
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4], [3])
    """
    return range(max(0, layer - window // 2), min(n_layer, layer - (-window // 2)))


# --- strings -> tokens ----------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    return encode(tokenizer, [text])[0]


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def _token_strings(tokenizer: Any, text: str, ids: Sequence[int]) -> list[str]:
    """Each token's piece of ``text`` (offset mapping), so a character split across byte-level
    tokens shows as itself instead of a replacement character; decoded tokens otherwise."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(ids):
            return [text[s:e] for s, e in offsets]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        pass
    return _decode(tokenizer, ids)


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token span ``(start, end)`` of the first occurrence of ``subject`` in ``prompt``
    (tokens overlapping its characters), as ROME's ``find_token_range``.

    Uses the tokenizer's offset mapping when it has one (fast tokenizers), else decodes
    token prefixes. Raises ``ValueError`` when ``subject`` does not occur in ``prompt``.
    """
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise TypeError("prompt and subject must be strings")
    if not subject.strip():
        raise ValueError("subject is empty; give the subject's text as it appears in the prompt")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise ValueError(f"subject={subject!r} does not occur in prompt={prompt!r}")
    return _token_span(tokenizer, prompt, char_start, char_start + len(subject))


def _token_span(tokenizer: Any, text: str, char_start: int, char_end: int) -> tuple[int, int]:
    """Tokens of ``text`` overlapping characters ``char_start:char_end``."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        ids = _encode(tokenizer, text)
        offsets, at = [], 0
        for i in range(len(ids)):
            end = len(tokenizer.decode(ids[: i + 1]))
            offsets.append((at, end))
            at = end
    inside = [i for i, (s, e) in enumerate(offsets) if e > char_start and s < char_end]
    if not inside:
        raise ValueError(f"characters {char_start}:{char_end} ({text[char_start:char_end]!r}) cover no token of {text!r}")
    return inside[0], inside[-1] + 1


def embedding_std(model: Any, token_ids: Any = None) -> float:
    """Standard deviation of the token embeddings (``wte`` rows, all coordinates) of
    ``token_ids`` (ROME's ``collect_embedding_std``), or of the whole vocabulary when ``None``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    >>> round(embedding_std(model), 2)  # HF initialises wte with std 0.02
    0.02
    """
    g = GPT2(model)
    w = g.wte.weight.detach()
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=w.device).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        w = w[ids]
    return float(w.float().std())


_std_of = embedding_std  # the function, for code whose parameter is named embedding_std


# --- the batched engine ---------------------------------------------------------------------


class _Engine:
    """Runs corrupted / restored forwards of one prompt, many restorations per forward.

    ``noise: [samples, span, d_model]``; a restoration is a list of ``(site, layer, token)``
    with sites ``resid`` (layer 0..n_layer), ``mlp_out``, ``attn_out``.
    """

    def __init__(self, g: GPT2, ids: torch.Tensor, span: tuple[int, int], answer_id: int, noise: torch.Tensor):
        self.g, self.ids, self.span, self.answer_id, self.noise = g, ids, span, answer_id, noise
        self.samples = noise.shape[0]
        self._clean: dict[str, torch.Tensor] = {}

    def clean_states(self, sites: Iterable[str]) -> None:
        need = tuple(s for s in dict.fromkeys(sites) if s not in self._clean)
        if need:
            res = capture(self.g.model, self.ids[None], sites=need)
            for site in need:
                self._clean[site] = getattr(res, site)[:, 0]  # [layers or blocks, pos, d]

    def clean_prob(self) -> float:
        """p(answer) at the last position of the clean prompt."""
        with torch.no_grad():
            h = self.g.final_hidden(self.ids[None])[0, -1]  # [d_model] (after ln_f)
            return float(self.g.unembed(h).float().softmax(-1)[self.answer_id])

    def corrupted_resid(self) -> torch.Tensor:
        """``resid`` of the corrupted run, every layer: ``[n_layer + 1, samples, pos, d_model]``."""
        if "corrupted" not in self._clean:
            start, end = self.span

            def corrupt(t: torch.Tensor) -> torch.Tensor:
                t = t.clone()
                t[:, start:end] += self.noise.to(t.dtype)
                return t

            with patch(self.g.model, {("resid", 0): corrupt}):
                res = capture(self.g.model, self.ids[None].expand(self.samples, -1), sites="resid")
            self._clean["corrupted"] = res.resid
        return self._clean["corrupted"]

    def corrupted_kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of block ``block`` in the corrupted run, each ``[samples, head, pos, d_head]``."""
        key = f"kv{block}"
        if key not in self._clean:
            with torch.no_grad():
                self._clean[key] = torch.stack(self.g.attention_kv(block, self.corrupted_resid()[block]))
        k, v = self._clean[key]
        return k, v

    def _reaching(self, restoration: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """The items of ``restoration`` that can change the last position's output: a state at a
        token before the last one reaches it only through a later block's attention, so
        ``resid`` layer ``n_layer`` (the input of ``ln_f``) and the last block's ``mlp_out`` /
        ``attn_out`` matter at the last token only. Dropping the others is exact."""
        L, last = self.g.n_layer, self.ids.shape[0] - 1
        top = {"resid": L - 1, "mlp_out": L - 2, "attn_out": L - 2}
        return [(site, layer, token) for site, layer, token in restoration if token == last or layer <= top[site]]

    def _start(self, restoration: Sequence[tuple[str, int, int]]) -> int:
        """First block whose input differs from the corrupted run's (``n_layer``: only ``ln_f``'s)."""
        return min((layer for _, layer, _ in restoration), default=self.g.n_layer)

    def run(self, restorations: Sequence[Sequence[tuple[str, int, int]]], *, batch_size: int,
            progress: bool = False, desc: str = "causal trace") -> torch.Tensor:
        """Mean p(answer) over the samples for each restoration: float32 ``[len(restorations)]``.

        Exact shortcuts, all by causality (a position sees only itself and earlier ones):

        - items that cannot reach the last position are dropped (:meth:`_reaching`); a
          restoration left empty has the corrupted probability;
        - a restoration whose first restored token is ``t`` equals the corrupted run at
          positions ``< t`` in every block, so only positions ``t ..`` are computed, attending to
          the corrupted run's keys/values of positions ``< t`` (same noise sample per row);
        - its rows equal the corrupted run up to its first restored block ``b``, so they join
          the forward there, from the corrupted residual (:meth:`_run_chunk`);
        - the last block computes the last position only (the others' keys/values are enough).

        Restorations are grouped by ``t`` and sorted by ``b``; chunks hold at most
        ``batch_size // samples`` restorations (``batch_size`` rows).
        """
        from tqdm.auto import tqdm

        self.clean_states({site for r in restorations for site, _, _ in r})
        kept = [self._reaching(r) for r in restorations]
        out = torch.empty(len(restorations), dtype=torch.float32)
        empty = [i for i, r in enumerate(kept) if not r]
        if empty:
            out[torch.tensor(empty)] = self._run_chunk([[]]).cpu()
        per_chunk = max(1, batch_size // self.samples)
        key = {i: (min(token for _, _, token in r), self._start(r)) for i, r in enumerate(kept) if r}
        chunks: list[list[int]] = []
        for i in sorted(key, key=key.get):
            if chunks and key[chunks[-1][0]][0] == key[i][0] and len(chunks[-1]) < per_chunk:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=not progress, leave=False):
            out[torch.tensor(chunk)] = self._run_chunk([kept[i] for i in chunk]).cpu()
        return out

    def _run_chunk(self, chunk: Sequence[Sequence[tuple[str, int, int]]]) -> torch.Tensor:
        """Mean p(answer) ``[len(chunk)]`` of restorations that share their first restored token
        ``t0``, sorted by first restored block: a staged forward of positions ``t0 ..``.

        Row ``r`` (restoration ``r // samples``, noise sample ``r % samples``) joins at its
        restoration's first block from the corrupted residual; since rows are sorted by that
        block, the active rows are always a prefix. ``resid`` items are written into the
        block's input directly; ``mlp_out`` / ``attn_out`` items through :func:`patch`.
        """
        g, S, L = self.g, self.samples, self.g.n_layer
        n = self.ids.shape[0]
        corrupted = self.corrupted_resid()  # [L + 1, S, n, d]
        t0 = min((token for r in chunk for _, _, token in r), default=n - 1)
        joins = [self._start(r) for r in chunk]
        hidden = corrupted[0][:0, t0:]  # [rows, n - t0, d]: the active rows, positions t0 ..
        with torch.no_grad():
            for b in range(joins[0], L + 1):
                if b == L:
                    hidden = hidden[:, -1:]  # ln_f's input: the last position is enough
                p0 = n - hidden.shape[1]  # the first position computed
                active = sum(j <= b for j in joins)
                if active * S > hidden.shape[0]:
                    new = corrupted[b][:, p0:].repeat(active - hidden.shape[0] // S, 1, 1)
                    hidden = torch.cat([hidden, new])
                hidden = self._restore_resid(hidden, chunk, b, p0)
                if b < L:
                    hidden = self._block(hidden, chunk, b, p0)
            h = g.ln_f(hidden[:, -1])  # [rows, d_model]
            p = g.unembed(h).float().softmax(-1)[:, self.answer_id]
        return p.view(len(chunk), S).mean(1)

    def _block(self, hidden: torch.Tensor, chunk: Sequence[Sequence[tuple[str, int, int]]], b: int,
               p0: int) -> torch.Tensor:
        """Block ``b`` on ``hidden`` ``[rows, n - p0, d]`` (positions ``p0 ..``) with the chunk's
        ``mlp_out`` / ``attn_out`` items of block ``b`` restored; the last block returns the
        last position only ``[rows, 1, d]``."""
        g, rows = self.g, hidden.shape[0]
        k, v = self.corrupted_kv(b)  # [S, head, n, d_head]
        prefix_k = k[:, :, :p0].repeat(rows // self.samples, 1, 1, 1)  # [rows, head, p0, d_head]
        prefix_v = v[:, :, :p0].repeat(rows // self.samples, 1, 1, 1)
        if b == self.g.n_layer - 1 and hidden.shape[1] > 1:
            own_k, own_v = g.attention_kv(b, hidden[:, :-1])  # positions p0 .. n - 2
            prefix_k, prefix_v = torch.cat([prefix_k, own_k], -2), torch.cat([prefix_v, own_v], -2)
            hidden, p0 = hidden[:, -1:], self.ids.shape[0] - 1
        with patch(g.model, self._edits(chunk, b, p0)):
            return g.run_block_suffix(b, hidden, prefix_k, prefix_v)

    def _rows_and_values(self, chunk: Sequence[Sequence[tuple[str, int, int]]], site: str, b: int,
                         p0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rows, positions (from ``p0``) and clean values ``[len, d]`` of the chunk's ``(site, b)`` items."""
        S, rows, pos = self.samples, [], []
        for c, restoration in enumerate(chunk):
            for token in sorted({t for s, layer, t in restoration if s == site and layer == b}):
                assert token >= p0, "an item before the computed positions (not dropped by _reaching?)"
                rows.extend(range(c * S, (c + 1) * S))
                pos.extend([token] * S)
        if not rows:
            return None
        device = self.g.device
        pos_t = torch.tensor(pos, device=device)
        return torch.tensor(rows, device=device), pos_t - p0, self._clean[site][b][pos_t]

    def _restore_resid(self, hidden: torch.Tensor, chunk: Sequence[Sequence[tuple[str, int, int]]], b: int,
                       p0: int) -> torch.Tensor:
        """``hidden`` (``resid`` layer ``b``, positions ``p0 ..``) with the chunk's ``resid`` items of layer ``b`` restored."""
        found = self._rows_and_values(chunk, "resid", b, p0)
        if found is None:
            return hidden
        r, t, vals = found
        hidden = hidden.clone()
        hidden[r, t] = vals.to(hidden.dtype)
        return hidden

    def _edits(self, chunk: Sequence[Sequence[tuple[str, int, int]]], b: int, p0: int) -> dict:
        """``patch`` functions that set the chunk's ``mlp_out`` / ``attn_out`` items of block ``b``
        to their clean values (rows index the active rows, positions count from ``p0``)."""
        edits = {}
        for site in ("mlp_out", "attn_out"):
            found = self._rows_and_values(chunk, site, b, p0)
            if found is None:
                continue

            def fn(x: torch.Tensor, found=found) -> torch.Tensor:
                r, t, vals = found
                x = x.clone()
                x[r, t] = vals.to(x.dtype)
                return x

            edits[(site, b)] = fn
        return edits


def _noise(g: GPT2, samples: int, span: tuple[int, int], scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, span[1] - span[0], g.d_model), generator=gen) * scale
    return noise.to(device=g.device, dtype=torch.float32)


def _resolve_std(g: GPT2, ids: torch.Tensor, span: tuple[int, int], embedding_std_: Any) -> float:
    if embedding_std_ is None:
        return _std_of(g.model, ids[span[0] : span[1]])
    if isinstance(embedding_std_, str):
        if embedding_std_ != "vocab":
            raise ValueError(f"embedding_std must be None, 'vocab' or a number; got {embedding_std_!r}")
        return _std_of(g.model)
    return _float(embedding_std_, "embedding_std", low=0.0)


def restored_prob(
    model: Any,
    input_ids: Any,
    subject_span: tuple[int, int],
    answer_id: int,
    restore: Iterable[tuple[str, int, int]] = (),
    *,
    samples: int = 10,
    noise: float = 3.0,
    embedding_std: Any = None,
    seed: int = 0,
) -> float:
    """ROME's ``trace_with_patch``: mean ``p(answer_id)`` at the last token over ``samples``
    corrupted runs in which every ``(site, layer, token)`` of ``restore`` is set to its clean
    value. Sites: ``resid`` (layer ``0..n_layer``, reslens indexing), ``mlp_out``, ``attn_out``.
    The noise is the one :func:`causal_trace_ids` draws for the same arguments.
    """
    g = GPT2(model)
    ids = _check_prompt_ids(g, input_ids)
    span = _check_span(subject_span, ids.shape[0])
    answer_id = _int(answer_id, "answer_id")
    restoration = []
    for item in restore:
        if not (isinstance(item, tuple) and len(item) == 3):
            raise TypeError(f"restore items must be (site, layer, token) triples; got {item!r}")
        site, layer, token = item
        if site not in ("resid", "mlp_out", "attn_out"):
            raise ValueError(f"restore site must be 'resid', 'mlp_out' or 'attn_out'; got {site!r}")
        n_max = g.n_layer if site == "resid" else g.n_layer - 1
        if not 0 <= _int(layer, "restore layer") <= n_max or not 0 <= _int(token, "restore token") < ids.shape[0]:
            raise ValueError(f"restore item {item!r} is out of range (layer 0..{n_max}, token 0..{ids.shape[0] - 1})")
        restoration.append((site, layer, token))
    std = _resolve_std(g, ids, span, embedding_std)
    engine = _Engine(g, ids, span, answer_id, _noise(g, _int(samples, "samples", low=1), span,
                                                      _float(noise, "noise", low=0.0) * std, _int(seed, "seed")))
    return float(engine.run([restoration], batch_size=engine.samples)[0])


# --- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceResult(Saveable):
    """A causal trace of one prompt (ROME's ``calculate_hidden_flow``).

    - ``input_ids: [n_tokens]`` int64; ``tokens``: their strings; ``subject_span = (start, end)``
    - ``restored_prob: [n_layer, n_tokens]`` float32: mean p(answer) with cell ``(layer, token)``
      restored (``kind="resid"``: output of block ``layer``; ``"mlp"``/``"attn"``: the window
      of blocks around ``layer``, see :func:`window_layers`)
    - ``clean_prob``, ``corrupted_prob``: p(answer) of the clean run and of the corrupted run
    - ``noise`` (the multiplier), ``noise_std`` (the absolute noise std ``nu``), ``samples``, ``seed``, ``window``
    """

    kind: str
    input_ids: torch.Tensor
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    answer_id: int
    answer: str
    restored_prob: torch.Tensor
    clean_prob: float
    corrupted_prob: float
    window: int
    samples: int
    noise: float
    noise_std: float
    seed: int

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "subject_span", tuple(int(x) for x in self.subject_span))
        if self.input_ids.ndim != 1:
            raise ValueError(f"input_ids must be [n_tokens]; got shape {tuple(self.input_ids.shape)}")
        n = self.input_ids.shape[0]
        if len(self.tokens) != n:
            raise ValueError(f"tokens has {len(self.tokens)} entries; expected {n} (one per input id)")
        if self.restored_prob.ndim != 2 or self.restored_prob.shape[1] != n:
            raise ValueError(f"restored_prob has shape {tuple(self.restored_prob.shape)}; expected [n_layer, {n}]")
        _check_span(self.subject_span, n)

    # --- derived ------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.restored_prob.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``restored_prob - corrupted_prob``: ``[n_layer, n_tokens]``."""
        return self.restored_prob - self.corrupted_prob

    @property
    def total_effect(self) -> float:
        """``clean_prob - corrupted_prob``."""
        return self.clean_prob - self.corrupted_prob

    @property
    def peak(self) -> tuple[int, int, float]:
        """``(layer, token, indirect effect)`` of the largest indirect effect."""
        ie = self.indirect_effect
        flat = int(ie.argmax())
        layer, token = divmod(flat, self.n_tokens)
        return layer, token, float(ie[layer, token])

    @property
    def label(self) -> str:
        return {"resid": "hidden state", "mlp": "MLP", "attn": "attention"}[self.kind]

    # --- output -------------------------------------------------------------------------------

    def to_frame(self):
        """Long ``pandas.DataFrame``: one row per (layer, token) cell."""
        import pandas as pd

        start, end = self.subject_span
        layers, positions = torch.meshgrid(torch.arange(self.n_layer), torch.arange(self.n_tokens), indexing="ij")
        layers, positions = layers.flatten(), positions.flatten()
        return pd.DataFrame({
            "kind": self.kind,
            "layer": layers.numpy(),
            "pos": positions.numpy(),
            "token": [self.tokens[p] for p in positions.tolist()],
            "is_subject": ((positions >= start) & (positions < end)).numpy(),
            "restored_prob": self.restored_prob.flatten().numpy(),
            "indirect_effect": self.indirect_effect.flatten().numpy(),
        })

    def table(self, *, cell: int = 7) -> str:
        """Text heatmap: one line per token (subject tokens starred), indirect effect per layer."""
        width = max(len(_show(t)) for t in self.tokens) + 2
        head = f"{'':<{width}}" + "".join(f"{f'L{l}':>{cell}}" for l in range(self.n_layer))
        lines = [
            f"causal trace ({self.label}): p({_show(self.answer)}) clean {self.clean_prob:.4f}, "
            f"corrupted {self.corrupted_prob:.4f}, total effect {self.total_effect:+.4f}",
            "indirect effect (restored - corrupted):",
            head,
        ]
        start, end = self.subject_span
        ie = self.indirect_effect
        for p, token in enumerate(self.tokens):
            mark = "*" if start <= p < end else " "
            lines.append(f"{_show(token) + mark:<{width}}" + "".join(f"{float(ie[l, p]):>{cell}.3f}" for l in range(self.n_layer)))
        layer, token, value = self.peak
        lines.append(f"peak: layer {layer}, token {token} ({_show(self.tokens[token])!s}): {value:+.4f}")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """ROME's heatmap: tokens (subject starred) x layers, colour = p(answer) restored."""
        from reslens.plot import plot_trace

        return plot_trace(self, ax=ax)

    def __repr__(self) -> str:
        layer, token, value = self.peak
        return (
            f"TraceResult(kind={self.kind!r}, n_layer={self.n_layer}, n_tokens={self.n_tokens}, "
            f"answer={self.answer!r}, clean={self.clean_prob:.4f}, corrupted={self.corrupted_prob:.4f}, "
            f"peak=(layer {layer}, token {token}, {value:+.4f}))"
        )


def _show(token: str) -> str:
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


# --- causal_trace ---------------------------------------------------------------------------


def causal_trace_ids(
    model: Any,
    input_ids: Any,
    subject_span: tuple[int, int],
    *,
    answer_id: int | None = None,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    embedding_std: Any = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    tokenizer: Any = None,
    token_strings: Sequence[str] | None = None,
) -> TraceResult:
    """Causal trace of a prompt given as token ids ``[pos]`` with the subject's token span.

    See :func:`causal_trace` (the string version, which calls this) and the module docstring
    for the procedure. ``batch_size`` bounds the rows (``cells x samples``) of one forward;
    ``tokenizer`` (optional) only names the tokens (``token_strings`` names them directly).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> result = causal_trace_ids(model, torch.tensor([5, 6, 7, 8]), (1, 3), samples=4)
    >>> tuple(result.restored_prob.shape), result.subject_span
    ((2, 4), (1, 3))
    >>> abs(float(result.restored_prob[-1, -1]) - result.clean_prob) < 1e-6  # last block, last token
    True
    """
    g = GPT2(model)
    if g.model.training:
        warnings.warn("the model is in training mode, so dropout makes the trace random; call model.eval()", stacklevel=2)
    kind = _check_kind(kind)
    window = _int(window, "window", low=1)
    samples = _int(samples, "samples", low=1)
    noise = _float(noise, "noise", low=0.0)
    seed = _int(seed, "seed")
    batch_size = _int(batch_size, "batch_size", low=1)
    ids = _check_prompt_ids(g, input_ids)
    n = ids.shape[0]
    span = _check_span(subject_span, n)
    std = _resolve_std(g, ids, span, embedding_std)

    if answer_id is None:
        with torch.no_grad():
            h = g.final_hidden(ids[None])[0, -1]
            answer_id = int(g.unembed(h).argmax())
    answer_id = _int(answer_id, "answer_id")
    if not 0 <= answer_id < g.d_vocab:
        raise ValueError(f"answer_id={answer_id} is outside the vocabulary 0..{g.d_vocab - 1}")

    engine = _Engine(g, ids, span, answer_id, _noise(g, samples, span, noise * std, seed))
    clean = engine.clean_prob()
    corrupted = float(engine.run([[]], batch_size=samples)[0])

    site = _SITE_OF_KIND[kind]
    cells = [(layer, token) for layer in range(g.n_layer) for token in range(span[0], n)]
    if kind == "resid":
        restorations = [[("resid", layer + 1, token)] for layer, token in cells]
    else:
        restorations = [[(site, j, token) for j in window_layers(layer, window, g.n_layer)] for layer, token in cells]
    restored = torch.full((g.n_layer, n), corrupted, dtype=torch.float32)  # tokens before the subject: no-op
    if cells:
        probs = engine.run(restorations, batch_size=batch_size, progress=progress)
        for (layer, token), p in zip(cells, probs.tolist()):
            restored[layer, token] = p

    ids_cpu = ids.cpu()
    tokens = _decode(tokenizer, ids_cpu.tolist()) if token_strings is None else list(token_strings)
    return TraceResult(
        kind=kind,
        input_ids=ids_cpu,
        tokens=tuple(tokens),
        subject_span=span,
        answer_id=answer_id,
        answer=_decode(tokenizer, [answer_id])[0],
        restored_prob=restored,
        clean_prob=clean,
        corrupted_prob=corrupted,
        window=window if kind != "resid" else 1,
        samples=samples,
        noise=noise,
        noise_std=noise * std,
        seed=seed,
    )


def _prompt_ids(g: GPT2, tokenizer: Any, prompt: Any) -> list[int]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string; got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is empty")
    ids = _encode(tokenizer, prompt)
    if len(ids) > g.n_positions:
        raise ValueError(
            f"prompt has {len(ids)} tokens, more than the model's n_positions={g.n_positions}; shorten it"
        )
    return ids


def _answer_id(tokenizer: Any, answer: Any) -> int:
    if not isinstance(answer, str) or not answer:
        raise TypeError(f"answer must be a non-empty string (e.g. ' Holmes', with its leading space) or None; got {answer!r}")
    ids = _encode(tokenizer, answer)
    if not ids:
        raise ValueError(f"answer={answer!r} tokenizes to no tokens")
    return ids[0]


def causal_trace(
    model: Any,
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    embedding_std: Any = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> TraceResult:
    """Causal trace (ROME) of ``prompt``: corrupt ``subject``, restore each (layer, token) cell.

    ``answer``: the token whose probability is measured (its first token, written as it
    follows the prompt, e.g. ``" Holmes"``); ``None`` = the model's own top-1. ``kind``:
    ``"resid"`` restores single block outputs, ``"mlp"`` / ``"attn"`` windows of ``window``
    MLP / attention outputs (ROME: ``l - 5 .. l + 4`` for ``window=10``, clipped). ``noise``
    multiplies ``embedding_std`` (``None`` = std of the subject tokens' embeddings,
    ``"vocab"`` = of all of ``wte``, or a number). ``samples`` noise draws from ``seed``,
    the same for every cell. Returns a :class:`TraceResult` ``[n_layer, n_tokens]``.

    ``causal_trace(model, tokenizer, "said White", "White")`` traces the embedded model's
    top-1 " Fang" (see ``examples/causal_trace.py``).
    """
    g = GPT2(model)
    ids = _prompt_ids(g, tokenizer, prompt)
    span = subject_span(tokenizer, prompt, subject)
    answer_id = None if answer is None else _answer_id(tokenizer, answer)
    return causal_trace_ids(
        model, torch.tensor(ids), span, answer_id=answer_id, kind=kind, window=window, samples=samples,
        noise=noise, embedding_std=embedding_std, seed=seed, batch_size=batch_size, progress=progress,
        tokenizer=tokenizer, token_strings=_token_strings(tokenizer, prompt, ids),
    )


# --- averages over facts --------------------------------------------------------------------


def _bucket_positions(span: tuple[int, int], n: int) -> list[list[int]]:
    """ROME's position buckets (``average_causal_effects``); a bucket may be empty.

    The first subsequent token is ``end`` even when it is also the last token (as ROME).
    """
    start, end = span
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        [end] if end < n else [],
        list(range(end + 1, n - 1)),
        [n - 1],
    ]


@dataclass(frozen=True)
class TraceSummary:
    """Causal traces averaged over facts in ROME's position buckets (:data:`BUCKETS`).

    - ``mean``, ``low``, ``high``: ``[n_bucket, n_layer]`` mean indirect effect and its 95%
      interval (Student t over facts; NaN where a bucket has fewer than 2 facts for the interval)
    - ``count: [n_bucket]`` facts that have tokens in each bucket
    - ``clean_prob``, ``corrupted_prob``: mean over the traced facts
    - ``results``: the per-fact :class:`TraceResult`; ``skipped``: indices of facts not traced
      (the model's top-1 is not the answer)
    """

    kind: str
    buckets: tuple[str, ...]
    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    count: torch.Tensor
    clean_prob: float
    corrupted_prob: float
    results: tuple[TraceResult, ...] = field(default=(), compare=False, repr=False)
    skipped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        shape = (len(self.buckets), self.mean.shape[-1] if self.mean.ndim == 2 else -1)
        for name in ("mean", "low", "high"):
            t = getattr(self, name)
            if t.ndim != 2 or tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{len(self.buckets)}, n_layer]")
        if tuple(self.count.shape) != (len(self.buckets),):
            raise ValueError(f"count must be [{len(self.buckets)}]; got {tuple(self.count.shape)}")

    @property
    def n_facts(self) -> int:
        return len(self.results)

    @property
    def n_layer(self) -> int:
        return self.mean.shape[1]

    def to_frame(self):
        """One row per (bucket, layer): mean indirect effect, 95% interval, facts counted."""
        import pandas as pd

        rows = []
        for b, bucket in enumerate(self.buckets):
            for layer in range(self.n_layer):
                rows.append({"kind": self.kind, "bucket": bucket, "layer": layer, "mean": float(self.mean[b, layer]),
                             "low": float(self.low[b, layer]), "high": float(self.high[b, layer]),
                             "count": int(self.count[b])})
        return pd.DataFrame(rows)

    def table(self, *, cell: int = 7) -> str:
        width = max(len(b) for b in self.buckets) + 2
        lines = [
            f"average indirect effect ({self.kind}) over {self.n_facts} facts "
            f"(clean {self.clean_prob:.4f}, corrupted {self.corrupted_prob:.4f}, skipped {len(self.skipped)})",
            f"{'':<{width}}" + "".join(f"{f'L{l}':>{cell}}" for l in range(self.n_layer)) + "      n",
        ]
        for b, bucket in enumerate(self.buckets):
            lines.append(f"{bucket:<{width}}" + "".join(f"{float(self.mean[b, l]):>{cell}.3f}" for l in range(self.n_layer))
                         + f"{int(self.count[b]):>7}")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """ROME's average-effect heatmap: buckets x layers."""
        from reslens.plot import plot_trace_summary

        return plot_trace_summary(self, ax=ax)


def trace_many(
    model: Any,
    tokenizer: Any,
    facts: Sequence[tuple[str, str, str | None]],
    *,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    embedding_std: Any = None,
    seed: int = 0,
    require_correct: bool = True,
    batch_size: int = 256,
    progress: bool = True,
) -> TraceSummary:
    """Trace every ``(prompt, subject, answer)`` of ``facts`` and average in ROME's buckets.

    ``embedding_std=None`` = std of the embeddings of all the facts' subject tokens (ROME's
    ``collect_embedding_std`` over the known facts), so every fact gets the same ``nu``. With
    ``require_correct`` (ROME), a fact whose answer is not the model's top-1 is skipped and
    listed in ``skipped``; ``answer=None`` traces the model's own top-1.
    """
    from tqdm.auto import tqdm

    g = GPT2(model)
    if isinstance(facts, (str, bytes)) or not isinstance(facts, Sequence) or not facts:
        raise TypeError("facts must be a non-empty list of (prompt, subject, answer) tuples")
    prepared = []
    for i, fact in enumerate(facts):
        if not (isinstance(fact, (tuple, list)) and len(fact) == 3):
            raise TypeError(f"facts[{i}] must be a (prompt, subject, answer) tuple; got {fact!r}")
        prompt, subject, answer = fact
        ids = _prompt_ids(g, tokenizer, prompt)
        span = subject_span(tokenizer, prompt, subject)
        prepared.append((ids, span, None if answer is None else _answer_id(tokenizer, answer), prompt))
    if embedding_std is None:
        embedding_std = _std_of(model, [i for ids, (s, e), _, _ in prepared for i in ids[s:e]])

    results, skipped = [], []
    for i, (ids, span, answer_id, prompt) in enumerate(tqdm(prepared, desc=f"causal traces ({kind})", unit="fact", disable=not progress)):
        if answer_id is not None and require_correct:
            with torch.no_grad():
                h = g.final_hidden(torch.tensor([ids], device=g.device))[0, -1]
                if int(g.unembed(h).argmax()) != answer_id:
                    skipped.append(i)
                    continue
        results.append(causal_trace_ids(
            model, torch.tensor(ids), span, answer_id=answer_id, kind=kind, window=window, samples=samples, noise=noise,
            embedding_std=embedding_std, seed=seed, batch_size=batch_size, tokenizer=tokenizer,
            token_strings=_token_strings(tokenizer, prompt, ids),
        ))
    if not results:
        raise ValueError(f"none of the {len(facts)} facts has its answer as the model's top-1; nothing to average "
                         "(pass require_correct=False to trace them anyway)")
    return _summarise(kind, results, tuple(skipped))


def _summarise(kind: str, results: Sequence[TraceResult], skipped: tuple[int, ...]) -> TraceSummary:
    n_layer = results[0].n_layer
    per_bucket: list[list[torch.Tensor]] = [[] for _ in BUCKETS]
    for r in results:
        for b, positions in enumerate(_bucket_positions(r.subject_span, r.n_tokens)):
            if positions:
                per_bucket[b].append(r.indirect_effect[:, positions].mean(1))
    mean = torch.full((len(BUCKETS), n_layer), float("nan"))
    low, high = mean.clone(), mean.clone()
    count = torch.tensor([len(v) for v in per_bucket])
    for b, values in enumerate(per_bucket):
        if not values:
            continue
        x = torch.stack(values).double()  # [facts, n_layer]
        mean[b] = x.mean(0).float()
        if len(values) > 1:
            half = _t975(len(values) - 1) * x.std(0) / math.sqrt(len(values))
            low[b], high[b] = (x.mean(0) - half).float(), (x.mean(0) + half).float()
    return TraceSummary(
        kind=kind, buckets=BUCKETS, mean=mean, low=low, high=high, count=count,
        clean_prob=sum(r.clean_prob for r in results) / len(results),
        corrupted_prob=sum(r.corrupted_prob for r in results) / len(results),
        results=tuple(results), skipped=skipped,
    )


def _t975(dof: int) -> float:
    """Two-sided 95% Student t quantile (scipy, which scikit-learn already requires)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


# --- ROME's rank-one edit -------------------------------------------------------------------

_MOM2_CACHE: dict[str, torch.Tensor] = {}


def _fingerprint(g: GPT2, layer: int) -> str:
    """Hash of every weight that shapes block ``layer``'s ``c_proj`` inputs (not ``c_proj`` itself)."""
    h = hashlib.sha1()
    h.update(f"{g.n_layer}/{g.d_model}/{g.d_mlp}/{layer}".encode())
    params = [g.wte.weight, g.wpe.weight]
    for block in range(layer + 1):
        for name, p in g.blocks[block].named_parameters():
            if block < layer or not name.startswith("mlp.c_proj"):
                params.append(p)
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _corpus_key(corpus: Any) -> tuple[Any, torch.Tensor | None, str]:
    """(texts or None, ids or None, identity key) of a stats corpus: a file / folder of ``.txt``
    files (key: paths, sizes, mtimes), an iterable of strings (key: their hash), or ids ``[n, pos]``."""
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2 or corpus.dtype.is_floating_point:
            raise ValueError(f"stats_corpus as a tensor must be integer ids [n, pos]; got {tuple(corpus.shape)} {corpus.dtype}")
        return None, corpus.long(), "ids:" + hashlib.sha1(corpus.long().cpu().numpy().tobytes()).hexdigest()
    if isinstance(corpus, (str, os.PathLike)):
        files = corpus_files(corpus, name="stats_corpus")
        key = "files:" + "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return corpus_texts(corpus, name="stats_corpus")[0], None, key
    texts = list(corpus_texts(corpus, name="stats_corpus")[0])
    if not texts:
        raise ValueError("stats_corpus is empty; give at least one string")
    return texts, None, "texts:" + hashlib.sha1("\x00".join(texts).encode()).hexdigest()


def mlp_key_second_moment(
    model: Any,
    layer: int,
    corpus: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 100_000,
    max_length: int | None = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``C = E[k k^T]``: uncentred second moment ``[d_mlp, d_mlp]`` (float32) of block
    ``layer``'s ``c_proj`` inputs (post-GELU coefficients) over the tokens of ``corpus``
    (ROME's ``layer_stats(..., "mom2")``).

    ``corpus``: a text file, a folder of ``.txt`` files, an iterable of strings (these need
    ``tokenizer``), or token ids ``[n, pos]``. Texts are cut into windows of ``max_length``
    tokens (default: the model's context) that never cross from one text into the next; at
    most ``max_tokens`` tokens are used, and files are read only as far as that needs.

    Cached in memory per (weights that shape the keys, layer, corpus, limits): a SHA-1 of those
    weights, and of the corpus (paths + sizes + mtimes, or the texts / ids). With
    ``cache_dir`` the matrix is also written there as ``mom2-<key>.safetensors`` and read back
    in later processes.
    """
    from tqdm.auto import tqdm

    g = GPT2(model)
    layer = check_block(layer, g.n_layer)
    max_tokens = _int(max_tokens, "max_tokens", low=1)
    max_length = g.n_positions if max_length is None else _int(max_length, "max_length", low=1)
    max_length = min(max_length, g.n_positions)
    texts, ids, corpus_key = _corpus_key(corpus)
    key = hashlib.sha1(f"{_fingerprint(g, layer)}|{layer}|{corpus_key}|{max_tokens}|{max_length}".encode()).hexdigest()
    if key in _MOM2_CACHE:
        return _MOM2_CACHE[key].to(g.device)
    file = None if cache_dir is None else Path(cache_dir).expanduser() / f"mom2-{key[:20]}.safetensors"
    if file is not None and file.is_file():
        from safetensors.torch import load_file

        _MOM2_CACHE[key] = load_file(os.fspath(file))["mom2"]
        return _MOM2_CACHE[key].to(g.device)

    if texts is not None:
        if tokenizer is None:
            raise TypeError("stats_corpus holds text, so tokenizer= is required")
        windows, total_tokens = [], 0
        for window in token_units(tokenizer, texts, "window", max_length):  # texts are read only as far as needed
            windows.append(window[: max_tokens - total_tokens])
            total_tokens += len(windows[-1])
            if total_tokens >= max_tokens:
                break
        if not windows:
            raise ValueError("stats_corpus tokenizes to no window of at least 2 tokens")
    else:
        windows = []
        left = max_tokens
        for row in ids[:, :max_length].tolist():
            if left <= 0:
                break
            windows.append(row[:left])
            left -= len(windows[-1])
    from reslens.hooks import pad_ids

    total = torch.zeros(g.d_mlp, g.d_mlp, dtype=torch.float64, device=g.device)
    count = 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"c_proj second moment (layer {layer})",
                      unit="batch", disable=not progress):
        batch = pad_ids(windows[start : start + batch_size])
        k = capture(model, batch, sites="mlp_act", layers=layer).mlp_act[0]  # [b, pos, d_mlp]
        k = k[batch.attention_mask.to(k.device)].double()  # [tokens, d_mlp]
        total += k.T @ k
        count += k.shape[0]
    mom2 = (total / count).float().cpu()
    _MOM2_CACHE[key] = mom2
    if file is not None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mom2": mom2}, os.fspath(file), metadata={"layer": str(layer), "tokens": str(count)})
    return mom2.to(g.device)


class RankOneEdit:
    """A rank-one update of block ``layer``'s ``c_proj.weight`` ``[d_mlp, d_model]``:
    ``W' = W + u v^T`` (Conv1D: ``mlp_out = k @ W + b``, so key ``k`` gains ``(k . u) v``).

    Nothing changes until :meth:`apply` (or ``with edit:``); :meth:`restore` copies the
    original tensor back bit-exactly (a clone kept at apply time). No hooks are involved.

    - ``u: [d_mlp]`` (= ``C^-1 k* / (C^-1 k*) . k``), ``v: [d_model]`` (= ``v* - W k - b``, the
      change of the MLP output at the edited prompt's key ``k``)
    - ``key: [d_mlp]`` k* (mean key over the context templates), ``value: [d_model]`` v*
    """

    def __init__(self, model: Any, layer: int, u: torch.Tensor, v: torch.Tensor, *, key: torch.Tensor,
                 value: torch.Tensor, info: dict | None = None) -> None:
        self.g = GPT2(model)
        self.layer = layer
        self.u, self.v, self.key, self.value = u, v, key, value
        self.info = dict(info or {})
        self._original: torch.Tensor | None = None

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.g.c_proj(self.layer).weight

    @property
    def delta(self) -> torch.Tensor:
        """``u v^T``: ``[d_mlp, d_model]``, in the weight's orientation."""
        return torch.outer(self.u, self.v)

    @property
    def applied(self) -> bool:
        return self._original is not None

    def apply(self) -> RankOneEdit:
        """Write the edit into the model (keeps a clone of the original weight)."""
        if self.applied:
            raise RuntimeError("this edit is already applied; call restore() first")
        w = self.weight
        with torch.no_grad():
            self._original = w.detach().clone()
            w.copy_((self._original.float() + self.delta.to(w.device).float()).to(w.dtype))
        return self

    def restore(self) -> None:
        """Put the original weight back, bit-exactly."""
        if not self.applied:
            raise RuntimeError("this edit is not applied; nothing to restore")
        with torch.no_grad():
            self.weight.copy_(self._original)
        self._original = None

    def __enter__(self) -> RankOneEdit:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.info.items() if k != "nll"}
        if self.info.get("nll"):
            shown["nll"] = f"{self.info['nll'][0]} -> {self.info['nll'][-1]}"
        return (f"RankOneEdit(layer={self.layer}, applied={self.applied}, |u|={float(self.u.norm()):.3g}, "
                f"|v|={float(self.v.norm()):.3g}{', ' + repr(shown) if shown else ''})")


def _sample_prefixes(g: GPT2, start_id: int, shapes: Sequence[tuple[int, int]], seed: int) -> list[list[int]]:
    """ROME's context templates: ``n`` continuations of ``length`` tokens sampled (top-5) from
    the model after ``start_id`` (its end-of-text), for each ``(length, n)``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length, n in shapes:
        seqs = torch.full((n, 1), start_id, dtype=torch.long, device=g.device)
        with torch.no_grad():
            for _ in range(length):
                h = g.final_hidden(seqs)[:, -1]
                top = g.unembed(h).float().topk(5, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=gen).to(g.device)
                seqs = torch.cat([seqs, top.indices.gather(1, pick)], 1)
        out.extend(seqs[:, 1:].tolist())
    return out


def _edit_core(
    g: GPT2,
    layer: int,
    key_contexts: Sequence[tuple[list[int], int]],
    answer_ids: Sequence[int],
    kl_contexts: Sequence[tuple[list[int], int]],
    mom2: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    kl_factor: float,
    clamp_norm: float,
    ridge: float,
    info: dict,
) -> RankOneEdit:
    """ROME's ``compute_u`` + ``compute_v`` + ``execute_rome`` on token contexts.

    ``key_contexts[i] = (ids, subject_last)``; context 0 is the bare prompt.
    """
    from reslens.hooks import pad_ids

    device = g.device
    # k*: mean c_proj input at the subject's last token over the contexts (compute_u)
    keys, outs = [], []
    for ids, idx in key_contexts:
        res = capture(g.model, torch.tensor([ids], device=device), sites=("mlp_act", "mlp_out"), layers=layer)
        keys.append(res.mlp_act[0, 0, idx].float())
        outs.append(res.mlp_out[0, 0, idx].float())
    k_star = torch.stack(keys).mean(0)
    k0, out0 = keys[0], outs[0]  # the bare prompt: ROME's cur_input / cur_output and target_init
    C = mom2.to(device=device, dtype=torch.float64)
    C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=device)
    u = torch.linalg.solve(C, k_star.double()).float()  # C^-1 k*

    # v*: optimise delta added to mlp_out at the subject's last token (compute_v)
    answer_ids = list(answer_ids)
    rows, lookup, targets = [], [], []
    for ids, idx in key_contexts:
        row = list(ids) + answer_ids[:-1]
        rows.append(row)
        lookup.append(idx)
        targets.append([(len(ids) - 1 + j, a) for j, a in enumerate(answer_ids)])
    for ids, idx in kl_contexts:
        rows.append(list(ids))
        lookup.append(idx)
    batch = pad_ids(rows)  # right padding: causal, so real positions are unaffected
    input_ids = batch.input_ids.to(device)
    n_rewrite = len(key_contexts)
    at = torch.zeros(input_ids.shape[0], input_ids.shape[1], 1, device=device)
    at[torch.arange(len(lookup)), torch.tensor(lookup)] = 1.0
    t_row = torch.tensor([r for r, tg in enumerate(targets) for _ in tg], device=device)
    t_pos = torch.tensor([p for tg in targets for p, _ in tg], device=device)
    t_id = torch.tensor([a for tg in targets for _, a in tg], device=device)
    kl_rows = torch.arange(n_rewrite, len(rows), device=device)
    kl_pos = torch.tensor(lookup[n_rewrite:], device=device, dtype=torch.long)

    delta = torch.zeros(g.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm * out0.norm()
    init_kl = None
    losses = []
    for _ in range(steps):
        with torch.enable_grad(), patch(g.model, {("mlp_out", layer): lambda t: t + at.to(t.dtype) * delta.to(t.dtype)}):
            hidden = g.final_hidden(input_ids)
            logp = g.unembed(hidden[t_row, t_pos]).float().log_softmax(-1)  # [targets, vocab]
            nll = -logp.gather(1, t_id[:, None]).sum() / n_rewrite / len(answer_ids)
            loss = nll + weight_decay * delta.norm() / out0.norm() ** 2
            if len(kl_contexts):
                kl_logp = g.unembed(hidden[kl_rows, kl_pos]).float().log_softmax(-1)
                if init_kl is None:
                    init_kl = kl_logp.detach()
                loss = loss + kl_factor * torch.nn.functional.kl_div(init_kl, kl_logp, log_target=True, reduction="batchmean")
            (grad,) = torch.autograd.grad(loss, [delta])  # never touches the model's .grad
        losses.append(nll.item())
        if losses[-1] < 5e-2:
            break
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    value = out0 + delta  # v*
    # execute_rome: right vector = (v* - cur_output) / (cur_input . u)
    scale = torch.dot(k0, u)
    info = {**info, "nll": [round(x, 4) for x in losses], "steps": len(losses)}
    return RankOneEdit(g.model, layer, u / scale, delta, key=k_star, value=value, info=info)


def _edit_args(g: GPT2, layer: Any, steps: Any, lr: Any, weight_decay: Any, kl_factor: Any, clamp_norm: Any, ridge: Any):
    return dict(
        layer=check_block(layer, g.n_layer),
        steps=_int(steps, "steps", low=1),
        lr=_float(lr, "lr", low=0.0),
        weight_decay=_float(weight_decay, "weight_decay", low=0.0),
        kl_factor=_float(kl_factor, "kl_factor", low=0.0),
        clamp_norm=_float(clamp_norm, "clamp_norm", low=0.0),
        ridge=_float(ridge, "ridge", low=0.0),
    )


def rank_one_edit_ids(
    model: Any,
    input_ids: Any,
    subject_span: tuple[int, int],
    new_answer_ids: Sequence[int],
    layer: int,
    *,
    second_moment: torch.Tensor,
    prefixes: Sequence[Sequence[int]] = (),
    kl_ids: Sequence[int] | None = None,
    steps: int = 20,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    kl_factor: float = 0.0625,
    clamp_norm: float = 4.0,
    ridge: float = 1e-5,
) -> RankOneEdit:
    """ROME's edit on token ids (no tokenizer needed): see :func:`rank_one_edit`.

    The key and rewriting contexts are the prompt alone and ``prefix + prompt`` for each of
    ``prefixes`` (id lists). ``kl_ids``: optional ids of ROME's essence prompt
    (``"{subject} is a"``) starting with the subject's ``end - start`` tokens; its KL term is
    taken at the subject's last token.
    ``second_moment``: ``[d_mlp, d_mlp]`` from :func:`mlp_key_second_moment`.
    """
    g = GPT2(model)
    args = _edit_args(g, layer, steps, lr, weight_decay, kl_factor, clamp_norm, ridge)
    ids = _check_prompt_ids(g, input_ids).tolist()
    start, end = _check_span(subject_span, len(ids))
    answer = [_int(a, "new_answer_ids") for a in new_answer_ids]
    if not answer or not all(0 <= a < g.d_vocab for a in answer):
        raise ValueError(f"new_answer_ids must be non-empty token ids in 0..{g.d_vocab - 1}; got {list(new_answer_ids)}")
    _check_second_moment(g, second_moment)
    contexts = [(ids, end - 1)] + [(list(p) + ids, len(p) + end - 1) for p in prefixes]
    for ctx, _ in contexts:
        if len(ctx) + len(answer) - 1 > g.n_positions:
            raise ValueError(f"a context of {len(ctx)} tokens plus the answer exceeds n_positions={g.n_positions}")
    kl = [] if kl_ids is None else [(list(kl_ids), end - start - 1)]
    return _edit_core(g, key_contexts=contexts, answer_ids=answer, kl_contexts=kl, mom2=second_moment,
                      info={"new_answer_ids": answer}, **args)


def _check_second_moment(g: GPT2, mom2: Any) -> None:
    if not isinstance(mom2, torch.Tensor) or tuple(mom2.shape) != (g.d_mlp, g.d_mlp):
        got = tuple(mom2.shape) if isinstance(mom2, torch.Tensor) else type(mom2).__name__
        raise ValueError(f"second_moment must be a [{g.d_mlp}, {g.d_mlp}] tensor (mlp_key_second_moment); got {got}")


def rank_one_edit(
    model: Any,
    tokenizer: Any,
    prompt: str,
    subject: str,
    new_answer: str,
    layer: int,
    *,
    stats_corpus: Any,
    stats_tokens: int = 100_000,
    cache_dir: str | os.PathLike | None = None,
    context_templates: Sequence[str] | None = None,
    template_shapes: Sequence[tuple[int, int]] = ((10, 5),),
    steps: int = 20,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    kl_factor: float = 0.0625,
    clamp_norm: float = 4.0,
    ridge: float = 1e-5,
    seed: int = 0,
    progress: bool = False,
) -> RankOneEdit:
    """ROME's rank-one edit of block ``layer``'s ``c_proj``, returned unapplied.

    1. ``C = E[k k^T]`` over ``stats_corpus`` (:func:`mlp_key_second_moment`, cached;
       ``stats_tokens`` tokens; ROME: 100k Wikipedia samples).
    2. ``k*`` = mean ``c_proj`` input at the subject's last token over the context templates
       (``"{}"`` plus, as ROME, text sampled top-5 from the model after end-of-text, ``n``
       templates of ``length`` tokens per ``(length, n)`` of ``template_shapes``, each
       ``"<text>. {}"``; the default ``((10, 5),)`` is ROME's first release, its later
       hyper-parameters use ``((5, 10), (10, 10))``;
       or ``context_templates`` given as format strings with one ``{}``).
    3. ``v*`` = ``mlp_out`` at the bare prompt + ``delta``, ``delta`` optimised by Adam for
       ``steps`` steps (``lr``) to make the templated prompts continue with ``new_answer``,
       with ROME's weight decay, KL term on ``"{subject} is a"`` and norm clamp (hyper-parameters:
       ROME's GPT-2 XL ones).
    4. ``W' = W + u (v* - W k - b)^T`` with ``u = C^-1 k* / ((C^-1 k*) . k)``, ``k`` = the
       bare prompt's key (ROME's code; the paper writes ``k*`` in the denominator), so the
       bare prompt's MLP output becomes exactly ``v*``. ``ridge`` adds ``ridge x mean(diag C)``
       to ``C`` before solving (0 = ROME).

    Returns a :class:`RankOneEdit`; use ``with edit:`` or ``edit.apply()`` / ``edit.restore()``.
    """
    g = GPT2(model)
    args = _edit_args(g, layer, steps, lr, weight_decay, kl_factor, clamp_norm, ridge)
    if not isinstance(new_answer, str) or not new_answer:
        raise TypeError(f"new_answer must be a non-empty string (e.g. ' Paris', with its leading space); got {new_answer!r}")
    _prompt_ids(g, tokenizer, prompt)
    subject_span(tokenizer, prompt, subject)
    answer = _encode(tokenizer, new_answer)
    if context_templates is None:
        start_id = getattr(tokenizer, "eos_token_id", None)
        start_id = 0 if start_id is None else start_id
        prefixes = _sample_prefixes(g, start_id, template_shapes, _int(seed, "seed"))
        context_templates = ["{}"] + [tokenizer.decode(p).replace("{", " ").replace("}", " ") + ". {}" for p in prefixes]
    else:
        context_templates = list(context_templates)
        if not all(isinstance(t, str) and t.count("{}") == 1 for t in context_templates):
            raise ValueError("context_templates must be format strings with exactly one '{}' (e.g. 'It is said that {}')")
        if "{}" not in context_templates:
            context_templates = ["{}"] + context_templates
        else:
            context_templates.remove("{}")
            context_templates = ["{}"] + context_templates
    contexts = []
    for template in context_templates:
        text = template.format(prompt)
        offset = template.index("{}")
        ids = _encode(tokenizer, text)
        at = text.find(subject, offset)  # the subject inside the prompt part
        if at < 0:
            raise ValueError(f"subject={subject!r} does not occur in prompt={prompt!r}")
        contexts.append((ids, _token_span(tokenizer, text, at, at + len(subject))[1] - 1))
        if len(ids) + len(answer) - 1 > g.n_positions:
            raise ValueError(f"context {text!r} plus the answer exceeds n_positions={g.n_positions}")
    kl_text = f"{subject} is a"
    kl = [(_encode(tokenizer, kl_text), subject_span(tokenizer, kl_text, subject)[1] - 1)]
    mom2 = mlp_key_second_moment(model, args["layer"], stats_corpus, tokenizer=tokenizer, max_tokens=stats_tokens,
                                 cache_dir=cache_dir, progress=progress)
    return _edit_core(g, key_contexts=contexts, answer_ids=answer, kl_contexts=kl, mom2=mom2,
                      info={"prompt": prompt, "subject": subject, "new_answer": new_answer,
                            "templates": len(contexts)}, **args)
