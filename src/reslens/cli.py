"""The ``reslens`` command: readable tables in the terminal, figures on request.

    reslens lens "The quick brown fox" [--model NAME_OR_PATH] [--top-k K] [--metric M] [--out FILE.png]
    reslens lens --file corpus.txt --stats [--out FILE.png]
    reslens pca --file corpus.txt [--n 200] [--model NAME_OR_PATH] [--out FILE.png]
    reslens memories "TEXT" [--layer L] [--top 10] [--token " word"]
    reslens memories --mine CORPUS --out INDEX_DIR [--max-tokens N] [--figure FILE.png]
    reslens memories --index INDEX_DIR --show L.K [--n 10]
    reslens heads [--model NAME_OR_PATH] [--file TEXT.txt] [--top K] [--out FILE.png]
    reslens trace "PROMPT" --subject S [--answer " A"] [--kind resid|mlp|attn] [--out FILE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _save(figure, path: Path) -> None:
    """Write a matplotlib figure as PNG and say so on stderr."""
    figure.savefig(path, dpi=150, bbox_inches="tight")
    print(f"wrote {path}", file=sys.stderr)


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

    heads = commands.add_parser("heads", help="top induction, previous-token and copying heads, with heatmaps",
                                description="Attention-head scores: induction and previous-token (attention on repeated "
                                "random tokens, or on --file), copying (OV eigenvalues) and K-composition.")
    heads.add_argument("--model", default=None, help="model name or local directory (default: the embedded model)")
    heads.add_argument("--file", type=Path, help="text for the previous-token scores (default: the repeated random tokens)")
    heads.add_argument("--seq-len", type=int, default=50, help="random tokens per repeat (default 50; capped by the context)")
    heads.add_argument("--n", type=int, default=10, help="number of repeated random sequences (default 10)")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--top", type=int, default=5, help="heads listed per score (default 5)")
    heads.add_argument("--out", type=Path, help="write the heatmaps to this PNG file")
    heads.add_argument("--device", default=None, help="torch device (default: cpu)")

    mem = commands.add_parser("memories", help="MLP key-value memories: dominant memories of a text, or trigger mining",
                              description="The MLP as key-value memories (Geva et al. 2021).")
    mem.add_argument("text", nargs="?", help="show the dominant memories at this text's last token")
    mem.add_argument("--layer", type=int, default=None, help="block to show (default: every block)")
    mem.add_argument("--top", type=int, default=10, help="memories listed per block (default 10)")
    mem.add_argument("--token", default=None, help="rank memories by their push on this token's logit (e.g. ' Holmes')")
    mem.add_argument("--mine", type=Path, help="mine triggers from this .txt file or folder of .txt files")
    mem.add_argument("--out", type=Path, help="--mine: folder to save the trigger index in (resumes if it holds one)")
    mem.add_argument("--max-tokens", type=int, default=None, help="--mine: stop after this many corpus tokens")
    mem.add_argument("--top-k", type=int, default=50, help="--mine: triggers kept per key (default 50)")
    mem.add_argument("--unit", default="sentence", choices=("sentence", "window"), help="--mine: example unit")
    mem.add_argument("--batch-size", type=int, default=32, help="--mine: sequences per forward (default 32)")
    mem.add_argument("--figure", type=Path, help="--mine: write the key-value agreement figure to this PNG file")
    mem.add_argument("--index", type=Path, help="read a saved trigger index (with --show)")
    mem.add_argument("--show", default=None, help="--index: the key to show as LAYER.KEY (e.g. 3.17)")
    mem.add_argument("--n", type=int, default=10, help="--show: triggers listed (default 10)")
    mem.add_argument("--model", default=None, help="model name or local directory (default: the embedded model)")
    mem.add_argument("--device", default=None, help="torch device (default: cpu)")
    _add_trace_parser(commands)
    return parser


def _add_trace_parser(commands) -> None:
    trace = commands.add_parser("trace", help="causal tracing (ROME): which states carry the subject's fact",
                                description="Corrupt the subject's embeddings, restore each (layer, token) state, "
                                            "print the indirect effects and optionally draw ROME's heatmap.")
    trace.add_argument("prompt", help="the prompt, e.g. 'said White'")
    trace.add_argument("--subject", required=True, help="the subject's text as it appears in the prompt")
    trace.add_argument("--answer", default=None, help="answer token (with its leading space); default: the model's top-1")
    trace.add_argument("--kind", default="resid", choices=("resid", "mlp", "attn"), help="what to restore (default resid)")
    trace.add_argument("--window", type=int, default=10, help="mlp/attn: layers restored around each (default 10)")
    trace.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    trace.add_argument("--noise", type=float, default=3.0, help="noise std in units of the subject embeddings' std (default 3)")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--model", default=None, help="model name or local directory (default: the embedded model)")
    trace.add_argument("--out", type=Path, help="write ROME's heatmap to this PNG file")
    trace.add_argument("--device", default=None, help="torch device (default: cpu)")


def _trace(args: argparse.Namespace) -> int:
    import reslens
    from reslens.tracing import causal_trace

    model, tokenizer = reslens.load_model(args.model, device=args.device)
    try:
        result = causal_trace(model, tokenizer, args.prompt, args.subject, answer=args.answer, kind=args.kind,
                              window=args.window, samples=args.samples, noise=args.noise, seed=args.seed)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"reslens trace: {error}") from None
    print(result.table())
    if args.out is not None:
        _save(result.plot(), args.out)
    return 0


def _pca(args: argparse.Namespace) -> int:
    import reslens
    from reslens.pca import pca_experiment

    text = args.file.read_text(encoding="utf-8")
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    experiment = pca_experiment(model, tokenizer, text, n=args.n, seed=args.seed, max_length=args.max_length)
    print(experiment.table())
    if args.out is not None:
        _save(experiment.plot(), args.out)
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
        _save(figure, args.out)
    return 0


def _heads(args: argparse.Namespace) -> int:
    import reslens
    from reslens.heads import composition_scores, induction_scores, ov_eigen_summary, previous_token_scores, repeated_tokens
    from reslens.hooks import pad_ids, pad_token_id

    if args.top < 1 or args.n < 1:
        raise SystemExit("reslens heads: --top and --n must be at least 1")
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    n_positions = model.config.n_positions
    seq_len = min(args.seq_len, n_positions // 2)
    if seq_len < 2:
        raise SystemExit(f"reslens heads: the model's context ({n_positions}) is too short for repeated tokens")
    if seq_len < args.seq_len:
        print(f"(--seq-len {args.seq_len} does not fit twice in the context of {n_positions}; using {seq_len})", file=sys.stderr)
    induction = induction_scores(model, seq_len=seq_len, n=args.n, seed=args.seed)
    if args.file is not None:
        ids = tokenizer(args.file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise SystemExit("reslens heads: --file needs at least 2 tokens")
        window = min(n_positions, 128)
        windows = [ids[i : i + window] for i in range(0, min(len(ids), 32 * window), window)]
        previous = previous_token_scores(model, pad_ids(windows, pad_id=pad_token_id(tokenizer)))
    else:
        previous = previous_token_scores(model, repeated_tokens(model, seq_len=seq_len, n=args.n, seed=args.seed))
    copying = ov_eigen_summary(model).copying_scores
    k_comp = composition_scores(model, "k")
    for scores in (induction, previous, copying):
        print(f"top {scores.name} heads ({scores.description}):")
        print("\n".join(f"  {label:>6}  {score:+.4f}" for label, score in scores.top(args.top)))
        print()
    print(k_comp.table(args.top))
    if args.out is not None:
        from reslens.plot import plot_head_score_panels

        _save(plot_head_score_panels([induction, previous, copying]), args.out)
    return 0


def _memories(args: argparse.Namespace) -> int:
    import reslens
    from reslens import kv_memory as kv

    modes = [args.text is not None, args.mine is not None, args.index is not None]
    if sum(modes) != 1:
        raise SystemExit("reslens memories: give exactly one of TEXT, --mine CORPUS or --index DIR")
    if args.top < 1 or args.n < 1:
        raise SystemExit("reslens memories: --top and --n must be at least 1")
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    if args.index is not None:
        if args.show is None:
            raise SystemExit("reslens memories --index: say which key with --show LAYER.KEY (e.g. 3.17)")
        try:
            layer, key = (int(part) for part in args.show.split("."))
        except ValueError:
            raise SystemExit(f"reslens memories: --show must look like LAYER.KEY (e.g. 3.17); got {args.show!r}") from None
        index = kv.TriggerIndex.load(args.index, tokenizer=tokenizer)
        index.show(layer, key, n=args.n)
        print(kv.value_tokens(model, layer, [key], k=10, tokenizer=tokenizer).table())
        return 0
    if args.mine is not None:
        if args.out is None:
            raise SystemExit("reslens memories --mine: say where to save the index with --out DIR")
        resume = args.out if (args.out / "index.json").is_file() else None
        if resume is not None:
            print(f"(resuming the index in {args.out})", file=sys.stderr)
        index = kv.mine_triggers(model, tokenizer, args.mine, top_k=args.top_k, unit=args.unit,
                                 batch_size=args.batch_size, max_tokens=args.max_tokens, resume=resume, out=args.out)
        print(index)
        result = kv.agreement(index, model)
        print(result.table())
        if args.figure is not None:
            _save(result.plot(), args.figure)
        return 0
    token = None
    if args.token is not None:
        ids = tokenizer(args.token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SystemExit(f"reslens memories: --token must be one token; {args.token!r} is {len(ids)} tokens")
        token = ids[0]
    ids = tokenizer(args.text, add_special_tokens=False)["input_ids"][-model.config.n_positions :]
    if not ids:
        raise SystemExit("reslens memories: the text is empty")
    import torch

    residuals = reslens.capture(model, torch.tensor([ids]), sites=("mlp_act", "resid"))
    layers = range(model.config.n_layer) if args.layer is None else [args.layer]
    last = tokenizer.decode(ids[-1:])
    for layer in layers:
        c = kv.contributions(model, residuals, layer, -1, token=token, through_ln_f=token is not None)
        top = c.top(args.top)
        names = kv.value_tokens(model, layer, [n for n, _, _ in top], k=5, tokenizer=tokenizer)
        score = "|m|·‖v‖" if token is None else f"Δlogit {args.token!r} (ln_f linearised)"
        print(f"block {layer}, last token {last!r}: top {len(top)} memories by {score}")
        print(f"  {'neuron':>8} {'m':>7} {'score':>8}  value's top tokens (W_U v)")
        for neuron, m, value in top:
            words = " ".join(repr(w) for w in names.tokens(neuron))
            print(f"  {'L%dN%d' % (layer, neuron):>8} {m:>+7.3f} {value:>+8.3f}  {words}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    figure = getattr(args, "figure", None) if args.command == "memories" else getattr(args, "out", None)
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
    return {"lens": _lens, "pca": _pca, "heads": _heads, "memories": _memories, "trace": _trace}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
