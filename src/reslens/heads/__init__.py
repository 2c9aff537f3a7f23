"""Attention heads and the residual stream as a communication channel (Elhage et al. 2021).

Head scores from attention patterns (:mod:`reslens.heads.scores`: induction, previous-token,
duplicate-token, current-token), circuits from the weights (:mod:`reslens.heads.circuits`:
OV and QK circuits, the OV eigenvalue summary; :mod:`reslens.heads.composition`: Q/K/V
composition, by query-key offset under rotary positions) and direct logit
attribution (:mod:`reslens.attribution`, re-exported here), all on the unmodified
HuggingFace model through its family adapter (:mod:`reslens.arch`). Heads are written
``layer.head``, 0-based (``"1.3"``).
"""

from __future__ import annotations

import importlib
from typing import Any

from reslens._text import head_label
from reslens.heads.circuits import EFFECTIVE_EMBEDDINGS, OVSummary, ov_circuit, ov_eigen_summary, qk_circuit
from reslens.heads.composition import (
    COMPOSITION_KINDS,
    CompositionByOffset,
    CompositionScores,
    composition_by_offset,
    composition_scores,
)
from reslens.heads.scores import (
    HeadScores,
    attention_patterns,
    current_token_scores,
    current_token_scores_of,
    duplicate_token_scores,
    duplicate_token_scores_of,
    induction_scores,
    induction_scores_of,
    previous_token_scores,
    previous_token_scores_of,
    repeated_tokens,
)

__all__ = [
    "HeadScores",
    "OVSummary",
    "CompositionScores",
    "CompositionByOffset",
    "LogitAttribution",
    "COMPOSITION_KINDS",
    "EFFECTIVE_EMBEDDINGS",
    "head_label",
    "attention_patterns",
    "repeated_tokens",
    "induction_scores",
    "previous_token_scores",
    "duplicate_token_scores",
    "current_token_scores",
    "induction_scores_of",
    "previous_token_scores_of",
    "duplicate_token_scores_of",
    "current_token_scores_of",
    "ov_circuit",
    "qk_circuit",
    "ov_eigen_summary",
    "composition_scores",
    "composition_by_offset",
    "logit_attribution",
    "logit_attribution_of",
]

#: names that live in :mod:`reslens.attribution` (imported on first access: that module
#: imports :mod:`reslens.heads.scores`, so importing it here eagerly would be a cycle)
_ATTRIBUTION = ("LogitAttribution", "logit_attribution", "logit_attribution_of")


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTION:
        value = getattr(importlib.import_module("reslens.attribution"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reslens.heads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ATTRIBUTION))
