"""How a head is written: ``layer.head``, shared by the head and attribution results."""

from __future__ import annotations

__all__ = ["head_label"]


def head_label(layer: int, head: int) -> str:
    """``"layer.head"``, e.g. ``"5.1"``."""
    return f"{layer}.{head}"


