"""What every reslens figure shares: matplotlib on demand, a figure or the given axes, legible cell text."""

from __future__ import annotations

from typing import Any

__all__ = ["_check_seq", "_pyplot", "_figure", "_text_colour"]


def _check_seq(result: Any, seq: int) -> None:
    n = result.input_ids.shape[0]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < n:
        raise ValueError(f"seq={seq!r} is out of range for a batch of {n} (0..{n - 1})")


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the plot extra is optional
        raise ImportError("plotting needs matplotlib: pip install 'reslens[plot]'") from error
    return plt


def _figure(ax: Any, size: tuple[float, float]):
    """``(fig, ax)``: a new figure of ``size`` inches, or ``ax`` and its figure (drawn the same way)."""
    if ax is None:
        return _pyplot().subplots(figsize=size)
    return ax.figure, ax


def _text_colour(image: Any, value: float) -> str:
    """White on dark cells of ``image`` (a matplotlib ``AxesImage``), black on light ones."""
    rgba = image.cmap(image.norm(value))
    return "white" if (0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]) < 0.5 else "black"
