"""A model's weights as one SHA-256 digest, hashed once per weights version and cached per model.

:meth:`reslens.arch.Arch.weights_digest` and :attr:`reslens.arch.Arch.fingerprint` name the tensors;
this module hashes them and remembers the answer. For a digest each tensor enters as
``"{shape}|{dtype}|"`` followed by its bytes in storage order (the stored dtype: nothing is cast), on
CPU. For a *sample* (the fingerprint) each tensor enters as ``"{shape}|"`` followed by the bytes of
every ``step``-th row (at most :data:`SAMPLE` numbers a tensor) rounded to bfloat16, so a float32 and a
bfloat16 copy of the same weights hash alike. A cached digest is reused while every tensor it hashed is
still the same object with the same version counter (bumped by every in-place change, e.g.
``p.copy_(...)`` or ``p[i] = ...`` under ``torch.no_grad()``); a change made through ``p.data``
bypasses that counter, so hash again with a fresh model object after such an edit.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch import nn

__all__ = ["digest", "cached_digest", "cached", "SAMPLE"]

T = TypeVar("T")

#: at most this many numbers of each tensor enter a sampled digest (every ``step``-th row)
SAMPLE = 1 << 20

#: ``model -> {key: (stamp, hex digest)}``: an entry goes with its model
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampled(t: torch.Tensor) -> torch.Tensor:
    """Every ``step``-th row of ``t`` (at most :data:`SAMPLE` numbers), rounded to bfloat16."""
    if t.ndim >= 2 and t.numel() > SAMPLE:
        t = t[:: -(-t.numel() // SAMPLE)]
    return t.to(torch.bfloat16)


def digest(tensors: Sequence[torch.Tensor], *, prefix: str = "", sample: bool = False) -> str:
    """SHA-256 (hex) of ``prefix`` and ``tensors`` in order: each one's shape, dtype and bytes.

    ``sample``: each tensor's shape and a bfloat16 sample of its rows instead (see the module docstring).
    """
    h = hashlib.sha256(prefix.encode())
    for t in tensors:
        t = t.detach()
        h.update((f"{tuple(t.shape)}|" if sample else f"{tuple(t.shape)}|{t.dtype}|").encode())
        if sample:
            t = _sampled(t)
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((weakref.ref(t), t._version, tuple(t.shape)) for t in tensors)


def _same(stamp: tuple, tensors: Sequence[torch.Tensor]) -> bool:
    return len(stamp) == len(tensors) and all(
        ref() is t and version == t._version and shape == tuple(t.shape)
        for (ref, version, shape), t in zip(stamp, tensors)
    )


def cached_digest(model: nn.Module, key: Hashable, tensors: Sequence[torch.Tensor], *, prefix: str = "",
                  sample: bool = False) -> str:
    """:func:`digest` of ``tensors``, reused from the last call with ``model``, ``key`` if they are unchanged.

    Tensors read afresh on every call (weights accelerate keeps on disk) never match, so they are
    hashed every time: correct, not cached.
    """
    return cached(model, key, tensors, lambda: digest(tensors, prefix=prefix, sample=sample))


def cached(model: nn.Module, key: Hashable, tensors: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``, reused from the last call with ``model``, ``key`` while ``tensors`` are unchanged."""
    entries = _CACHE.setdefault(model, {})
    found = entries.get(key)
    if found is not None and _same(found[0], tensors):
        return found[1]
    value = compute()
    entries[key] = (_stamp(tensors), value)
    return value
