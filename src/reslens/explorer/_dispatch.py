"""What :func:`reslens.explorer.explore` was given: a model and text, lens results, traces or head scores.

The only module of the explorer that knows the analyses' classes (imported when ``explore`` runs), so
that the results' own ``explore()`` methods can import the explorer without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reslens.explorer._page import Explorer

__all__ = ["explore"]


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
    """:func:`reslens.explorer.explore`."""
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
