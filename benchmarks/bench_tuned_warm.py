"""The tuned lens warm-started from the linear shortcut against the paper's cold start, per token budget.

On SmolLM2-135M (``reslens download smollm2``), CPU, float32. The shortcut is fitted in closed form on
``--shortcut-tokens`` of the corpus's training books; tuned lenses are trained with the paper's recipe
(SGD, Nesterov momentum 0.9, lr 1.0 x 0.1 decayed linearly, ``--tokens-per-step`` tokens a step) from
the identity (cold) and from the shortcut (warm) for each budget in ``--budgets``, each reading the
training books' stream from its start as the shortcut does; every lens is scored on ``--eval-tokens``
of the held-out *Persuasion* in one capture (:func:`compare_lenses`).

    python benchmarks/bench_tuned_warm.py --budgets 1200 4800 --threads 2

Prints the fitting and training speeds (tokens/s) and a Markdown table of KL(final || lens) per layer.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shortcut-tokens", type=int, default=48_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1_200, 4_800])
    parser.add_argument("--cold-budgets", type=int, nargs="*", default=None,
                        help="budgets for the cold start (default: the largest of --budgets)")
    parser.add_argument("--tokens-per-step", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=6_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=".", help="where the lenses are saved")
    parser.add_argument("--score-only", metavar="DIR", default=None,
                        help="score the lenses an earlier run saved in DIR (shortcut.safetensors, "
                             "tuned_*.safetensors) instead of fitting and training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import reslens
    from reslens.lens import load_lens

    model, tokenizer = reslens.load_model("smollm2")
    held_out = CORPUS / HELD_OUT[0]
    if args.score_only is not None:
        saved = Path(args.score_only)
        tuned = sorted(saved.glob("tuned_*.safetensors"), key=lambda f: (f.stem.split("_")[1] != "cold",
                                                                         int(f.stem.split("_")[2])))
        lenses = [None, load_lens(saved / "shortcut.safetensors", model=model)]
        lenses += [load_lens(f, model=model) for f in tuned]
        names = ["logit lens", "shortcut"] + [f.stem.replace("_", " ") for f in tuned]
    else:
        lenses, names = fit_and_train(args, model, tokenizer)
    score(model, tokenizer, held_out, lenses, names, args.eval_tokens)


def fit_and_train(args, model, tokenizer):
    """The shortcut and every tuned lens of ``args``, each saved in ``args.out_dir``; their names."""
    from reslens.lens import fit_shortcut, train_tuned_lens

    train = [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]
    start = time.perf_counter()
    shortcut = fit_shortcut(model, train, tokenizer=tokenizer, max_tokens=args.shortcut_tokens,
                            progress=False)
    fit_s = time.perf_counter() - start
    shortcut.save(Path(args.out_dir) / "shortcut.safetensors")
    print(f"shortcut: {shortcut.config['n_tokens']} tokens in {fit_s:.0f} s "
          f"({shortcut.config['n_tokens'] / fit_s:.0f} tokens/s)")
    lenses, names = [None, shortcut], ["logit lens", f"shortcut {args.shortcut_tokens // 1000}k"]
    cold = args.cold_budgets if args.cold_budgets is not None else [max(args.budgets)]
    runs = [("cold", b, None) for b in cold] + [("warm", b, shortcut) for b in args.budgets]
    for kind, budget, init in runs:
        start = time.perf_counter()
        lens = train_tuned_lens(model, train, tokenizer=tokenizer, max_tokens=budget,
                                tokens_per_step=args.tokens_per_step, init=init, progress=False)
        seconds = time.perf_counter() - start
        first, last = (sum(step) / len(step) for step in (lens.config["loss"][0], lens.config["loss"][-1]))
        print(f"tuned {kind} {budget}: {lens.config['n_tokens']} tokens, {lens.config['steps']} steps in "
              f"{seconds:.0f} s ({lens.config['n_tokens'] / seconds:.1f} tokens/s); "
              f"training KL (mean over layers) {first:.2f} -> {last:.2f}")
        lenses.append(lens)
        lens.save(Path(args.out_dir) / f"tuned_{kind}_{budget}.safetensors")
        names.append(f"tuned {kind} {budget / 1000:g}k")
    return lenses, names


def score(model, tokenizer, held_out, lenses, names, eval_tokens) -> None:
    """Print every lens's held-out KL(final || lens) per layer, and whether it is below the shortcut's."""
    from reslens.lens import compare_lenses

    # compare_lenses scores lenses of different kinds in one capture: the tuned lenses one call each
    first = compare_lenses(model, held_out, lenses[:3], tokenizer=tokenizer, max_tokens=eval_tokens,
                           progress=False)
    rest = [compare_lenses(model, held_out, [lens], tokenizer=tokenizer, max_tokens=eval_tokens,
                           progress=False) for lens in lenses[3:]]
    kl = torch.cat([first.kl_final_layer, *(r.kl_final_layer for r in rest)])  # [lenses, layers]
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"held out: {first.n_tokens} tokens of {held_out.name}")
    print("| layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for r, layer in enumerate(first.layers):
        print(f"| {layer} | " + " | ".join(f"{float(kl[k, r]):.2f}"
                                         for k in range(len(names))) + " |")
    mean = kl[:, :-1].mean(1)
    print("| mean 0..L-1 | " + " | ".join(f"{float(m):.2f}" for m in mean) + " |")
    below = [(kl[k, :-1] < kl[1, :-1]).all().item()
             for k in range(len(names))]
    print("below the shortcut at every layer: " + ", ".join(f"{n}: {b}" for n, b in zip(names, below)))


if __name__ == "__main__":
    main()
