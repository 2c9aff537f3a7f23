"""The display vocabulary every result shares: token text in a cell, pandas on demand, HTML tables.

One :func:`html_table` renders every result's ``_repr_html_`` that is a table, and one
:func:`pandas` imports the optional ``frame`` extra for every ``to_frame``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["cell_text", "show", "head_label", "pandas", "blue", "html_table"]


#: whitespace and invisible characters a cell shows by a visible stand-in (any other is escaped ``\\uXXXX``)
_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\u00a0": "⍽"}


def _visible(ch: str) -> str:
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    if ch.isspace() or not ch.isprintable():  # thin, zero-width, en/em spaces, controls: their code point
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    return ch


def cell_text(token: str, width: int) -> str:
    r"""A token as it fits in a table cell: never blank, leading space dropped, cut to ``width``.

    Newlines, tabs and carriage returns are escaped (``\n``, ``\t``, ``\r``), the no-break space shows
    as ``⍽`` and any other whitespace or invisible character as its code point (``\u2009``). A token that
    is whitespace only shows every character, a space as ``␣`` (``"  "`` is ``␣␣``), so no two such
    tokens look alike and none looks like an empty cell; otherwise a single leading space is dropped.

    >>> [cell_text(t, 8) for t in (" ", "\u00a0", "\t", "\r\n", "\u2009", " the")]
    ['␣', '⍽', '\\t', '\\r\\n', '\\u2009', 'the']
    """
    if token.isspace():
        text = "".join(_visible(ch) for ch in token)
    else:
        text = token[1:] if token.startswith(" ") and len(token) > 1 else token
        text = "".join(ch if ch == " " else _visible(ch) for ch in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def show(token: str) -> str:
    """A token as it reads in a table: escaped when it has outer spaces or unprintable characters."""
    return repr(token)[1:-1] if token.strip() != token or not token.isprintable() else token


def head_label(layer: int, head: int) -> str:
    """``"layer.head"``, e.g. ``"5.1"``."""
    return f"{layer}.{head}"


def pandas(what: str = "to_frame") -> Any:
    """The pandas module, imported on first use (an ImportError says that ``what`` needs it)."""
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f'{what} needs pandas, an optional extra: pip install "reslens[frame]"') from error
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


def html_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], *, note: str = "") -> str:
    """A small HTML table under a bold ``title`` (and a plain ``note`` beside it), for ``_repr_html_``.

    Every cell is escaped text; a float shows 4 significant digits and NaN an empty cell. An empty
    ``header`` draws no header row (a table of ``name, value`` pairs).

    >>> html_table("T", ("a", "b"), [(1, 0.123456)], note="(nats)")
    '<div><b>T</b> (nats)<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>0.1235</td></tr></table></div>'
    """
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    shown = f" {html.escape(note)}" if note else ""
    return f"<div><b>{html.escape(title)}</b>{shown}<table>{head}{body}</table></div>"
