"""The explorer: the lens, its trajectories and its causes, traces and head scores in one self-contained page.

:func:`explore` (also ``reslens.explore``, ``LensResult.explore()``, ``TraceResult.explore()``,
``HeadScores.explore()``) returns an :class:`Explorer`: one HTML string (:attr:`Explorer.html`) with its
hand-written script and style inline (no network, no CDN, no library), saved with
:meth:`Explorer.save` and opened from the file, or shown in a notebook. The CLI writes the same page
(``reslens lens "TEXT" --html lens.html``, ``reslens trace ... --html``, ``reslens heads --html``).

Why an ``<iframe srcdoc>`` and not a widget framework (anywidget): the page a notebook shows is then the
very page a file holds, it needs no extra dependency, no kernel round trip and no front-end extension,
and it renders alike in JupyterLab, classic Jupyter, VS Code and a static HTML export (where a widget
shows nothing without its kernel). The price: a click cannot ask the model for more, so everything the
page shows is reduced where the model runs, before the page is written.

Reduced where the model runs: the page carries each cell's top-k and metrics, the trajectories of
chosen tokens and the causes of a budget of cells, never a vocabulary row (:mod:`._payload` says how it
is encoded; 31 layers x 512 positions x top-10 of SmolLM2 fit in under 2 MB).
"""

from __future__ import annotations

from typing import Any

from reslens.explorer._page import Explorer

__all__ = ["Explorer", "explore"]


def explore(what: Any, inputs: Any = None, *, tokenizer: Any = None, lenses: Any = None, top_k: int = 10,
            changes: int = 64, memories: int = 5, index: Any = None, trajectories: int = 8, seq: int = 0,
            patterns: Any = None, tokens: Any = None, title: str | None = None) -> Explorer:
    """The explorer page of ``what``.

    ``what`` is one of:

    - a model with ``inputs`` (one text with ``tokenizer=``, or ids ``[1, pos]``): the lens view of every
      lens in ``lenses`` (None: the logit lens; a list of lens values or a dict name -> lens, e.g.
      ``{"logit": None, "shortcut": shortcut}``), ``top_k`` tokens per cell, exact trajectories of up to
      ``trajectories`` tokens per position (by default the distinct top-1 tokens of its rows), and the
      causes (:func:`reslens.lens.lens_change_of`, with ``memories`` memories per MLP and, with a
      :class:`~reslens.kv_memory.TriggerIndex` ``index``, their trigger examples) of up to ``changes``
      logit-lens cells where the top-1 changes, the last position's first;
    - :class:`~reslens.lens.LensResult` (one, a list or a dict name -> result, same text and rows): the
      lens view of sequence ``seq`` from what the results hold (trajectories from the top-k only; no causes);
    - :class:`~reslens.tracing.TraceResult` (one or several of one prompt, e.g. hidden state, MLP,
      attention): the causal-trace view;
    - :class:`~reslens.heads.HeadScores` (one or several): the head view, with ``patterns``
      ``[n_layer, n_head, query, key]`` (one prompt's attention, e.g.
      ``reslens.heads.attention_patterns(model, ids)[:, 0]``) and its ``tokens`` when given.
    """
    from reslens.explorer._dispatch import explore as dispatch  # knows the analyses' classes

    return dispatch(what, inputs, tokenizer=tokenizer, lenses=lenses, top_k=top_k, changes=changes,
                    memories=memories, index=index, trajectories=trajectories, seq=seq, patterns=patterns,
                    tokens=tokens, title=title)
