"""Attention heads and the residual stream as a communication channel (Elhage et al. 2021).

Head scores from attention patterns (:mod:`reslens.heads.scores`: induction, previous-token,
duplicate-token, current-token), circuits from the weights (:mod:`reslens.heads.circuits`:
OV and QK circuits, the OV eigenvalue summary; :mod:`reslens.heads.ablation`: zero-, mean- and
resample-ablation of heads as patch edits; :mod:`reslens.heads.composition`: Q/K/V
composition, by query-key offset under rotary positions), all on the unmodified
HuggingFace model through its family adapter (:mod:`reslens.arch`). Direct logit attribution,
which reads these heads, is :mod:`reslens.attribution`, a floor above. Heads are written
``layer.head``, 0-based (``"1.3"``).
"""

from __future__ import annotations

from reslens._text import head_label
from reslens.heads.circuits import EFFECTIVE_EMBEDDINGS, OVSummary, ov_circuit, ov_eigen_summary, qk_circuit
from reslens.heads.composition import (
    COMPOSITION_KINDS,
    CompositionByOffset,
    CompositionScores,
    composition_by_offset,
    composition_scores,
)
from reslens.heads.ablation import head_ablation, parse_heads
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
    "head_ablation",
    "parse_heads",
    "HeadScores",
    "OVSummary",
    "CompositionScores",
    "CompositionByOffset",
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
]
