"""Inputs: token ids with their padding mask and positions (:class:`Batch`), tokenizing and padding.

Pure functions of tokenizers and tensors; :func:`as_batch` turns whatever a public function
was given (ids, a Batch, a tokenizer output, text) into a checked Batch on the model's device.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_choice, check_ids, check_mask, check_tokenizer
from reslens._text import html_table

__all__ = ["Batch", "tokenize", "pad_ids", "pad_token_id", "as_batch", "positions_from_mask"]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, pos]`` that count real tokens only (0 for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Batch:
    """Token ids with their padding mask and the positions the model sees.

    ``input_ids: [batch, pos]`` (int64), ``attention_mask: [batch, pos]`` (bool, True = real
    token), ``position_ids: [batch, pos]`` (default: counted from the mask, so padding on
    either side gives each sequence the positions of running it alone), ``special_mask:
    [batch, pos]`` (bool, True = a special token such as BOS that :func:`tokenize` added by the
    tokenizer's convention; analyses leave these out of statistics as they leave out pads).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor = None  # type: ignore[assignment]
    special_mask: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, torch.Tensor) or self.input_ids.ndim != 2:
            got = (
                tuple(self.input_ids.shape)
                if isinstance(self.input_ids, torch.Tensor)
                else type(self.input_ids)
            )
            raise ValueError(f"Batch.input_ids must be a 2-D tensor [batch, pos]; got {got}")
        if (
            self.input_ids.dtype.is_floating_point
            or self.input_ids.dtype.is_complex
            or self.input_ids.dtype == torch.bool
        ):
            raise TypeError(f"Batch.input_ids must hold integer token ids; got dtype {self.input_ids.dtype}")
        object.__setattr__(self, "input_ids", self.input_ids.long())
        mask = check_mask(self.attention_mask, self.input_ids, name="Batch.attention_mask")
        object.__setattr__(self, "attention_mask", mask)
        if self.position_ids is None:
            object.__setattr__(self, "position_ids", positions_from_mask(mask))
        elif (
            not isinstance(self.position_ids, torch.Tensor) or self.position_ids.shape != self.input_ids.shape
        ):
            raise ValueError(
                f"Batch.position_ids must be a tensor shaped like input_ids {tuple(self.input_ids.shape)}"
            )
        elif self.position_ids.dtype.is_floating_point or self.position_ids.dtype == torch.bool:
            raise TypeError(f"Batch.position_ids must hold integers; got dtype {self.position_ids.dtype}")
        else:
            object.__setattr__(self, "position_ids", self.position_ids.long())
        if self.special_mask is None:
            object.__setattr__(self, "special_mask", torch.zeros_like(mask))
        elif not isinstance(self.special_mask, torch.Tensor) or self.special_mask.shape != mask.shape:
            raise ValueError(f"Batch.special_mask must be a bool tensor shaped {tuple(mask.shape)}")
        else:
            object.__setattr__(self, "special_mask", self.special_mask.bool() & mask)

    @property
    def stat_mask(self) -> torch.Tensor:
        """``[batch, pos]`` bool: the positions statistics count (real tokens that are not special)."""
        return self.attention_mask & ~self.special_mask

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Batch:
        """A batch from ids ``[batch, pos]``; no mask means every token is real."""
        if attention_mask is None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor; got {type(input_ids).__name__}")
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return cls(input_ids, attention_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        n_real = int(self.lengths.sum())
        return f"Batch({len(self)} sequences x {self.input_ids.shape[1]} positions, {n_real} real tokens)"

    def _repr_html_(self) -> str:
        """The first 10 sequences: real tokens, start tokens, and the real ids (the first 24)."""
        rows = []
        for seq in range(min(10, len(self))):
            ids = self.input_ids[seq][self.attention_mask[seq]].tolist()
            shown = " ".join(map(str, ids[:24])) + (" …" if len(ids) > 24 else "")
            rows.append((seq, len(ids), int(self.special_mask[seq].sum()), shown))
        return html_table(repr(self), ("seq", "real tokens", "start tokens", "ids"), rows)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens per sequence ``[batch]``."""
        return self.attention_mask.sum(-1)

    def to(self, device: str | torch.device) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        tensors = (self.input_ids, self.attention_mask, self.position_ids, self.special_mask)
        if all(t.device == torch.device(device) for t in tensors):
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.special_mask.to(device))


def tokenize(tokenizer: Any, texts: str | Sequence[str], *, padding_side: str = "right",
             special_tokens: bool | None = None) -> Batch:
    """Tokenize texts one by one and pad them into a :class:`Batch`.

    ``special_tokens=None`` follows the tokenizer's own convention: whatever special tokens it adds
    at the start of a text (BOS for Llama-style tokenizers that add one; nothing for GPT-2 or
    SmolLM2) are kept and marked in ``Batch.special_mask``; ``False`` adds none, ``True`` asks the
    tokenizer to add its special tokens. Padding uses the tokenizer's pad id (its end-of-text id for
    GPT-2, which has no pad token); the mask marks pads, so their id never matters.

    ``tokenize(tokenizer, ["The cat", "A much longer text"], padding_side="left")`` gives a
    ``[2, n]`` batch whose first row starts with pads.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a sequence of strings")
    if not texts:
        raise ValueError("texts is empty; give at least one string")
    check_choice(padding_side, ("left", "right"), "padding_side")
    check_choice(special_tokens, (None, True, False), "special_tokens")
    check_tokenizer(tokenizer, why="texts are tokenized")
    encoded, n_special = [], []
    for text in texts:
        plain = encode(tokenizer, text)
        ids = plain if special_tokens is False else encode(tokenizer, text, special_tokens=True)
        prefix = len(ids) - len(plain) if ids[len(ids) - len(plain):] == plain else 0
        encoded.append(ids)
        n_special.append(prefix)
    empty = [i for i, ids in enumerate(encoded) if len(ids) == n_special[i]]
    if empty:
        raise ValueError(f"texts {empty} tokenize to no tokens; every text needs at least one token")
    batch = pad_ids(encoded, pad_id=pad_token_id(tokenizer), padding_side=padding_side)
    if any(n_special):
        special = torch.zeros_like(batch.attention_mask)
        first = batch.attention_mask.long().argmax(-1)  # the first real position of each row
        for row, n in enumerate(n_special):
            special[row, first[row] : first[row] + n] = True
        batch = Batch(batch.input_ids, batch.attention_mask, batch.position_ids, special)
    return batch


def encode(tokenizer: Any, text: str, *, special_tokens: bool = False) -> list[int]:
    """The token ids of ``text`` (special tokens only with ``special_tokens=True``), for texts of any length.

    ``verbose=False`` keeps the tokenizer's "sequence length is longer than the specified
    maximum" warning quiet: reslens splits or refuses long inputs itself, against the model's context.
    """
    quiet = {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}  # a HuggingFace tokenizer
    return list(tokenizer(text, add_special_tokens=special_tokens, **quiet)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its end-of-text id, else 0."""
    ids = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
    return next((i for i in ids if i is not None), 0)


def pad_ids(encoded: Sequence[Sequence[int]], *, pad_id: int = 0, padding_side: str = "right") -> Batch:
    """Token id lists of any lengths -> a padded :class:`Batch` ``[len(encoded), longest]``."""
    n_pos = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), n_pos), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), n_pos), dtype=torch.bool)
    for row, ids in enumerate(encoded):
        span = slice(n_pos - len(ids), n_pos) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = True
    return Batch(input_ids, attention_mask)


def _is_texts(inputs: Any) -> bool:
    return isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and len(inputs) > 0 and all(isinstance(t, str) for t in inputs)
    )


def caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside reslens, for a warning raised by the caller of this."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _special_ids(tokenizer: Any, config: Any, *names: str) -> set[int]:
    found: set[int] = set()
    for source in (tokenizer, config):
        for name in names:
            value = getattr(source, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]  # Llama 3 lists its end ids
            found.update(v for v in values if isinstance(v, int))
    return found


def _warn_unmasked_pads(input_ids: torch.Tensor, arch: Any, tokenizer: Any) -> None:
    """Warn when ids given without a mask start or end with a run of the pad id: the pads count as tokens.

    The pad id is the tokenizer's, else the model config's, else the end-of-text id (GPT-2 has no pad
    and is padded with it). One pad is enough only for a tokenizer's own pad token; a pad id that is
    also a real token (end-of-text, start, unknown: GPT-2's and SmolLM2's are), or that only the model
    config names (it may be any token), counts only as a run of two or more.
    """
    config = getattr(arch, "config", None)
    own = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(config, "pad_token_id", None) if own is None else own
    if pad is None:
        pad = min(_special_ids(tokenizer, config, "eos_token_id"), default=None)
    if not isinstance(pad, int) or input_ids.ndim != 2 or input_ids.numel() == 0:
        return
    shared = own is None or pad in _special_ids(tokenizer, config, "eos_token_id", "bos_token_id",
                                                "unk_token_id")
    is_pad = (input_ids == pad).long()  # [batch, pos]
    run = torch.maximum(is_pad.cumprod(-1).sum(-1), is_pad.flip(-1).cumprod(-1).sum(-1))  # [batch]
    if int(run.max()) >= (2 if shared else 1):
        row = int(run.argmax())
        warnings.warn(
            f"input_ids came without an attention_mask, and row {row} starts or ends with {int(run[row])} "
            f"pad tokens (id {pad}): they are read as real tokens. Pass the attention_mask with them (a "
            "tokenizer output, or a reslens Batch), or text with tokenizer= (reslens.tokenize pads and "
            "masks)",
            UserWarning, stacklevel=caller_stacklevel(),
        )


def as_batch(inputs: Any, arch: Any, tokenizer: Any = None) -> Batch:
    """Turn ids, a :class:`Batch`, a tokenizer output mapping, or text into a checked Batch.

    The batch is checked against the model of ``arch`` (the adapter), once: vocabulary, context and
    positions; it comes back on the model's device, ready for :func:`reslens.hooks._capture`.
    """
    d_vocab, n_ctx = arch.d_vocab, arch.n_ctx
    if isinstance(inputs, Batch):
        batch = inputs
        check_ids(batch.input_ids, d_vocab=d_vocab, n_ctx=n_ctx)
    elif isinstance(inputs, torch.Tensor):
        batch = Batch.from_ids(check_ids(inputs, d_vocab=d_vocab, n_ctx=n_ctx))
        _warn_unmasked_pads(batch.input_ids, arch, tokenizer)
    elif isinstance(inputs, Mapping) and "input_ids" in inputs:
        ids = inputs["input_ids"]
        ids = torch.as_tensor(ids) if not isinstance(ids, torch.Tensor) else ids
        mask = inputs.get("attention_mask")
        batch = Batch.from_ids(
            check_ids(ids, d_vocab=d_vocab, n_ctx=n_ctx),
            torch.as_tensor(mask) if mask is not None else None,
        )
        if mask is None:
            _warn_unmasked_pads(batch.input_ids, arch, tokenizer)
    elif _is_texts(inputs):
        if tokenizer is None:
            raise TypeError("inputs are text, so tokenizer= is required (e.g. from reslens.load_model())")
        batch = tokenize(tokenizer, inputs)
        check_ids(batch.input_ids, d_vocab=d_vocab, n_ctx=n_ctx)
    elif isinstance(inputs, Sequence) and len(inputs) == 0:
        raise ValueError("inputs is empty; give token ids [batch, pos], a Batch, or a list of strings")
    else:
        raise TypeError(
            "inputs must be a [batch, pos] tensor of token ids, a reslens Batch, a tokenizer output "
            f"with 'input_ids', or a list of strings with tokenizer=; got {type(inputs).__name__}"
        )
    low, high = int(batch.position_ids.min()), int(batch.position_ids.max())
    if low < 0 or high >= n_ctx:
        raise ValueError(f"position_ids must lie in 0..{n_ctx - 1} (the model's context); got {low}..{high}")
    return batch.to(arch.device)
