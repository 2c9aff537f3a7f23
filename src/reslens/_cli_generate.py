"""``reslens generate``: the model writes, and the lens reads every position as it was computed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reslens._cli_checks import UsageError
from reslens._cli_io import load_model_of, save_figure

__all__ = ["add_generate_parser", "run_generate"]


def add_generate_parser(commands) -> None:
    """The ``reslens generate`` subcommand's arguments."""
    gen = commands.add_parser(
        "generate", help="generate with the KV cache and read every position with the lens",
        description="Generate from a prompt (greedy, or sampled with --sample) and print the lens of the "
        "prompt and what the model wrote, recorded during generation (no second forward).")
    gen.add_argument("prompt", help="the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=20, help="tokens to write at most (default 20)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="--sample: temperature (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="--sample: seed (default 0)")
    gen.add_argument("--lens", default="logit",
                     help="'logit' (default), 'none', or a learned lens: a reslens lens file or a tuned-lens "
                     "folder")
    gen.add_argument("--top-k", type=int, default=5, help="top-k tokens kept per cell (default 5)")
    gen.add_argument("--metric", default="prob", choices=("prob", "rank", "entropy", "kl"),
                     help="colour of the figure")
    gen.add_argument("--width", type=int, default=100, help="table width in characters (default 100)")
    gen.add_argument("--model", default=None,
                     help="model name or local directory (default: the embedded model)")
    gen.add_argument("--out", type=Path, help="write the lens figure to this PNG file")
    gen.add_argument("--device", default=None, help="torch device (default: cpu)")


def run_generate(args: argparse.Namespace) -> int:
    """Generate, print the new text, then the lens table of the whole sequence (and its figure)."""
    from reslens.generation import generate
    from reslens.lens.values import load_lens

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive; got {args.temperature}")
    lens_path = None if args.lens in ("logit", "none") else Path(args.lens)
    if lens_path is not None and not lens_path.exists():
        raise UsageError(f"--lens {args.lens}: no such file or folder (or give 'logit' or 'none')")
    if args.out is not None and args.lens == "none":
        raise UsageError("--out draws the lens; it needs a lens (drop --lens none)")
    model, tokenizer = load_model_of(args)
    lens = "logit" if lens_path is None else load_lens(lens_path, model=model)
    lens = None if args.lens == "none" else lens
    sampling = dict(do_sample=True, temperature=args.temperature, seed=args.seed) if args.sample else {}
    out = generate(model, [args.prompt], tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, lens=lens,
                   top_k=args.top_k, **sampling)
    ended = "a stop token" if out.stopped[0] else f"--max-new-tokens {args.max_new_tokens}"
    print(f"prompt: {out.prompt_length} tokens; wrote {out.new_tokens[0]} (ended by {ended}):")
    print(args.prompt + out.texts[0])
    if out.lens is not None:
        last = out.prompt_length + out.new_tokens[0] - 1
        print(f"\ncolumns [{out.prompt_length}]..[{last}] are what the model wrote; the lens read each "
              "position as it was computed")
        print(out.lens.table(width=args.width))
        if args.out is not None:
            save_figure(out.lens.plot(metric=args.metric), args.out)
    print("(recorded during generation with the KV cache; equal to one forward over the whole text)",
          file=sys.stderr)
    return 0
