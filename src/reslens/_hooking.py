"""Hook registration that acts only in the thread that entered a context, and the per-site capture buffers.

The private machinery under :mod:`reslens.hooks` (which alone decides where hooks go).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch

__all__ = ["_StopForward", "_SiteBuffer", "_ThreadHooks", "cache_length", "takes_start", "every_position"]


def cache_length(cache: Any) -> int:
    """How many tokens a KV cache already holds (0 for none).

    That is the whole-sequence position of the first token of a forward that continues the cache
    (``model.generate()`` with ``use_cache=True`` runs each new token alone).
    """
    if cache is None:
        return 0
    return int(getattr(cache, "get_seq_length", lambda: 0)())


def every_position(logits: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """The ``logits [batch, pos, d_vocab]`` of a traced forward, refused when they skip positions it read.

    ``inputs``: the forward's ``(input_ids, attention_mask, position_ids)``. A model called with
    ``logits_to_keep=k`` (as ``generate()`` calls it) computes the last ``k`` positions only.
    """
    input_ids, attention_mask, _ = inputs
    read = input_ids if input_ids is not None else attention_mask
    if read is not None and logits.ndim == 3 and logits.shape[1] != read.shape[-1]:
        raise ValueError(
            f"the model returned logits for {logits.shape[1]} of the {read.shape[-1]} positions it read: it "
            "was called with logits_to_keep (as generate() calls it), and reslens records the logits of "
            "every position; inside a trace call the model without logits_to_keep (or with "
            "logits_to_keep=0), or leave 'logits' out of sites"
        )
    return logits


def takes_start(fn: Any) -> bool:
    """Whether ``fn`` has a parameter ``start`` (by keyword) for the position of its tensor's first entry."""
    try:
        param = inspect.signature(fn).parameters.get("start")
    except (TypeError, ValueError):  # a builtin without a readable signature
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


class _StopForward(Exception):
    """Raised by the last needed hook so ``capture`` skips the rest of the forward pass."""


class _SiteBuffer:
    """Collects one site's per-layer tensors; copies into one preallocated tensor when detached."""

    def __init__(self, n: int, dtype: torch.dtype | None, device: torch.device | None, detach: bool):
        self.n, self.dtype, self.device, self.detach = n, dtype, device, detach
        self.parts: list[torch.Tensor | None] = [None] * n
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def write(self, i: int, t: torch.Tensor) -> None:
        if self.n == 1:  # a whole-model site (final, logits): keep the tensor itself, no copy
            t = t.detach() if self.detach else t
            self.parts[0] = t.to(device=self.device, dtype=self.dtype)
        elif self.detach:
            if self.buffer is None:
                self.buffer = torch.empty(
                    (self.n, *t.shape), dtype=self.dtype or t.dtype, device=self.device or t.device
                )
            self.buffer[i].copy_(t.detach())
        else:
            self.parts[i] = t.to(device=self.device, dtype=self.dtype)
        self.filled += 1

    def result(self) -> torch.Tensor | None:
        if self.filled < self.n:
            return None
        if self.n == 1:
            return self.parts[0][None]  # type: ignore[index]
        if self.detach:
            return self.buffer
        return torch.stack(self.parts)  # type: ignore[arg-type]


class _ThreadHooks:
    """Hooks registered on modules that act only in the thread that entered the context."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._thread: int | None = None

    def _mine(self) -> bool:
        return threading.get_ident() == self._thread

    def _add_pre(self, module: Any, callback: Any) -> None:
        """``callback(args, kwargs)`` before ``module`` runs; it may return new ``(args, kwargs)``."""

        def hook(m, args, kwargs=None):
            # kwargs=None: another thread's forward saw this hook between torch registering it and
            # marking it with_kwargs (registration is not atomic); it is never this thread's forward
            return callback(args, kwargs) if kwargs is not None and self._mine() else None

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _add_post(self, module: Any, callback: Any, always_call: bool = False) -> None:
        """``callback(output)`` after ``module`` runs; it may return a new output.

        ``always_call``: also when the forward raised (``output`` is then ``None``).
        """

        def hook(m, args, out):
            return callback(out) if self._mine() else None

        self._handles.append(module.register_forward_hook(hook, always_call=always_call))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
