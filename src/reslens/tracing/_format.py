"""Display helpers of the tracing and edit results: token text, pandas on demand, small HTML tables."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["show", "pandas", "html_table"]


def show(token: str) -> str:
    """A token as it reads in a table: escaped when it has outer spaces or unprintable characters."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


def pandas() -> Any:
    """The pandas module, imported on first use (it is the optional ``frame`` extra)."""
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('to_frame needs pandas: pip install "reslens[frame]"') from error
    return pd


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"  # NaN as an empty cell
    return html.escape(str(value))


def html_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A small HTML table with a bold title above it (for ``_repr_html_``)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div><b>{html.escape(title)}</b><table><tr>{head}</tr>{body}</table></div>"
