"""Small display helpers shared by the head and attribution results: labels, pandas, HTML."""

from __future__ import annotations

from reslens._text import html_table, pandas

__all__ = ["head_label", "pandas", "html_table"]


def head_label(layer: int, head: int) -> str:
    """``"layer.head"``, e.g. ``"5.1"``."""
    return f"{layer}.{head}"


