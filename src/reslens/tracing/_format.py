"""Display helpers of the tracing and edit results: token text, pandas on demand, small HTML tables."""

from __future__ import annotations

from reslens._text import html_table, pandas

__all__ = ["show", "pandas", "html_table"]


def show(token: str) -> str:
    """A token as it reads in a table: escaped when it has outer spaces or unprintable characters."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


