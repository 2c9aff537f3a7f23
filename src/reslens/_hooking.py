"""Hook registration that acts only in the thread that entered a context, and the per-site capture buffers.

The private machinery under :mod:`reslens.hooks` (which alone decides where hooks go).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["_StopForward", "_SiteBuffer", "_ThreadHooks"]


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

    def _add_post(self, module: Any, callback: Any) -> None:
        """``callback(output)`` after ``module`` runs; it may return a new output."""

        def hook(m, args, out):
            return callback(out) if self._mine() else None

        self._handles.append(module.register_forward_hook(hook))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
