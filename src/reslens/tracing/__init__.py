"""Causal tracing (Meng et al. 2022, "ROME") in batched form; ROME's edit is in :mod:`reslens.rome`.

Causal tracing corrupts the subject's token embeddings with Gaussian noise, restores one
clean hidden state (or a window of MLP / attention outputs), and measures how much of the
answer's probability comes back: the *indirect effect* of that state. reslens follows
ROME's reference code (``experiments/causal_trace.py``) and says where it differs:

- **subject span**: the first occurrence of ``subject`` in ``prompt`` (ROME's
  ``find_token_range``), found through the tokenizer's offset mapping;
- **start tokens**: a prompt string is read as its tokenizer gives it to the model, so with the
  BOS a Llama-2-style tokenizer puts first (it is never part of the subject, never noised, and
  in no bucket); GPT-2's and SmolLM2's tokenizers put none. The same holds for the edit's
  contexts in :mod:`reslens.rome`;
- **noise** (:class:`Noise`): ``nu = scale * std``, where ``std`` is the standard deviation of
  the token embeddings of the subject's tokens (ROME's ``collect_embedding_std``, which
  :func:`trace_many` computes over all the facts' subjects); ``embedding_std="vocab"`` uses the
  whole token embedding instead, a float gives it directly. The noise
  ``[samples, subject, d_model]`` is drawn once from ``torch.Generator().manual_seed(seed)``
  (ROME: ``numpy`` ``RandomState(1)``) and added to every corrupted row, so every restoration
  sees the same noise. It is added to ``resid`` layer 0; ROME adds it to the token embedding's
  output, which for learned positions is the same sum.
- **states** (``kind="resid"``): row ``l`` restores the output of block ``l``, i.e. ``resid``
  layer ``l + 1`` in reslens' indexing; ``kind="mlp"`` / ``"attn"`` restore ``mlp_out`` /
  ``attn_out`` of the blocks ``max(0, l - window // 2) .. min(n_layer, l - (-window // 2)) - 1``
  (ROME's ``trace_important_window``: ``l - 5 .. l + 4`` for ``window=10``), at one token.
- **probabilities**: ``p(answer)`` at the last position, averaged over the noise samples
  (ROME averages probabilities, not log-probabilities); the answer is the model's own top-1
  when none is given (ROME keeps only facts the model gets right). ROME runs the clean
  prompt as row 0 of every batch; reslens captures the clean states once instead.
- **batching**: ROME runs one forward of ``samples + 1`` rows per (layer, token) cell.
  reslens runs ``cells x samples`` rows per forward (chunked by ``batch_size``), each row
  corrupted with its sample's noise and restored at its own cell. The shortcuts, all exact by
  causality, are described in ``reslens.tracing._engine``: only positions from the restored
  token on are computed, rows join the forward at their first restored block, the last block
  computes the last position only, and states that cannot reach the last position are not
  restored (nor cells at tokens before the subject, whose corrupted state is the clean one).

  Restored probabilities agree with ROME's per-cell forwards to float rounding (batch and
  kernel shapes differ), not bit for bit.

Indirect effect = restored - corrupted probability; total effect = clean - corrupted.

Modules: :mod:`reslens.tracing.trace` (one prompt), :mod:`reslens.tracing.summary` (averages
over facts), ``_engine`` (the batched forwards); subject spans and answer ids are
:mod:`reslens._prompts`' (shared with :mod:`reslens.rome`).
"""

from __future__ import annotations

from reslens._prompts import subject_span
from reslens.tracing.summary import BUCKETS, TraceSummary, trace_many
from reslens.tracing.trace import (
    KINDS,
    Noise,
    TraceResult,
    causal_trace,
    causal_trace_ids,
    embedding_std,
    restored_prob,
    window_layers,
)

__all__ = [
    "KINDS",
    "BUCKETS",
    "Noise",
    "TraceResult",
    "TraceSummary",
    "causal_trace",
    "causal_trace_ids",
    "restored_prob",
    "trace_many",
    "subject_span",
    "embedding_std",
    "window_layers",
]

