"""The learned lens a model comes with: what fitting on its own text costs, in time and in held-out KL.

``reslens`` cannot ship the corpus, so the linear shortcut a downloaded model comes with is fitted on text
the model writes itself (``reslens.model_lens``). This script measures what that costs against fitting
on the corpus, at the same token counts:

- ``self-text``: ``reslens.model_lens.self_text_residuals`` (the seed prompts, sampled with seed 0,
  recorded while generating), the moments snapshotted at each of ``--tokens``;
- ``corpus``: windows of 128 tokens of ``../shared/corpus`` without its three held-out books (as
  ``fit_shortcut`` reads them), snapshotted at the same counts;

then scores the logit lens and every fitted lens on ``--eval-tokens`` tokens of the held-out
*Persuasion* (windows of 128): mean KL(final ‖ lens) per layer, in nats, with ``lens_stats``. Prints the
fitting rates (tokens/s, generation included for self-text) and a Markdown table.

    python benchmarks/bench_lens_fit.py --model smollm2 --tokens 8192 16384 --eval-tokens 2048 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")
LAYERS = (0, 5, 10, 15, 20, 25, 28, 29)


def snapshots(resid_batches, arch, counts: list[int]) -> tuple[dict[int, object], dict[int, float]]:
    """The shortcut moments after each of ``counts`` tokens (cut exactly there) and the seconds taken."""
    from reslens.lens.shortcut import ShortcutMoments

    moments = ShortcutMoments(arch.n_layer, arch.d_model)
    kept, seconds, start = {}, {}, time.perf_counter()
    todo = sorted(counts)
    for resid in resid_batches:
        while todo and moments.n + resid.shape[1] >= todo[0]:
            take = todo[0] - moments.n
            moments.add(resid[:, :take])
            resid = resid[:, take:]
            kept[todo[0]], seconds[todo[0]] = copy.deepcopy(moments), time.perf_counter() - start
            todo.pop(0)
        if not todo:
            break
        moments.add(resid)
    return kept, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a name load_model takes, or embedded")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--all-layers", action="store_true", help="score every layer (default: a few)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import reslens
    from reslens._stream import batches
    from reslens.lens import LinearShortcut, lens_stats
    from reslens.lens._data import corpus_windows, residual_batches
    from reslens.model_lens import self_text_residuals

    start = time.perf_counter()
    model, tokenizer = reslens.load_model(None if args.model == "embedded" else args.model)
    arch = reslens.adapter(model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    most = max(args.tokens)
    books = [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]
    sources = {
        "self-text": lambda: self_text_residuals(arch, tokenizer, n_tokens=most),
        "corpus": lambda: residual_batches(arch, tokenizer, corpus_windows(arch, books, tokenizer, most, 128),
                                           8),
    }
    lenses = {}
    for source, make in sources.items():
        kept, seconds = snapshots(make(), arch, args.tokens)
        for n in args.tokens:
            weight, bias = kept[n].solve(1e-6)
            lenses[f"{source} {n}"] = LinearShortcut(weight, bias, {"model_fingerprint": arch.fingerprint})
            print(f"{source}: {n} tokens in {seconds[n]:.1f} s ({n / seconds[n]:.0f} tokens/s)", flush=True)

    held = corpus_windows(arch, [CORPUS / HELD_OUT[0]], tokenizer, args.eval_tokens, 128)
    data = list(batches(tokenizer, held, 8))
    every = args.all_layers or arch.n_layer <= 8
    layers = tuple(range(arch.n_layer)) if every else tuple(x for x in LAYERS if x < arch.n_layer)
    kl = {}
    for name, lens in {"logit lens": None, **lenses}.items():
        stats = lens_stats(arch, data, tokenizer=tokenizer, layers=(*layers, arch.n_layer), lens=lens,
                           progress=False)
        kl[name] = stats.mean.kl_final_layer[:-1].tolist()
        print(f"scored {name} on {stats.n_tokens} held-out tokens", flush=True)
    names = list(kl)
    print(f"\nKL(final ‖ lens), nats, on {stats.n_tokens} tokens of {HELD_OUT[0]} ({args.model})\n")
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, layer in enumerate(layers):
        print(f"| {layer} | " + " | ".join(f"{kl[n][i]:.2f}" for n in names) + " |")
    mean = {n: sum(kl[n]) / len(kl[n]) for n in names}
    print("| mean | " + " | ".join(f"{mean[n]:.2f}" for n in names) + " |")
    machine = platform.processor() or platform.machine()
    print(f"\n{machine}, torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
