"""What each data-set pass costs on SmolLM2: time per token against a plain forward, and peak memory.

Every pass reads text through the one corpus stream (``reslens._stream``), so its cost is the forward
plus its own accumulator; this script measures both. Each case runs once, in its own fresh
subprocess (``--threads`` intra-op threads, 2 by default): load SmolLM2 (``reslens.load_model("smollm2")``,
cached), read ``ru_maxrss`` (the peak so far: the model loaded), run the pass on ``N`` tokens, read
``ru_maxrss`` again. Rows:

- ``forward``: the model body over the same windows as ``lens_stats`` (8 x 128 tokens per batch), no
  hooks, under ``no_grad`` -- the baseline every ``x forward`` column divides by (measured at the
  first size only).
- ``lens_stats``: ``lens_stats(model, text)`` (windows of 128, batch 8, every layer).
- ``fit_shortcut``: ``fit_shortcut(model, books, max_tokens=N)`` (windows of 128, batch 8).
- ``train_tuned_lens``: ``train_tuned_lens(model, books, max_tokens=N, tokens_per_step=512)``
  (``N / 512`` steps).
- ``compare_lenses``: three lenses (logit, a linear shortcut, a tuned lens; their values do not
  change the cost) on ``N`` tokens of the held-out book, captured once.
- ``SecondMoment``: ``SecondMoment.compute(model, 1, books, max_tokens=N, max_length=512)`` (block 1's
  keys: the forward stops after block 1, so this pass costs a fraction of a forward).
- ``pca_experiment``: ``pca_experiment(model, tokenizer, text, n=200)`` on a text of ``N`` tokens
  (windows of 128; 200 predictions read nearly every window).
- ``mine_triggers``: ``mine_triggers(model, tokenizer, books, max_tokens=N)`` (sentences, every
  layer, top 50, batch 32).

``books``: ``../shared/corpus`` without its three held-out books; ``text``: the start of a training
book cut to about ``N`` tokens (the count reported is what the pass read).

    python benchmarks/bench_passes.py --tokens 5000 --large 100000 --large-passes SecondMoment

Prints a Markdown table and the machine line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")
PASSES = ("forward", "lens_stats", "fit_shortcut", "train_tuned_lens", "compare_lenses", "SecondMoment",
          "pca_experiment", "mine_triggers")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _books() -> list[Path]:
    return [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]


def _text(tokenizer, n_tokens: int) -> str:
    """The start of the first training book, cut at the end of its ``n_tokens``-th token."""
    text = _books()[0].read_text(encoding="utf-8")
    enc = tokenizer(text[: 8 * n_tokens], return_offsets_mapping=True, add_special_tokens=False,
                    verbose=False)
    return text[: enc["offset_mapping"][min(n_tokens, len(enc["input_ids"])) - 1][1]]


def _run(name: str, model, tokenizer, n: int) -> int:
    """Run pass ``name`` on about ``n`` tokens; return the tokens it read."""
    import torch

    import reslens
    from reslens.lens import lens_stats
    from reslens.lens import LinearShortcut, TunedLens, compare_lenses, fit_shortcut, train_tuned_lens

    arch = reslens.adapter(model)
    if name == "forward":
        from reslens._stream import batches, units

        windows = list(units(tokenizer, [_text(tokenizer, n)], max_length=128))
        with torch.no_grad():
            for b in batches(tokenizer, windows, 8):
                arch.body(input_ids=b.input_ids, attention_mask=b.attention_mask.long(), use_cache=False)
        return sum(map(len, windows))
    if name == "lens_stats":
        return lens_stats(model, _text(tokenizer, n), tokenizer=tokenizer, progress=False).n_tokens
    if name == "fit_shortcut":
        shortcut = fit_shortcut(model, _books(), tokenizer=tokenizer, max_tokens=n, progress=False)
        return shortcut.config["n_tokens"]
    if name == "train_tuned_lens":
        lens = train_tuned_lens(model, _books(), tokenizer=tokenizer, max_tokens=n, tokens_per_step=512,
                                progress=False)
        return lens.config["n_tokens"]
    if name == "compare_lenses":
        shape = (arch.n_layer, arch.d_model)
        eye = torch.eye(arch.d_model).repeat(arch.n_layer, 1, 1)
        lenses = [None, LinearShortcut(eye, torch.zeros(shape)), TunedLens.identity(*shape)]
        return compare_lenses(model, [CORPUS / HELD_OUT[0]], lenses, tokenizer=tokenizer, max_tokens=n,
                              progress=False).n_tokens
    if name == "SecondMoment":
        from reslens.rome import SecondMoment

        stats = SecondMoment.compute(model, 1, _books(), tokenizer=tokenizer, max_tokens=n, max_length=512)
        return stats.n_tokens
    if name == "pca_experiment":
        from reslens.pca import pca_experiment

        text = _text(tokenizer, n)
        pca_experiment(model, tokenizer, text, n=200, progress=False)
        return len(tokenizer(text, verbose=False)["input_ids"])
    if name == "mine_triggers":
        from reslens import kv_memory as kv

        return kv.mine_triggers(model, tokenizer, _books(), max_tokens=n, progress=False).n_tokens
    raise ValueError(f"unknown pass {name!r}; choose from {PASSES}")


def child(name: str, n: int, threads: int) -> None:
    import torch

    import reslens

    torch.set_num_threads(threads)
    model, tokenizer = reslens.load_model("smollm2")
    loaded = _rss_mb()
    start = time.perf_counter()
    tokens = _run(name, model, tokenizer, n)
    seconds = time.perf_counter() - start
    print(json.dumps({"pass": name, "asked": n, "tokens": tokens, "seconds": seconds, "rss_loaded_mb": loaded,
                      "rss_peak_mb": _rss_mb()}))


def _measure(name: str, n: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", name, "--tokens", str(n), "--threads", str(threads)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=5000, help="tokens per pass (default 5000)")
    parser.add_argument("--large", type=int, default=None, help="a second size for --large-passes")
    parser.add_argument("--large-passes", nargs="*", default=[], choices=PASSES)
    parser.add_argument("--passes", nargs="*", default=list(PASSES), choices=PASSES)
    parser.add_argument("--sizes", nargs="*", default=[], metavar="PASS=N",
                        help="another first size for a pass (e.g. train_tuned_lens=2048)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens, args.threads)
        return
    sizes = {k: int(v) for k, v in (s.split("=") for s in args.sizes)}
    runs = [(p, sizes.get(p, args.tokens)) for p in args.passes]
    runs += [(p, args.large) for p in args.large_passes if args.large]
    rows, forward = [], None
    for name, n in runs:
        r = _measure(name, n, args.threads)
        print(json.dumps(r), file=sys.stderr, flush=True)
        if name == "forward" and forward is None:
            forward = r["seconds"] / r["tokens"]
        rows.append(r)
    print(f"\nSmolLM2-135M-Instruct, float32, CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores shared with other work), torch threads {args.threads}\n")
    print("| pass | tokens read | seconds | ms / token | x forward | RSS after load (MB) | peak RSS (MB) | "
          "peak - load (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = r["seconds"] / r["tokens"]
        ratio = f"{per / forward:.2f}" if forward else "-"
        print(f"| {r['pass']} | {r['tokens']:,} | {r['seconds']:.1f} | {1000 * per:.2f} | {ratio} | "
              f"{r['rss_loaded_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
              f"{r['rss_peak_mb'] - r['rss_loaded_mb']:.0f} |")


if __name__ == "__main__":
    main()
