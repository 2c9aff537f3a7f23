"""What every ``reslens`` subcommand shares: loading ``--model`` and writing a figure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["load_model_of", "save_figure"]


def save_figure(figure, path: Path) -> None:
    """Write a matplotlib figure as PNG (its folder made first, as every reslens save does) and say so."""
    import re
    import warnings

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    path.parent.mkdir(parents=True, exist_ok=True)
    # a constrained layout fits its figure already: a tight box would draw it twice (seconds for a lens grid)
    tight = None if isinstance(figure.get_layout_engine(), ConstrainedLayoutEngine) else "tight"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(path, dpi=150, bbox_inches=tight)
    missing = set()  # tokens of other scripts (Gemma's vocabulary): one line, not one warning a glyph
    for warning in caught:
        glyph = re.match(r"Glyph \d+ \((.*)\) missing from font\(s\) (.*)\.$", str(warning.message))
        if glyph is None:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        else:
            missing.add(glyph.group(1))
    if missing:
        print(f"reslens: {len(missing)} characters of the tokens shown are missing from matplotlib's font "
              "and are drawn as boxes (set rcParams['font.family'] to a font that has them)", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)


def save_page(explorer, path: Path) -> None:
    """Write an explorer page (:mod:`reslens.explorer`; its folder made first) and say so, with its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    explorer.save(path)
    print(f"wrote {path} ({explorer.size / 1e6:.2f} MB: open it in a browser)", file=sys.stderr)


def load_model_of(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model`` on ``--device``; a first line of output names the model."""
    import os

    import reslens
    from reslens.models import describe_model

    model, tokenizer = reslens.load_model(args.model, device=args.device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first rank alone reports
        print(f"model: {describe_model(model, args.model)}")
    return model, tokenizer
