"""The ``reslens`` command: readable tables in the terminal, figures on request.

    reslens lens "The quick brown fox" [--model NAME_OR_PATH] [--top-k K] [--metric M] [--out FILE.png]
    reslens lens --file corpus.txt --stats [--out FILE.png]
    reslens pca --file corpus.txt [--n 200] [--model NAME_OR_PATH] [--out FILE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reslens", description="See how a GPT-2 builds its prediction.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lens = commands.add_parser("lens", help="logit lens of a text (or statistics over a file)",
                               description="Logit lens: each layer's residual read through ln_f and the unembedding.")
    lens.add_argument("text", nargs="?", help="the text to read (or use --file)")
    lens.add_argument("--file", type=Path, help="read the text from this file")
    lens.add_argument("--stats", action="store_true", help="per-layer statistics over the whole text instead of one table")
    lens.add_argument("--model", default=None, help="model name or local directory (default: the embedded model)")
    lens.add_argument("--top-k", type=int, default=5, help="top-k tokens kept per cell (default 5)")
    lens.add_argument("--metric", default="prob", choices=("prob", "rank", "entropy", "kl"), help="colour of the figure")
    lens.add_argument("--mid", action="store_true", help="also read the residual after each attention (resid_mid)")
    lens.add_argument("--out", type=Path, help="write the figure to this PNG file")
    lens.add_argument("--width", type=int, default=100, help="table width in characters (default 100)")
    lens.add_argument("--max-length", type=int, default=128, help="--stats: tokens per window (default 128)")
    lens.add_argument("--max-tokens", type=int, default=None, help="--stats: use at most this many tokens of the file")
    lens.add_argument("--device", default=None, help="torch device (default: cpu)")

    pca = commands.add_parser("pca", help="PCA across layers of sampled predictions, with controls",
                              description="The 'one direction is the prediction' experiment over a text file.")
    pca.add_argument("--file", type=Path, required=True, help="text to sample predictions from")
    pca.add_argument("--n", type=int, default=200, help="number of predictions (default 200)")
    pca.add_argument("--seed", type=int, default=0)
    pca.add_argument("--model", default=None, help="model name or local directory (default: the embedded model)")
    pca.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
    pca.add_argument("--out", type=Path, help="write the explained-variance figure to this PNG file")
    pca.add_argument("--device", default=None, help="torch device (default: cpu)")
    return parser


def _pca(args: argparse.Namespace) -> int:
    import reslens
    from reslens.pca import pca_experiment

    text = args.file.read_text(encoding="utf-8")
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    experiment = pca_experiment(model, tokenizer, text, n=args.n, seed=args.seed, max_length=args.max_length)
    print(experiment.table())
    if args.out is not None:
        experiment.plot().savefig(args.out, dpi=150, bbox_inches="tight")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _lens(args: argparse.Namespace) -> int:
    import reslens
    from reslens.lens import lens_stats, logit_lens

    if (args.text is None) == (args.file is None):
        raise SystemExit("reslens lens: give either TEXT or --file FILE (one of them)")
    text = args.text if args.file is None else args.file.read_text(encoding="utf-8")
    if not text.strip():
        raise SystemExit("reslens lens: the text is empty")
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    if args.stats:
        if args.max_tokens is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
            text = tokenizer.decode(ids)
        stats = lens_stats(model, text, tokenizer=tokenizer, max_length=args.max_length)
        print(stats.table())
        figure = stats.plot() if args.out else None
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = model.config.n_positions
        if len(ids) > limit:
            print(f"(the text has {len(ids)} tokens; reading its first {limit}, the model's context)", file=sys.stderr)
            text = tokenizer.decode(ids[:limit])
        sites = ("resid", "resid_mid") if args.mid else ("resid",)
        result = logit_lens(model, [text], tokenizer=tokenizer, top_k=args.top_k, sites=sites)
        print(result.table(width=args.width))
        figure = result.plot(metric=args.metric) if args.out else None
    if figure is not None:
        figure.savefig(args.out, dpi=150, bbox_inches="tight")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "out", None) is not None:
        import matplotlib

        matplotlib.use("Agg")
    return {"lens": _lens, "pca": _pca}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
