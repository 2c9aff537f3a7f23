"""The explorer page of SmolLM2 at 31 rows x 512 positions x top-10: its size, build time and first paint.

The text is the first 512 tokens (as the tokenizer gives them to the model) of a corpus book SmolLM2 was
not trained on (``--book``, default Pride and Prejudice, from ``$RESLENS_CORPUS`` or ../shared/corpus).
``reslens.explore(model, ids, top_k=10, changes=N)`` captures once, reads the logit lens and the model's
learned lens where it has one (``--lenses logit`` for the logit lens alone), computes exact trajectories and
the causes of ``N`` cells; the page is written, opened in headless Chromium over the DevTools Protocol and
the first paint read from ``performance.getEntriesByType('paint')`` (median of ``--repeats`` fresh loads).
The time of one cause (``lens_change_of``) is printed too, to size the ``changes`` budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reslens  # noqa: E402
from cdp import Browser, chromium  # noqa: E402


def _text(book: str) -> str:
    root = Path(os.environ.get("RESLENS_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    path = next(root.glob(f"*{book}*.txt"))
    return path.read_text(encoding="utf-8")[20_000:60_000]  # past the front matter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--book", default="pride-and-prejudice")
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--changes", type=int, default=64)
    parser.add_argument("--lenses", default="logit", choices=("logit", "own"),
                        help="own: also the model's own learned lens (a second lens: twice the size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep the page here")
    args = parser.parse_args()

    model, tok = reslens.load_model(args.model)
    ids = torch.tensor([tok(_text(args.book)).input_ids[: args.positions]])
    lenses = [None]
    if args.lenses == "own":
        from reslens.model_lens import model_lens

        own = model_lens(args.model, model)
        lenses += [own] if own is not None else []
    start = time.perf_counter()
    explorer = reslens.explore(model, ids, tokenizer=tok, lenses=lenses, top_k=args.top_k,
                               changes=args.changes)
    built = time.perf_counter() - start
    n_rows = reslens.adapter(model).n_layer + 1
    print(f"{args.model}: {n_rows} rows x {ids.shape[1]} positions x top-{args.top_k}, {len(lenses)} "
          f"lens(es), {args.changes} causes: built in {built:.1f} s")
    print(f"page size: {explorer.size / 1e6:.3f} MB ({explorer.size:,} bytes)")
    print(f"holds: {explorer.holds}")
    path = args.out or Path(tempfile.mkdtemp()) / "explore.html"
    explorer.save(path)
    _time_causes(model, ids)
    marks = []
    with Browser(chromium()) as browser:
        for _ in range(args.repeats):
            browser.open(path, timeout=120)  # returns once the whole grid is built (window.reslensReady)
            while not browser.eval("window.reslensPainted === true"):
                time.sleep(0.02)
            entries = browser.eval("[...performance.getEntriesByType('paint'), ...performance."
                                   "getEntriesByType('mark')].map(e => [e.name, e.startTime])")
            marks.append(dict(entries))
    for name, what in (("first-contentful-paint", "first contentful paint (the header)"),
                       ("reslens-built", "the lens view built (the last 96 positions)"),
                       ("reslens-painted", "the lens view painted (the frame after it is built)")):
        values = [m[name] for m in marks if name in m]
        print(f"{what}: median {statistics.median(values):.0f} ms of {len(values)} loads "
              f"(all: {', '.join(f'{v:.0f}' for v in values)})")


def _time_causes(model, ids) -> None:
    """The time of one cause: ``lens_change_of`` on 8 cells where the top-1 changes, from one capture."""
    from reslens.explorer._lens import _change_cells
    from reslens.lens import lens_change_of, lens_of
    from reslens.lens.change import CHANGE_SITES

    res = reslens.capture(model, ids, sites=CHANGE_SITES)
    top1 = lens_of(res, model, top_k=1).top_ids[:, 0, :, 0]
    cells = _change_cells(top1, 8)
    start = time.perf_counter()
    for r, p in cells:
        lens_change_of(res, model, int(top1[r, p]), against=int(top1[r - 1, p]), layers=(r - 1, r),
                       position=p)
    each = (time.perf_counter() - start) / len(cells)
    n_cells = (top1.shape[0] - 1) * top1.shape[1]
    print(f"one cause (lens_change_of, 5 memories per MLP): {each * 1000:.0f} ms; all {n_cells:,} cells "
          f"would take {each * n_cells / 60:.0f} min")


if __name__ == "__main__":
    main()
