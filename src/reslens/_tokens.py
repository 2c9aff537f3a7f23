"""Token ids to readable strings, one helper for every result that shows tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["token_strings", "decode_each", "text_pieces", "readable"]


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> bytes (the table GPT-2's and Llama-3-style tokenizers use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTES = _byte_decoder()


def readable(tokenizer: Any, token_id: int) -> str:
    r"""The decoded token, or its bytes written ``\xNN`` when it is a fragment of a character (``�``)."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return text
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not all(ch in _BYTES for ch in piece):
        return text
    raw = bytes(_BYTES[ch] for ch in piece)
    return raw.decode("utf-8", errors="backslashreplace")


def token_strings(tokenizer: Any, *id_tensors: torch.Tensor | None) -> dict[int, str] | None:
    """``{id: readable string}`` of every id ``>= 0`` in the tensors (``None`` without a tokenizer)."""
    if tokenizer is None:
        return None
    parts = [t.flatten() for t in id_tensors if t is not None]
    if not parts:
        return {}
    ids = torch.cat(parts).unique().tolist()
    return {int(i): readable(tokenizer, i) for i in ids if i >= 0}


def decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded alone (its number as a string without a tokenizer)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [readable(tokenizer, i) for i in ids]


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
