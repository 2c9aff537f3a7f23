"""Prompts, subjects and answers as token ids: the checked inputs of causal tracing and ROME's edit.

A room of its own below both :mod:`reslens.tracing` and :mod:`reslens.rome`, which read it alike.

A prompt is read as the model reads a text by its tokenizer's convention (:func:`text_ids`): the
special tokens the tokenizer puts before a text (a BOS for Llama-2-style tokenizers; none for
GPT-2 or SmolLM2, whose tokenizers add nothing) and then the text's tokens. Answers never get
them. The subject span is ROME's ``find_token_range``: the tokens overlapping the characters of
the first occurrence of the subject in the prompt, found through the tokenizer's offset mapping,
as indices into :func:`text_ids` (so a start token is never part of the subject).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from reslens._checks import check_int, check_tokenizer
from reslens._corpus import start_ids
from reslens._inputs import caller_stacklevel
from reslens._inputs import encode as _encode_text
from reslens._tokens import decode_each, readable, text_pieces
from reslens.arch import Arch

__all__ = ["encode", "text_ids", "prompt_pieces", "subject_span", "token_span", "check_prompt_ids",
           "check_span", "prompt_ids", "answer_ids", "warn_unlikely_answer"]

#: an answer the model gives less than this probability, at a rank of at least ``_FAR_RANK``, is "far"
_FAR_P, _FAR_RANK = 0.01, 10
#: the spaced answer is suggested when the model gives it this many times the probability
_SPACED_RATIO = 10


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` without special tokens."""
    check_tokenizer(tokenizer)
    return _encode_text(tokenizer, text)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` as the model reads it: the tokenizer's start tokens (e.g. BOS), then the text's."""
    plain = encode(tokenizer, text)
    return list(start_ids(tokenizer)) + plain


def prompt_pieces(tokenizer: Any, prompt: str, ids: list[int]) -> list[str]:
    """The text of each of ``ids = text_ids(tokenizer, prompt)``: start tokens decoded, then the rest."""
    n_start = len(start_ids(tokenizer))
    return decode_each(tokenizer, ids[:n_start]) + text_pieces(tokenizer, prompt, ids[n_start:])


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token span ``(start, end)`` of the first occurrence of ``subject`` in ``prompt``.

    The tokens overlapping its characters, as ROME's ``find_token_range``, counted in
    :func:`text_ids` (as ``tokenizer(prompt)["input_ids"]``: after a BOS the tokenizer puts
    first). Uses the tokenizer's offset mapping when it has one (fast tokenizers), else decodes
    token prefixes. Raises ``ValueError`` when ``subject`` does not occur in ``prompt``.
    """
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise TypeError(f"prompt and subject must be strings; got {type(prompt).__name__} and "
                        f"{type(subject).__name__}")
    if not subject.strip():
        raise ValueError("subject is empty; give the subject's text as it appears in the prompt")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise ValueError(f"subject={subject!r} does not occur in prompt={prompt!r}")
    return token_span(tokenizer, prompt, char_start, char_start + len(subject))


def token_span(tokenizer: Any, text: str, char_start: int, char_end: int) -> tuple[int, int]:
    """The tokens ``(start, end)`` of ``text`` overlapping characters ``char_start:char_end``.

    Indices into :func:`text_ids` (after the tokenizer's start tokens, if it puts any).
    """
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        ids = encode(tokenizer, text)
        offsets, at = [], 0
        for i in range(len(ids)):
            end = len(tokenizer.decode(ids[: i + 1]))
            offsets.append((at, end))
            at = end
    inside = [i for i, (s, e) in enumerate(offsets) if e > char_start and s < char_end]
    if not inside:
        raise ValueError(f"characters {char_start}:{char_end} ({text[char_start:char_end]!r}) cover no token "
                         f"of {text!r}")
    shift = len(start_ids(tokenizer))
    return inside[0] + shift, inside[-1] + 1 + shift


def check_prompt_ids(arch: Arch, input_ids: Any) -> torch.Tensor:
    """One prompt as ids ``[pos]`` on the model's device (``[1, pos]`` or a list of ints is accepted)."""
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
            raise TypeError("input_ids given as a list must hold ints (token ids)")
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor [pos] or [1, pos] of token ids; "
                        f"got {type(input_ids).__name__}")
    if input_ids.ndim == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be one prompt, [pos] or [1, pos]; "
                         f"got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    n = input_ids.shape[0]
    if n == 0:
        raise ValueError("input_ids is empty; give at least one token")
    if n > arch.n_ctx:
        raise ValueError(f"the prompt has {n} tokens, more than the model's context (n_ctx={arch.n_ctx}); "
                         "shorten it")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= arch.d_vocab:
        bad = high if high >= arch.d_vocab else low
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary 0..{arch.d_vocab - 1}")
    return input_ids.long().to(arch.device)


def check_span(span: Any, n_tokens: int) -> tuple[int, int]:
    """A subject span ``(start, end)`` with ``0 <= start < end <= n_tokens``."""
    if not (isinstance(span, (tuple, list)) and len(span) == 2):
        raise TypeError(f"subject_span must be a (start, end) pair of token indices; got {span!r}")
    start, end = (check_int(x, "subject_span") for x in span)
    if not 0 <= start < end <= n_tokens:
        raise ValueError(
            f"subject_span={tuple(span)} must satisfy 0 <= start < end <= {n_tokens} (the prompt's tokens)"
        )
    return start, end


def prompt_ids(arch: Arch, tokenizer: Any, prompt: Any) -> list[int]:
    """The ids (:func:`text_ids`) of a non-empty prompt string that fits the model's context."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string; got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is empty")
    ids = text_ids(tokenizer, prompt)
    if len(ids) > arch.n_ctx:
        raise ValueError(
            f"prompt has {len(ids)} tokens, more than the model's context (n_ctx={arch.n_ctx}); shorten it"
        )
    return ids


def answer_ids(tokenizer: Any, answer: Any, *, name: str = "answer") -> list[int]:
    """The ids (one or more) of an answer string, written as it follows the prompt (e.g. ``" Holmes"``)."""
    if not isinstance(answer, str):
        raise TypeError(f"{name} must be a string (e.g. ' Holmes', with its leading space); got {answer!r}")
    if not answer:
        raise ValueError(f"{name} is empty; give its text as it follows the prompt (e.g. ' Holmes')")
    ids = encode(tokenizer, answer)
    if not ids:
        raise ValueError(f"{name}={answer!r} tokenizes to no tokens")
    return ids


def warn_unlikely_answer(arch: Arch, tokenizer: Any, prompt: str, ids: list[int], answer: Any,
                         answer_id: int, *, name: str = "answer", known: bool = True) -> None:
    """Warn when an answer looks mistyped: its first token ``answer_id`` is one the model hardly expects.

    ``answer`` (its text, or an id) follows ``prompt`` (read as ``ids``). Text without the leading space
    a word takes after a prompt (``"Paris"`` for ``" Paris"``) is named, with the spaced form, when the
    model gives the spaced form's first token at least ten times the probability. With ``known=True``
    (causal tracing, which measures what the model knows; not ROME's new answer) an answer far from the
    model's own prediction (p < 1% and rank >= 10) is named too, with the model's top-1.
    """
    with torch.no_grad():
        logits = arch.unembed(arch.final_hidden(torch.tensor([ids], device=arch.device))[0, -1]).float()
    probs = logits.softmax(-1)

    def p_rank(i: int) -> tuple[float, int]:
        return float(probs[i]), int((logits > logits[i]).sum())

    p, rank = p_rank(answer_id)
    if isinstance(answer, str) and not answer[:1].isspace() and not prompt[-1:].isspace():
        spaced = encode(tokenizer, " " + answer)
        if spaced and spaced[0] != answer_id and p_rank(spaced[0])[0] >= _SPACED_RATIO * p:
            p_spaced, rank_spaced = p_rank(spaced[0])
            warnings.warn(
                f"{name}={answer!r} has p={p:.3g} (rank {rank}) after the prompt, while {' ' + answer!r}, "
                f"with the leading space a word takes after a prompt, has p={p_spaced:.3g} (rank "
                f"{rank_spaced}); did you mean {name}={' ' + answer!r}?", UserWarning,
                stacklevel=caller_stacklevel())
            return
    if known and p < _FAR_P and rank >= _FAR_RANK:
        top = int(logits.argmax())
        shown = answer if isinstance(answer, str) else readable(tokenizer, answer_id)
        warnings.warn(
            f"{name}={shown!r} is far from the model's own prediction: p={p:.3g}, rank {rank} (its top-1 is "
            f"{readable(tokenizer, top)!r}, p={float(probs[top]):.3g}), so the clean run barely gives it and "
            f"its effects will be small; check the answer, or leave {name}=None to use the model's top-1",
            UserWarning, stacklevel=caller_stacklevel())
