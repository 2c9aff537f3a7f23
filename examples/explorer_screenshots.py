"""Screenshots of the explorer's three views (lens, causal trace, heads) for the README.

Writes ``docs/images/explorer-lens.png``, ``explorer-trace.png`` and ``explorer-heads.png``: each page is
made by ``reslens.explore``, opened in headless Chromium (tests/cdp.py drives it over the DevTools
Protocol), hovered and clicked as a reader would, and shot. The embedded model by default (offline,
seconds); ``--model smollm2`` for the real one.

    python examples/explorer_screenshots.py [--model smollm2] [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import reslens  # noqa: E402
from cdp import Browser, chromium  # noqa: E402

TEXT = "When the old sailor came back to the inn, he asked for a glass of rum and sat by the fire."
CLIP = {"x": 0, "y": 0, "width": 1200, "height": 1000}


def _lens(model, tok, browser: Browser, folder: Path, out: Path) -> None:
    page = reslens.explore(model, TEXT, tokenizer=tok, top_k=10, changes=64).save(folder / "lens.html")
    browser.open(page)
    # click the cell with a computed cause nearest the end of the text, then hover a cell to its left
    r, p = browser.eval("[...document.querySelectorAll('td.c.has')].map(td => [+td.dataset.r, +td.dataset.p])"
                        ".sort((a, b) => b[1] - a[1])[0]")
    browser.click(f'td.c[data-r="{r}"][data-p="{p}"]')
    browser.hover(f'td.c[data-r="{r}"][data-p="{max(0, p - 6)}"]')
    browser.screenshot(out / "explorer-lens.png", CLIP)


def _trace(model, tok, browser: Browser, folder: Path, out: Path) -> None:
    traces = [reslens.tracing.causal_trace(model, tok, "“Yes,” said White", "White", kind=kind)
              for kind in ("resid", "mlp", "attn")]
    browser.open(reslens.explore(traces).save(folder / "trace.html"))
    browser.hover('table.trace[data-map="1"] td.c[data-l="2"][data-p="4"]')
    browser.screenshot(out / "explorer-trace.png", {**CLIP, "height": 420})


def _heads(model, tok, browser: Browser, folder: Path, out: Path) -> None:
    from reslens.heads import attention_patterns, induction_scores, previous_token_scores, repeated_tokens

    ids = repeated_tokens(model, seq_len=20, n=1, seed=0)
    scores = [induction_scores(model, seq_len=20, n=4), previous_token_scores(model, ids)]
    patterns = attention_patterns(model, ids)[:, 0]
    tokens = [tok.decode([i]) for i in ids[0].tolist()]
    browser.open(reslens.explore(scores, patterns=patterns, tokens=tokens).save(folder / "heads.html"))
    best = scores[0].top(1)[0][0]
    layer, head = best.split(".")
    browser.hover(f'table.heads[data-s="0"] td.c[data-l="{layer}"][data-h="{head}"]')
    browser.screenshot(out / "explorer-heads.png", {**CLIP, "height": 640})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    browser_path = chromium()
    if browser_path is None:
        sys.exit("no headless Chromium here (apt-get install chromium-headless-shell)")
    torch.manual_seed(0)
    model, tok = reslens.load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, Browser(browser_path, width=1200, height=1000) as browser:
        for view in (_lens, _trace, _heads):
            view(model, tok, browser, Path(folder), args.out)
    for name in ("lens", "trace", "heads"):
        path = args.out / f"explorer-{name}.png"
        sys.stdout.write(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)\n")


if __name__ == "__main__":
    main()
