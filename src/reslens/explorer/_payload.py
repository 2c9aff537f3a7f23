"""What a page carries, reduced to compact JSON: a token-string table, typed arrays in base64, small lists.

Arrays travel as ``{"t": type, "s": shape, "b": base64}`` of little-endian bytes (``"f2"`` float16, about
3 significant digits, NaN kept; ``"u1"``, ``"u2"``, ``"u4"``, ``"i4"``); the page decodes them into typed
arrays once. Tokens travel once, as strings in :class:`Tokens`' table, and everywhere else as indices into
it. The traced (:class:`~reslens.tracing.TraceResult`) and head-score views are small and travel as
rounded JSON numbers, except the attention patterns (``"u1"``: 0..255 for 0..1).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Tokens", "pack", "ranks", "log_probs", "log_ranks", "RANK_CAP", "trace_view", "heads_view"]

#: ranks are carried as uint16: a rank at or above this is shown as "≥ 65535"
RANK_CAP = 65535
_TYPES = {"f2": np.float16, "u1": np.uint8, "u2": np.uint16, "u4": np.uint32, "i4": np.int32}


def pack(values: Any, kind: str) -> dict[str, Any]:
    """``values`` (a tensor or array) as ``{"t": kind, "s": shape, "b": base64 little-endian bytes}``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().float().numpy() if values.is_floating_point() else values.cpu().numpy()
    array = np.ascontiguousarray(np.asarray(values).astype(np.dtype(_TYPES[kind]).newbyteorder("<")))
    return {"t": kind, "s": list(array.shape), "b": base64.b64encode(array.tobytes()).decode("ascii")}


def log_probs(p: torch.Tensor) -> dict[str, Any]:
    """Probabilities at a chart's precision, uint8 on a log scale: ``p = 10**(8 (q - 255) / 254)``.

    (``q = 1..255`` for 1e-8 .. 1, steps of 7.5%; 0 = unknown). For lines across layers, not for numbers
    read off a tooltip.
    """
    q = (255 + 254 / 8 * p.float().clamp(min=1e-8).log10()).round().clamp(1, 255)
    return pack(torch.where(p.isnan(), 0, q), "u1")


def log_ranks(r: torch.Tensor) -> dict[str, Any]:
    """Ranks at a chart's precision, uint8 on a log scale: ``q = 255 log(r + 1) / log(65536)`` (255 = cap).

    Exact below about 20, within 2.2% above.
    """
    r = r.long().clone()
    r[(r < 0) | (r > RANK_CAP)] = RANK_CAP
    return pack((255 * (r.double() + 1).log() / math.log(65536)).round(), "u1")


def ranks(values: torch.Tensor) -> dict[str, Any]:
    """Ranks as uint16, capped at :data:`RANK_CAP` (-1, a pad or non-finite cell, becomes the cap too)."""
    r = values.long().clone()
    r[(r < 0) | (r > RANK_CAP)] = RANK_CAP
    return pack(r, "u2")


class Tokens:
    """The page's token table: every token string once; ids become indices into it (-1 stays -1)."""

    def __init__(self, name_of: Any) -> None:
        self._name_of = name_of  # token id -> its string
        self.strings: list[str] = []
        self._index: dict[int, int] = {}

    def index(self, ids: Any) -> np.ndarray:
        """The table index of every id in ``ids`` (any shape; -1 for ids below 0)."""
        flat = torch.as_tensor(ids).flatten().tolist()
        out = np.empty(len(flat), dtype=np.int64)
        for i, token in enumerate(flat):
            if token < 0:
                out[i] = -1
                continue
            at = self._index.get(token)
            if at is None:
                at = self._index[token] = len(self.strings)
                self.strings.append(self._name_of(token))
            out[i] = at
        return out.reshape(tuple(torch.as_tensor(ids).shape))

    def pack(self, ids: Any) -> dict[str, Any]:
        """``ids`` as table indices: uint16 while the table is small enough, else uint32 (-1 -> max)."""
        index = self.index(ids)
        kind = "u2" if len(self.strings) < 65535 else "u4"
        index[index < 0] = 65535 if kind == "u2" else 2**32 - 1
        return pack(index, kind)


def _round(values: torch.Tensor, digits: int = 6) -> list:
    """``[rows, columns]`` as lists of numbers of ``digits`` significant digits (None for NaN)."""
    return [[None if v != v else float(f"{v:.{digits}g}") for v in row] for row in values.float().tolist()]


def trace_view(traces: Sequence[Any]) -> dict[str, Any]:
    """The causal-trace view of one prompt's traces (one heatmap each: hidden state, MLP, attention)."""
    first = traces[0]
    for t in traces[1:]:
        if t.tokens != first.tokens or t.answer_id != first.answer_id:
            raise ValueError("traces must be of one prompt and one answer (the same tokens and answer); got "
                             f"{list(first.tokens)} -> {first.answer!r} and {list(t.tokens)} -> {t.answer!r}")
    return {
        "kind": "trace", "tokens": list(first.tokens), "subject": list(first.subject_span),
        "answer": first.answer, "clean": first.clean_prob, "corrupted": first.corrupted_prob,
        "maps": [{"kind": t.kind, "label": t.label + (f" (window {t.window})" if t.kind != "resid" else ""),
                  "restored": _round(t.restored_prob)} for t in traces],
    }


def heads_view(scores: Sequence[Any], pattern: torch.Tensor | None, tokens: Sequence[str] | None,
               ) -> dict[str, Any]:
    """The head view: each score's ``[n_layer, n_head]`` grid, and one prompt's pattern per head.

    ``pattern: [n_layer, n_head, query, key]`` (0..1), carried as uint8; ``tokens``: its positions' text.
    """
    view: dict[str, Any] = {
        "kind": "heads",
        "scores": [{"name": s.name, "description": s.description, "values": _round(s.scores)}
                   for s in scores],
    }
    if pattern is not None:
        quantised = (pattern.float().clamp(0, 1) * 255).round()
        view["pattern"] = pack(quantised, "u1")
        view["tokens"] = list(tokens) if tokens is not None else [str(i) for i in range(pattern.shape[-1])]
    return view
