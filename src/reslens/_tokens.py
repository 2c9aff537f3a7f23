"""Token ids to readable strings, one helper for every result that shows tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["token_strings", "decode_each", "text_pieces"]


def token_strings(tokenizer: Any, *id_tensors: torch.Tensor | None) -> dict[int, str] | None:
    """``{id: decoded string}`` of every id ``>= 0`` in the tensors (``None`` without a tokenizer)."""
    if tokenizer is None:
        return None
    parts = [t.flatten() for t in id_tensors if t is not None]
    if not parts:
        return {}
    ids = torch.cat(parts).unique().tolist()
    return {int(i): tokenizer.decode([int(i)]) for i in ids if i >= 0}


def decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded alone (its number as a string without a tokenizer)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def text_pieces(tokenizer: Any, text: str, ids: Sequence[int]) -> list[str]:
    """Each token's piece of ``text`` (from the offset mapping).

    A character split across byte-level tokens shows as itself instead of a replacement character; decoded
    tokens otherwise.
    """
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(ids):
            return [text[s:e] for s, e in offsets]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        pass
    return decode_each(tokenizer, ids)
