"""Small output helpers shared by results and figures.

Token text in a table cell, the optional pandas import, and HTML cell colours.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["cell_text", "pandas", "blue", "html_table"]


def cell_text(token: str, width: int) -> str:
    """A token as it fits in a table cell: newlines escaped, leading space dropped, cut to ``width``.

    A token of spaces only shows as ``␣`` (one per space), so it never looks like an empty cell.
    """
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text and not text.strip(" "):
        text = "␣" * len(text)
    text = text[1:] if text.startswith(" ") and len(text) > 1 else text
    return text if len(text) <= width else text[: width - 1] + "…"


def pandas() -> Any:
    """The pandas module, imported on first use (it is the optional ``frame`` extra)."""
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('to_frame needs pandas: pip install "reslens[frame]"') from error
    return pd


def blue(value: float) -> tuple[str, str]:
    """``(background, text)`` CSS colours for a value in ``[0, 1]``, white to dark blue.

    The text is white on dark cells; NaN (a non-finite or missing value) is grey.
    """
    if value != value:
        return "#dddddd", "black"
    v = min(max(float(value), 0.0), 1.0)
    r, g, b = (round(255 + (dark - 255) * v) for dark in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}", ("white" if v > 0.55 else "black")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"  # NaN as an empty cell
    return html.escape(str(value))


def html_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A small HTML table with a bold title above it (for ``_repr_html_``)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div><b>{html.escape(title)}</b><table><tr>{head}</tr>{body}</table></div>"
