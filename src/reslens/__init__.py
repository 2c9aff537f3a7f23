"""reslens: see how a HuggingFace language model builds its prediction.

Capture exact activations (``reslens.hooks``) from an unmodified model and read them with
the logit lens, residual PCA, MLP key-value memories, attention-head scores and causal
tracing. Conventions (residual indexing, padding, rank, KL direction) are in DESIGN.md.
Importing reslens is cheap: torch and transformers load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "Batch": "reslens._inputs",
    "tokenize": "reslens._inputs",
    "Residuals": "reslens.residuals",
    "capture": "reslens.hooks",
    "patch": "reslens.hooks",
    "trace": "reslens.hooks",
    "load_model": "reslens.models",
    "adapter": "reslens.arch",
    "verify": "reslens.verification",
    "generate": "reslens.generation",
    "explore": "reslens.explorer",
    "Explorer": "reslens.explorer",
}

#: submodules reachable as attributes of ``reslens`` without an explicit import
_SUBMODULES = (
    "arch",
    "atp",
    "attribution",
    "explorer",
    "generation",
    "heads",
    "hooks",
    "kv_memory",
    "lens",
    "model_lens",
    "models",
    "pca",
    "plot",
    "residuals",
    "rome",
    "tracing",
    "verification",
)

__all__ = [
    "Batch",
    "Explorer",
    "Residuals",
    "adapter",
    "capture",
    "explore",
    "generate",
    "load_model",
    "patch",
    "tokenize",
    "trace",
    "verify",
    "__version__",
]


#: the lens wing, imported now (cheaply: its names load on first use) so that its former module names
#: ``reslens.lens_stats`` and ``reslens.lenses`` are importable (see :mod:`reslens.lens`)
importlib.import_module("reslens.lens")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"reslens.{name}")
    raise AttributeError(f"module 'reslens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
