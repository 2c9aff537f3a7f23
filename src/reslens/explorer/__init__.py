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

from collections.abc import Mapping
from typing import Any

from reslens.explorer._page import Explorer

__all__ = ["Explorer", "explore"]


def _sequence_of(what: Any, cls: type) -> list | None:
    """``what`` as a list of ``cls`` (one, a list or tuple of them), or None where it is not."""
    if isinstance(what, cls):
        return [what]
    if isinstance(what, (list, tuple)) and what and all(isinstance(x, cls) for x in what):
        return list(what)
    return None


def _lens_results(what: Any) -> dict[str, Any] | None:
    """``what`` as name -> LensResult (one, a list or a dict of them), or None where it is not."""
    from reslens.lens.result import LensResult

    if isinstance(what, Mapping) and what and all(isinstance(v, LensResult) for v in what.values()):
        return {str(k): v for k, v in what.items()}
    listed = _sequence_of(what, LensResult)
    if listed is None:
        return None
    named: dict[str, Any] = {}
    for result in listed:
        name = result.lens_name
        named[name if name not in named else f"{name} {len(named)}"] = result
    return named


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
    from reslens.explorer._lens import lens_view, model_lens_view
    from reslens.explorer._payload import heads_view, trace_view
    from reslens.heads.scores import HeadScores
    from reslens.tracing.trace import TraceResult

    results = _lens_results(what)
    traces = _sequence_of(what, TraceResult)
    scores = _sequence_of(what, HeadScores)
    given = [inputs is not None and "inputs", patterns is not None and "patterns"]
    if results is not None or traces is not None:
        extra = [g for g in given if g]
        if extra:
            raise ValueError(f"{extra[0]}= is for a model (inputs) or head scores (patterns); "
                             f"got it with {type(what).__name__}")
    if results is not None:
        views = [lens_view(results, seq=seq, max_tokens=trajectories)]
    elif traces is not None:
        views = [trace_view(traces)]
    elif scores is not None:
        views = [heads_view(scores, _pattern(patterns, scores[0]), tokens)]
    elif inputs is not None and hasattr(what, "forward"):
        views = [model_lens_view(what, inputs, tokenizer=tokenizer, lenses=lenses, top_k=top_k,
                                 changes=changes, memories=memories, index=index, max_tokens=trajectories)]
    else:
        alone = " without inputs" if hasattr(what, "forward") else ""
        raise TypeError("explore needs a model with inputs=, LensResult(s), TraceResult(s) or HeadScores; "
                        f"got {type(what).__name__}{alone}")
    return Explorer(views, title or "reslens explorer")


def _pattern(patterns: Any, scores: Any) -> Any:
    """``patterns`` checked against the scores' grid: ``[n_layer, n_head, query, key]`` or None."""
    import torch

    if patterns is None:
        return None
    if not isinstance(patterns, torch.Tensor) or patterns.ndim != 4 or \
            tuple(patterns.shape[:2]) != (scores.n_layer, scores.n_head):
        got = tuple(patterns.shape) if isinstance(patterns, torch.Tensor) else type(patterns).__name__
        raise ValueError(f"patterns must be a [{scores.n_layer}, {scores.n_head}, query, key] tensor (one "
                         f"prompt's attention: attention_patterns(model, ids)[:, 0]); got {got}")
    return patterns
