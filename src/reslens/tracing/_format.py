"""How a token reads in the tracing results' tables."""

from __future__ import annotations

__all__ = ["show"]


def show(token: str) -> str:
    """A token as it reads in a table: escaped when it has outer spaces or unprintable characters."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


