"""The trigger index: for every (layer, key), the corpus examples on which that key fires most.

:func:`reslens.kv_memory.mine_triggers` builds a :class:`TriggerIndex`; it is saved as one
safetensors file (tensors and metadata together, written atomically) and checked for
consistency whenever one is built or loaded, so a saved index is either whole or refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_choice, check_int
from reslens._corpus import UNITS
from reslens._saving import Saveable
from reslens._text import html_table, pandas
from reslens._tokens import decode_each

__all__ = ["Trigger", "TriggerIndex"]


@dataclass(frozen=True)
class Trigger:
    """One of a key's top examples.

    ``rank`` in the key's list (0 = best), the key's ``score`` over the example (its largest
    coefficient; in a signed index the coefficient of largest magnitude, with its sign: a
    negative score wrote ``-v``), the ``example`` number, the activating ``position``, the
    ``prefix`` ids (ending at the activating token) and the id of the token after it
    (``next_token``; ``None`` at the end of the example).
    """

    rank: int
    score: float
    example: int
    position: int
    prefix: tuple[int, ...]
    next_token: int | None

    def __repr__(self) -> str:
        shown = ", ".join(map(str, self.prefix[-4:]))
        prefix = f"[{'…, ' if len(self.prefix) > 4 else ''}{shown}] ({len(self.prefix)} ids)"
        return (f"Trigger(rank={self.rank}, score={self.score:+.4g}, example={self.example}, "
                f"position={self.position}, prefix={prefix}, next_token={self.next_token})")

    def _repr_html_(self) -> str:
        """The fields; the prefix as ids (its last 16; decode them with the tokenizer mined with)."""
        ids = " ".join(map(str, self.prefix[-16:]))
        rows = [("rank", self.rank), ("score", self.score), ("example", self.example),
                ("position", self.position), ("prefix ids", ("… " if len(self.prefix) > 16 else "") + ids),
                ("next token id", "none (end of example)" if self.next_token is None else self.next_token)]
        return html_table("Trigger", (), rows)


@dataclass(frozen=True, repr=False)
class TriggerIndex(Saveable):
    """For every (layer, key), the ``top_k`` corpus examples on which that key fires most.

    An example is one unit of the corpus (a sentence, or a window of tokens); its score for a
    key is the key's largest coefficient ``m_i`` over the example's positions (``signed=True``:
    the coefficient of largest ``|m_i|``, sign kept; see :func:`~reslens.kv_memory.mine_triggers`),
    and the trigger is the prefix up to that position (Geva et al. 2021). ``L = len(layers)``.

    - ``scores: [L, d_mlp, top_k]`` float32, descending (signed: ``|scores|`` descending; ``-inf``
      = empty slot)
    - ``example: [L, d_mlp, top_k]`` example number in corpus order (``-1`` = empty)
    - ``position: [L, d_mlp, top_k]`` the activating position in that example (``-1`` = empty)
    - ``example_ids: [E]`` (ascending), ``example_offsets: [E + 1]``, ``example_tokens: [N]``:
      the token ids of the ``E`` examples some slot refers to (nothing else is kept)
    - ``n_examples``, ``n_tokens``: how much of the corpus has been read (for resuming)
    - ``unit``, ``window``: how the corpus was cut into examples; ``start_ids``: the tokenizer's
      start tokens put before every example (not stored in it, not counted; ``()`` for none)
    - ``signed``: examples ranked by ``|m|`` with the sign kept (the default for gated MLPs)
    - ``n_layer``, ``d_model``, ``d_vocab``, ``model_name``: the model mined
    - ``model_fingerprint``: SHA-256 of every weight that shapes the mined keys
    - ``corpus``: where the texts came from (in words); ``corpus_fingerprint``: SHA-256 of the
      token ids of the ``n_examples`` units read, so a resume can check it reads the same corpus
    """

    layers: tuple[int, ...]
    top_k: int
    scores: torch.Tensor
    example: torch.Tensor
    position: torch.Tensor
    example_ids: torch.Tensor
    example_offsets: torch.Tensor
    example_tokens: torch.Tensor
    n_examples: int
    n_tokens: int
    unit: str
    window: int
    n_layer: int
    d_model: int
    d_vocab: int
    model_name: str = ""
    model_fingerprint: str = ""
    corpus: str = ""
    corpus_fingerprint: str = ""
    signed: bool = False
    start_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def d_mlp(self) -> int:
        """Keys per layer (the model's MLP width)."""
        return self.scores.shape[1]

    def _row(self, layer: int) -> int:
        check_int(layer, "layer")
        if layer not in self.layers:
            raise ValueError(f"layer={layer} was not mined; this index has layers {list(self.layers)}")
        return self.layers.index(layer)

    def tokens(self, example: int) -> list[int]:
        """Token ids of one stored example."""
        check_int(example, "example", low=0)
        where = (self.example_ids == example).nonzero().flatten()
        if not len(where):
            raise ValueError(f"example {example} is not stored (only examples in some top-k list are kept)")
        i = int(where[0])
        return self.example_tokens[self.example_offsets[i] : self.example_offsets[i + 1]].tolist()

    def triggers(self, layer: int, key: int, n: int | None = None) -> list[Trigger]:
        """The key's top examples, best first, each a :class:`Trigger`."""
        row = self._row(layer)
        check_int(key, "key", low=0, high=self.d_mlp - 1)
        n = self.top_k if n is None else min(check_int(n, "n", low=1), self.top_k)
        out = []
        for slot in range(n):
            example = int(self.example[row, key, slot])
            if example < 0:
                break
            pos = int(self.position[row, key, slot])
            ids = self.tokens(example)
            nxt = ids[pos + 1] if pos + 1 < len(ids) else None
            out.append(Trigger(rank=slot, score=float(self.scores[row, key, slot]), example=example,
                               position=pos, prefix=tuple(ids[: pos + 1]), next_token=nxt))
        return out

    def format(self, layer: int, key: int, n: int = 10, *, tokenizer: Any = None, width: int = 90) -> str:
        """The top prefixes, the activating token in ``[[ ]]``, the next token after ``→``.

        Without a ``tokenizer`` the token ids are shown as numbers.
        """
        check_int(width, "width", low=20)
        by = ", by |m|, signed" if self.signed else ""
        lines = [f"L{layer}N{key}: top {n} of {self.n_examples} {self.unit}s ({self.n_tokens} tokens{by})"]
        for t in self.triggers(layer, key, n):
            lines.append(_format_trigger(t, tokenizer, width))
        return "\n".join(lines)

    def show(self, layer: int, key: int, n: int = 10, *, tokenizer: Any = None, width: int = 90) -> None:
        """Print :meth:`format` (pass the ``tokenizer`` the index was mined with to see text)."""
        print(self.format(layer, key, n, tokenizer=tokenizer, width=width))

    def to_frame(self, layer: int | None = None):
        """``pandas.DataFrame``: one row per filled (layer, key, rank) slot."""
        pd = pandas("TriggerIndex.to_frame")
        rows = [self._row(layer)] if layer is not None else range(len(self.layers))
        frames = []
        for r in rows:
            key, rank = (self.example[r] >= 0).nonzero(as_tuple=True)
            frames.append(pd.DataFrame({
                "layer": self.layers[r], "key": key.numpy(), "rank": rank.numpy(),
                "score": self.scores[r, key, rank].numpy(), "example": self.example[r, key, rank].numpy(),
                "position": self.position[r, key, rank].numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TriggerIndex:
        """Read an index written by :meth:`save` (one safetensors file); an inconsistent one is refused."""
        folder = Path(os.fspath(path))
        if folder.is_dir() and (folder / "index.json").is_file():
            raise ValueError(
                f"{os.fspath(path)!r} is a trigger index folder in the old two-file format, which could not "
                "be saved atomically; mine it again (a TriggerIndex is now one .safetensors file)"
            )
        return super().load(path, device=device)

    def describe(self) -> str:
        """One line: what was mined, how much corpus was read, and from where."""
        by = " by |m| (signed)" if self.signed else ""
        return (f"layers {list(self.layers)}, top {self.top_k} per key{by}, {self.n_examples} {self.unit}s "
                f"({self.n_tokens} tokens) of {self.corpus or 'an unnamed corpus'}")

    def __repr__(self) -> str:
        return (f"TriggerIndex(layers={list(self.layers)}, d_mlp={self.d_mlp}, top_k={self.top_k}, "
                f"{self.n_examples} {self.unit}s, {self.n_tokens} tokens)")

    def _repr_html_(self) -> str:
        rows = [("layers", list(self.layers)), ("keys per layer", self.d_mlp), ("top_k", self.top_k),
                ("examples read", f"{self.n_examples} {self.unit}s"), ("tokens read", self.n_tokens),
                ("examples stored", len(self.example_ids)),
                ("ranked by", "|m|, signed" if self.signed else "m"), ("corpus", self.corpus),
                ("model", self.model_name)]
        return html_table("TriggerIndex", ("", ""), rows)


def _format_trigger(t: Trigger, tokenizer: Any, width: int) -> str:
    if tokenizer is not None:
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids)
    else:
        def decode(ids: list[int]) -> str:
            return " ".join(decode_each(None, ids))
    prefix = list(t.prefix)
    before, token = _split_last(decode, prefix)
    after = "" if t.next_token is None else " → " + repr(decode_each(tokenizer, [t.next_token])[0])
    if "\ufffd" in token and t.next_token is not None:  # the first bytes of a character the next token ends
        token = _split_last(decode, [*prefix, t.next_token])[1] + " (first bytes)"
        after = " → (its last bytes)"
    before, token = before.replace("\n", "⏎"), token.replace("\n", "⏎")
    room = max(10, width - len(token) - len(after) - 12)
    before = before if len(before) <= room else "…" + before[-room:]
    return f"{t.score:7.3f}  {before}[[{token}]]{after}"


def _split_last(decode: Any, ids: list[int]) -> tuple[str, str]:
    """Text before the last token, and the last token's text.

    A token that completes a multi-byte character (GPT-2's byte-level BPE splits curly quotes)
    shows that character.
    """
    full, before = decode(ids), decode(ids[:-1])
    stem = before.rstrip("\ufffd")
    if full.startswith(stem) and len(full) > len(stem):
        return stem, full[len(stem):]
    return before, decode(ids[-1:])


# --- consistency ----------------------------------------------------------------------------------


def _validate(index: TriggerIndex) -> None:
    """Refuse an index whose counts, shapes or slots contradict each other (a tampered or broken file)."""
    lows = {"top_k": 1, "n_examples": 0, "n_tokens": 0, "window": 2, "n_layer": 1, "d_model": 1, "d_vocab": 1}
    for name, low in lows.items():
        check_int(getattr(index, name), name, low=low)
    check_choice(index.unit, UNITS, "unit")
    if not isinstance(index.signed, bool):
        raise TypeError(f"signed must be True or False; got {index.signed!r}")
    start = index.start_ids
    if not isinstance(start, tuple) or not all(isinstance(i, int) and 0 <= i < index.d_vocab for i in start):
        raise ValueError(f"start_ids={start!r} must be a tuple of token ids in 0..d_vocab - 1")
    layers = list(index.layers)
    in_range = bool(layers) and all(isinstance(la, int) and 0 <= la < index.n_layer for la in layers)
    if not in_range or layers != sorted(set(layers)):
        raise ValueError(f"layers={layers} must be sorted unique blocks in 0..{index.n_layer - 1}")
    shape = (len(index.layers), index.scores.shape[1] if index.scores.ndim == 3 else -1, index.top_k)
    for name, dtype in (("scores", torch.float32), ("example", torch.int64), ("position", torch.int64)):
        t = getattr(index, name)
        if t.ndim != 3 or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}; expected {dtype} "
                             f"[len(layers), d_mlp, top_k] = {shape}")
    for name in ("example_ids", "example_offsets", "example_tokens"):
        t = getattr(index, name)
        if t.ndim != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor; got {t.dtype} {tuple(t.shape)}")
    _validate_examples(index)
    _validate_slots(index)


def _validate_examples(index: TriggerIndex) -> None:
    ids, offsets, tokens = index.example_ids, index.example_offsets, index.example_tokens
    if len(offsets) != len(ids) + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(tokens):
        raise ValueError(f"example_offsets must run from 0 to len(example_tokens)={len(tokens)} with one "
                         f"more entry than example_ids ({len(ids)})")
    lengths = offsets.diff()
    if len(ids) and (bool((ids.diff() <= 0).any()) or int(ids[0]) < 0 or int(ids[-1]) >= index.n_examples):
        raise ValueError(f"example_ids must ascend strictly within 0..n_examples - 1 = "
                         f"{index.n_examples - 1}")
    if len(ids) and (int(lengths.min()) < 2 or int(lengths.max()) > index.window):
        raise ValueError(f"stored examples must have 2..window={index.window} tokens")
    if len(tokens) > index.n_tokens:
        raise ValueError(f"the {len(ids)} stored examples hold {len(tokens)} tokens, more than n_tokens="
                         f"{index.n_tokens} read")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= index.d_vocab):
        raise ValueError(f"example_tokens must be token ids in 0..d_vocab - 1 = {index.d_vocab - 1}")


def _validate_slots(index: TriggerIndex) -> None:
    example, position, scores = index.example, index.position, index.scores
    filled = example >= 0
    if bool((example < -1).any()) or bool((filled[..., 1:] & ~filled[..., :-1]).any()):
        raise ValueError("example slots must be example numbers, then -1 for the empty ones at the end")
    if bool((~filled & ((position != -1) | (scores != float("-inf")))).any()):
        raise ValueError("empty slots (example -1) must have position -1 and score -inf")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores hold NaN (the model's coefficients were not finite)")
    if index.signed:
        rank = torch.where(filled, scores.abs(), float("-inf"))
        if bool((rank[..., 1:] > rank[..., :-1]).any()):
            raise ValueError("a signed index's |scores| must descend along each key's top_k slots")
    elif bool((scores[..., 1:] > scores[..., :-1]).any()):
        raise ValueError("scores must descend along each key's top_k slots")
    used = example[filled]
    slot = torch.searchsorted(index.example_ids, used)
    stored = index.example_ids
    if len(used) and (int(slot.max()) >= len(stored) or not torch.equal(stored[slot], used)):
        raise ValueError("a slot refers to an example that is not stored")
    if len(used):
        lengths = index.example_offsets.diff()[slot]
        pos = position[filled]
        if bool(((pos < 0) | (pos >= lengths)).any()):
            raise ValueError("a slot's position lies outside its example")
    ordered = example.masked_fill(~filled, -1).sort(dim=-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise ValueError("a key lists the same example twice")
