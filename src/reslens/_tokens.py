"""The one token vocabulary: tokens asked for (an id or one token's text) and token ids shown as text.

Wherever reslens asks for a token (a lens target, a traced answer, an attribution target, the token a
memory's contribution is read for), :func:`token_id` resolves it by one rule: an int is an id of the
vocabulary; a string is a token's text as it follows what comes before it (``" Paris"``, with its
space), which must encode, without special tokens, to exactly one token. :func:`token_ids` gives one
id per sequence by the same rule. Ids go back to readable text through :func:`readable`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from reslens._inputs import encode

__all__ = ["token_id", "token_ids", "token_strings", "decode_each", "text_pieces", "readable"]

_EXPECTED = "a token id (an int) or one token's text (a str, e.g. ' Paris' with its leading space)"


def token_id(token: Any, *, d_vocab: int, tokenizer: Any = None, name: str = "token") -> int:
    """The vocabulary id of ``token``: an id in ``0..d_vocab - 1``, or the text of exactly one token.

    A string needs ``tokenizer``; it is encoded without special tokens and must give exactly one
    token (the error shows the tokens it splits into). Errors name the parameter (``name``).

    >>> token_id(7, d_vocab=50, name="target")
    7
    >>> token_id(50, d_vocab=50, name="target")
    Traceback (most recent call last):
    ValueError: target=50 is out of range for the vocabulary (expected 0..49)
    """
    if isinstance(token, str):
        token = _one_token(token, tokenizer, name)
    elif isinstance(token, torch.Tensor) and token.ndim == 0 and not (
        token.dtype.is_floating_point or token.dtype.is_complex or token.dtype == torch.bool
    ):
        token = int(token)
    if isinstance(token, bool) or not isinstance(token, numbers.Integral):
        raise TypeError(f"{name} must be {_EXPECTED}; got {token!r} ({type(token).__name__})")
    if not 0 <= token < d_vocab:
        raise ValueError(f"{name}={token} is out of range for the vocabulary (expected 0..{d_vocab - 1})")
    return int(token)


def _one_token(text: str, tokenizer: Any, name: str) -> int:
    if tokenizer is None:
        raise TypeError(f"{name}={text!r} is text, so tokenizer= is required (or pass its id)")
    if not text:
        raise ValueError(f"{name} is an empty string; give {_EXPECTED}")
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        pieces = [readable(tokenizer, i) for i in ids]
        first = f", e.g. {name}={pieces[0]!r} (its first)" if pieces else ""
        if not text[:1].isspace() and len(encode(tokenizer, " " + text)) == 1:
            first = f"; with the leading space a word takes after a prompt, {name}={' ' + text!r} is one"
        raise ValueError(f"{name}={text!r} is {len(ids)} tokens {pieces}, not one: give the text of exactly "
                         f"one token or its id{first}")
    return ids[0]


def token_ids(tokens: Any, n: int, *, d_vocab: int, tokenizer: Any = None,
              name: str = "token") -> torch.Tensor:
    """One id per sequence ``[n]`` (long): one token for every sequence, or a sequence of ``n`` tokens.

    Each token is resolved by :func:`token_id` (an id or one token's text); a 1-D integer tensor of
    ``1`` or ``n`` ids works too.
    """
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 1:
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids; got a tensor of dtype {tokens.dtype}")
        tokens = tokens.tolist()
    if isinstance(tokens, (str, numbers.Integral, torch.Tensor)):
        return torch.full((n,), token_id(tokens, d_vocab=d_vocab, tokenizer=tokenizer, name=name))
    if not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be {_EXPECTED}, or one per sequence; got {type(tokens).__name__}")
    if len(tokens) not in (1, n):
        raise ValueError(f"{name} must be one token or {n} (one per sequence); got {len(tokens)}")
    ids = [token_id(t, d_vocab=d_vocab, tokenizer=tokenizer, name=f"{name}[{i}]")
           for i, t in enumerate(tokens)]
    return torch.tensor(ids * (n if len(ids) == 1 else 1), dtype=torch.long)


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
