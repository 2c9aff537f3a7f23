"""Lenses: the logit lens, the tuned lens (Belrose et al. 2023) and the linear shortcut (Din et al. 2023).

A lens is a value (:class:`Lens`): it translates a layer's residual before the model's own final
norm and unembedding, and :func:`reslens.lens.logit_lens`, :func:`reslens.lens.lens_of` and
:func:`reslens.lens_stats.lens_stats` take any of them as ``lens=``.

- :class:`LogitLens`, :class:`TunedLens`, :class:`LinearShortcut`; :func:`load_lens` (reslens files
  and the ``tuned-lens`` package's folders)
- :func:`fit_shortcut`: the least-squares maps, streamed over a corpus (:mod:`reslens.lenses.shortcut`)
- :func:`train_tuned_lens`: the paper's training recipe, resumable (:mod:`reslens.lenses.tuned`)
- :func:`compare_lenses` -> :class:`LensComparison`: KL and cross-entropy per layer on held-out text
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Lens": "_base",
    "LogitLens": "_base",
    "AffineLens": "_base",
    "TunedLens": "_base",
    "LinearShortcut": "_base",
    "load_lens": "_base",
    "fit_shortcut": "shortcut",
    "ShortcutMoments": "shortcut",
    "train_tuned_lens": "tuned",
    "compare_lenses": "compare",
    "LensComparison": "compare",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"reslens.lenses.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reslens.lenses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
