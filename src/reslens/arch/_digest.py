"""A model's weights as one SHA-256 digest, hashed once per weights version and cached per model.

:meth:`reslens.arch.Arch.weights_digest` names the tensors; this module hashes them and remembers the
answer. Each tensor enters as ``"{shape}|{dtype}|"`` followed by its bytes in storage order (the
stored dtype: nothing is cast), on CPU. A cached digest is reused while every tensor it hashed is
still the same object with the same version counter (bumped by every in-place change, e.g.
``p.copy_(...)`` or ``p[i] = ...`` under ``torch.no_grad()``); a change made through ``p.data``
bypasses that counter, so hash again with a fresh model object after such an edit.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Hashable, Sequence

import torch
from torch import nn

__all__ = ["digest", "cached_digest"]

#: ``model -> {key: (stamp, hex digest)}``: an entry goes with its model
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def digest(tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 (hex) of ``tensors`` in order: each one's shape, dtype and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((weakref.ref(t), t._version, tuple(t.shape)) for t in tensors)


def _same(stamp: tuple, tensors: Sequence[torch.Tensor]) -> bool:
    return len(stamp) == len(tensors) and all(
        ref() is t and version == t._version and shape == tuple(t.shape)
        for (ref, version, shape), t in zip(stamp, tensors)
    )


def cached_digest(model: nn.Module, key: Hashable, tensors: Sequence[torch.Tensor]) -> str:
    """:func:`digest` of ``tensors``, reused from the last call with ``model``, ``key`` if they are unchanged.

    Tensors read afresh on every call (weights accelerate keeps on disk) never match, so they are
    hashed every time: correct, not cached.
    """
    entries = _CACHE.setdefault(model, {})
    found = entries.get(key)
    if found is not None and _same(found[0], tensors):
        return found[1]
    value = digest(tensors)
    entries[key] = (_stamp(tensors), value)
    return value
