r"""One self-contained page: the template, its script and style (package data in ``static/``) and the payload.

The payload is JSON inside ``<script type="application/json">`` (``</`` written ``<\\/`` so no string can
close the script); the page needs no network and nothing installed in the browser.
"""

from __future__ import annotations

import html
import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from reslens._text import html_table

__all__ = ["Explorer", "page"]


@cache
def _static(name: str) -> str:
    return resources.files("reslens.explorer").joinpath("static", name).read_text(encoding="utf-8")


def page(views: list[dict[str, Any]], title: str, holds: str) -> str:
    """The page of ``views`` as one HTML string."""
    data = json.dumps({"title": title, "holds": holds, "views": views}, ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False)
    data = data.replace("</", "<\\/").replace("<!--", "<\\!--")
    return (_static("explorer.html").replace("/*STYLE*/", _static("explorer.css"))
            .replace("/*SCRIPT*/", _static("explorer.js")).replace("__TITLE__", html.escape(title))
            .replace("__DATA__", data))


def _clean(value: Any) -> Any:
    """JSON has no NaN: None instead, at any depth of lists and dicts."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _holds(views: list[dict[str, Any]]) -> str:
    """What the page carries, in words (it never carries a vocabulary row)."""
    parts = []
    for view in views:
        if view["kind"] == "lens":
            lenses = view["lenses"]
            exact = all(lens["traj"]["exact"] for lens in lenses)
            n_changes = sum(len(lens["changes"]) for lens in lenses)
            names = ", ".join(lens["name"] for lens in lenses)
            how = "exact at every row" if exact else "from the top-k only"
            parts.append(
                f"{len(lenses)} lens(es) ({names}) of {view['n_pos']} positions x {len(view['rows'])} rows: "
                f"top-{view['k']} tokens and probabilities (float16), the metrics of each cell, "
                f"{len(view['tokens'])} distinct token strings; trajectories of the top-1 tokens of each "
                f"position ({how}); the causes of {n_changes} cells where the top-1 changes")
        elif view["kind"] == "trace":
            parts.append(f"{len(view['maps'])} causal trace(s) of {len(view['tokens'])} tokens")
        else:
            pattern = f", one prompt's attention pattern per head ({len(view['tokens'])} positions)" \
                if "pattern" in view else ""
            parts.append(f"{len(view['scores'])} head score(s){pattern}")
    return "; ".join(parts) + ". No vocabulary rows."


class Explorer:
    """An explorer page: :attr:`html` (one self-contained HTML string), :meth:`save`, and a notebook display.

    In a notebook the page is shown in an ``<iframe srcdoc=...>`` so that its script runs isolated
    from the notebook's (JupyterLab, classic Jupyter and VS Code alike).
    """

    def __init__(self, views: list[dict[str, Any]], title: str = "reslens explorer", *,
                 height: int = 640) -> None:
        self.views = _clean(views)
        self.title = title
        self.height = height
        self.holds = _holds(self.views)
        self.html = page(self.views, title, self.holds)

    @property
    def size(self) -> int:
        """The page's size in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (an ``.html`` file that opens in any browser); returns the path."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def __repr__(self) -> str:
        kinds = ", ".join(v["kind"] for v in self.views)
        return f"Explorer([{kinds}], {self.size / 1e6:.2f} MB; .html, .save(path), .holds)"

    def _repr_html_(self) -> str:
        head = html_table(f"reslens explorer: {self.size / 1e6:.2f} MB, .save(path) writes it", (),
                          [("holds", self.holds)])
        return head + (f"<iframe srcdoc=\"{html.escape(self.html, quote=True)}\" "
                       f"title=\"{html.escape(self.title)}\" "
                f"style=\"width:100%;height:{int(self.height)}px;border:1px solid #ddd\" "
                "sandbox=\"allow-scripts\"></iframe>")
