"""``reslens lens``: the logit lens of a text and, below it, the learned lens the model comes with.

For the embedded GPT-2 (shipped) and a model ``reslens download`` knows (fitted once on the model's own
text and kept in its cache; :mod:`reslens.model_lens`), the text is captured once and read through both
lenses: two tables, each ending with what to read from it, and one figure with both on one colour scale.
``--lens logit`` shows the logit lens alone; ``--lens FILE`` reads through that lens instead.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from reslens._cli_checks import UsageError
from reslens._cli_io import load_model_of, save_figure, save_page

__all__ = ["add_lens_parser", "run_lens"]


def add_lens_parser(commands) -> None:
    """The ``reslens lens`` subcommand's arguments."""
    lens = commands.add_parser("lens", help="logit lens of a text, and the model's learned lens below it "
                               "(or statistics over a file)",
                               description="Logit lens: each layer's residual read through the final norm "
                               "and the unembedding; below it, for the embedded model and the models reslens "
                               "downloads, the same text through the model's learned lens (a linear shortcut "
                               "fitted once on text the model wrote itself).")
    lens.add_argument("text", nargs="?", help="the text to read (or use --file)")
    lens.add_argument("--file", type=Path, help="read the text from this file")
    lens.add_argument("--stats", action="store_true",
                      help="per-layer statistics over the whole text instead of one table")
    lens.add_argument("--model", default=None,
                      help="model name or local directory (default: the embedded model)")
    lens.add_argument("--top-k", type=int, default=5, help="top-k tokens kept per cell (default 5)")
    lens.add_argument("--metric", default="prob", choices=("prob", "rank", "entropy", "kl"),
                      help="colour of the figure")
    lens.add_argument("--mid", action="store_true",
                      help="also read the residual after each attention (resid_mid; logit lens only)")
    lens.add_argument("--out", type=Path, help="write the figure to this PNG file")
    lens.add_argument("--html", type=Path,
                      help="write the interactive explorer page (every lens shown, top-10 or more per cell, "
                      "trajectories and the causes of the cells where the top-1 changes) to this HTML file")
    lens.add_argument("--width", type=int, default=100, help="table width in characters (default 100)")
    lens.add_argument("--max-length", type=int, default=128, help="--stats: tokens per window (default 128)")
    lens.add_argument("--max-tokens", type=int, default=None,
                      help="--stats: use at most this many tokens of the file")
    lens.add_argument("--lens", default=None,
                      help="'logit': the logit lens alone; or a learned lens to read through instead: a "
                      "reslens lens file (reslens.lens) or a tuned-lens package folder (default: the logit "
                      "lens, and the model's own learned lens below it where it has one)")
    lens.add_argument("--device", default=None, help="torch device (default: cpu)")


def _own_lens(args: argparse.Namespace, model, tokenizer):
    """The learned lens ``--model`` comes with (fitted now, once, where a known model's cache lacks it)."""
    from reslens.hub import KNOWN
    from reslens.model_lens import fit_model_lens, model_lens, model_lens_path

    if args.lens is not None or not (args.model is None or args.model in KNOWN):
        return None
    lens = model_lens(args.model, model)
    if lens is None and args.model is not None:
        print(f"(fitting the learned lens of {args.model} once, on text it writes itself; kept in "
              f"{model_lens_path(args.model)})", file=sys.stderr)
        lens = fit_model_lens(args.model, model, tokenizer)
    return lens


def _fitted_on(lens) -> str:
    """One line: which lens, and what it was fitted on."""
    config = lens.config
    made = config.get("source") or (f"fitted on {config['n_tokens']:,} tokens" if "n_tokens" in config
                                    else "fitted elsewhere")
    said = (("seed", "seed"), ("reslens_version", "reslens"))
    extra = ", ".join(f"{shown} {config[key]}" for key, shown in said if key in config)
    return f"{lens.name} of {config.get('model', 'this model')}: {made}" + (f" ({extra})" if extra else "")


def run_lens(args: argparse.Namespace) -> int:
    """``reslens lens``: the lens tables of a text (each with what to read from it), or ``--stats``.

    The text is read as its tokenizer gives it to the model (start tokens first where it adds them),
    through :mod:`reslens._stream` like every data-set pass.
    """
    from reslens._corpus import encode, start_ids
    from reslens._stream import batch_of, batches, units, window_size
    from reslens.arch import adapter
    from reslens.hooks import capture
    from reslens.lens.result import lens_of
    from reslens.lens.stats import lens_stats
    from reslens.lens.values import load_lens

    if (args.text is None) == (args.file is None):
        raise UsageError("give either TEXT or --file FILE (one of them)")
    text = args.text if args.file is None else args.file.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError("the text is empty")
    if args.stats and args.html is not None:
        raise UsageError("--html writes the explorer of one text; it does not go with --stats")
    path = None if args.lens in (None, "logit") else Path(args.lens)
    if path is not None and not path.exists():
        raise UsageError(f"--lens {args.lens}: no such file or folder (or 'logit' for the logit lens alone)")
    model, tokenizer = load_model_of(args)
    arch = adapter(model)
    learned = None if path is None else load_lens(path, model=model)
    start = start_ids(tokenizer)  # the text as the tokenizer gives it to the model (a BOS where it adds one)
    if args.stats:
        size = window_size(arch, start, args.max_length)
        windows = list(units(tokenizer, [text], max_length=size, max_tokens=args.max_tokens))
        if not windows:
            raise ValueError("the text has fewer than 2 tokens")
        stats = lens_stats(arch, list(batches(tokenizer, windows, 8)), tokenizer=tokenizer, lens=learned)
        print(stats.table())
        if args.out is not None:
            save_figure(stats.plot(), args.out)
        return 0
    size = window_size(arch, start, arch.n_ctx)
    ids = encode(tokenizer, [text])[0]  # no "longer than the maximum" warning: cut below
    if len(ids) > size:
        print(f"(the text has {len(ids)} tokens; reading its first {size}, the model's context"
              + (f" after {len(start)} start token(s))" if start else ")"), file=sys.stderr)
        ids = ids[:size]
    own = _own_lens(args, model, tokenizer)
    sites = ("resid", "resid_mid") if args.mid else ("resid",)
    res = capture(arch, batch_of([ids], start, pad_id=0), sites=sites)  # once, read by every lens
    results = [lens_of(res, arch, tokenizer=tokenizer, top_k=args.top_k, sites=sites, lens=learned)]
    if own is not None:
        results.append(lens_of(res, arch, tokenizer=tokenizer, top_k=args.top_k, lens=own))
    for k, result in enumerate(results):
        if k:
            print("\n" + "\n".join(textwrap.wrap(_fitted_on(own), args.width)))
        print(result.table(width=args.width))
        print()
        print(result.summary(width=args.width))
    if args.out is not None:
        from reslens.lens._plot import plot_lenses

        pair = len(results) > 1
        figure = plot_lenses(results, args.metric) if pair else results[0].plot(metric=args.metric)
        save_figure(figure, args.out)
    if args.html is not None:
        _write_page(args, model, tokenizer, batch_of([ids], start, pad_id=0), results,
                   [lens for lens in (learned, own) if lens is not None])
    return 0


def _write_page(args: argparse.Namespace, model, tokenizer, batch, results, learned) -> None:
    """``--html``: the explorer page of the same text, read by the same lenses (:mod:`reslens.explorer`)."""
    from reslens.explorer import explore

    by_name = {result.lens_name: None for result in results}
    for lens in learned:
        by_name[lens.name] = lens
    explorer = explore(model, batch, tokenizer=tokenizer, lenses=by_name, top_k=max(args.top_k, 10))
    save_page(explorer, args.html)
