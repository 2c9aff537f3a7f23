"""Time a full causal trace (``kind="resid"``, every (layer, token) cell) batched against
per-cell loops of forwards, on the GPT-2-small shape.

GPT-2-small shape (``GPT2Config()`` defaults: 12 layers, d_model 768, 12 heads, vocab 50257),
random weights (seed 0, eval mode), a 10-token prompt with a 3-token subject at tokens 1..3,
``samples`` noise draws (default 10), CPU, ``torch.set_num_threads(--threads)``.

Cases, timed interleaved (A, B, C, A, B, C, ...), medians:

- ``batched``: ``reslens.tracing.causal_trace_ids`` -- ``cells x samples`` rows per forward
  (``batch_size`` rows at most), clean states captured once, unembedding of the last position
  only; exact by causality: one staged forward per restored token ``t`` computing positions
  ``t ..`` only (earlier keys/values from the corrupted run), each cell's rows joining at its
  restored block from the corrupted residual, the last block at the last position only, cells
  that cannot reach the last position (last block, earlier token) and cells before the
  subject not run.
- ``per-cell loop``: one full forward of ``samples`` rows per cell, every cell, clean states
  captured once, last position unembedded only: what batching and the shortcuts buy.
- ``ROME-style loop``: what ROME's ``trace_important_states`` does -- one forward per cell of
  ``samples + 1`` rows (row 0 clean, restored from within the batch), full LM-head logits
  at every position, every cell.

The three agree (max |difference| of restored probabilities is printed).

    nice -n 10 python benchmarks/bench_tracing.py [--samples 10] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from reslens.arch import adapter
from reslens.hooks import capture, patch
from reslens.tracing import Noise, causal_trace_ids, embedding_std
from reslens.tracing._engine import draw_noise


def rome_style_loop(model, ids, span, answer_id, noise):
    """ROME's ``trace_important_states``: one forward of ``samples + 1`` rows per cell."""
    n_layer, n = adapter(model).n_layer, ids.shape[0]
    samples = noise.shape[0]
    start, end = span
    out = torch.empty(n_layer, n)
    rows = ids[None].expand(samples + 1, -1)
    for layer in range(n_layer):
        for token in range(n):
            def corrupt(t):
                t = t.clone()
                t[1:, start:end] += noise
                return t

            def restore(t, token=token):
                t = t.clone()
                t[1:, token] = t[0, token]
                return t

            with torch.no_grad(), patch(model, {("resid", 0): corrupt, ("resid", layer + 1): restore}):
                logits = model(rows, use_cache=False).logits  # [samples + 1, pos, vocab]
            out[layer, token] = torch.softmax(logits[1:, -1].float(), -1).mean(0)[answer_id]
    return out


def per_cell_loop(model, ids, span, answer_id, noise):
    """One full forward of ``samples`` rows per cell (every cell), clean states captured once,
    the last position unembedded only: isolates what batching and the shortcuts buy."""
    arch = adapter(model)
    n_layer, n = arch.n_layer, ids.shape[0]
    start, end = span
    clean = capture(model, ids[None], sites="resid").resid[:, 0]  # [n_layer + 1, pos, d]
    out = torch.empty(n_layer, n)
    rows = ids[None].expand(noise.shape[0], -1)
    for layer in range(n_layer):
        for token in range(n):
            def corrupt(t):
                t = t.clone()
                t[:, start:end] += noise
                return t

            def restore(t, layer=layer, token=token):
                t = t.clone()
                t[:, token] = clean[layer + 1, token]
                return t

            with torch.no_grad(), patch(model, {("resid", 0): corrupt, ("resid", layer + 1): restore}):
                h = arch.final_hidden(rows)[:, -1]
                p = torch.softmax(arch.unembed(h).float(), -1)[:, answer_id]
            out[layer, token] = p.mean()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.randint(0, 50257, (10,), generator=torch.Generator().manual_seed(0))
    span = (1, 4)
    with torch.no_grad():
        answer_id = int(model(ids[None]).logits[0, -1].argmax())
    std = embedding_std(model, ids[span[0] : span[1]])
    noise = draw_noise(adapter(model), args.samples, span, 3.0 * std, 0)

    cases = {
        "batched": lambda: causal_trace_ids(model, ids, span, answer_id=answer_id,
                                            noise=Noise(samples=args.samples),
                                            batch_size=args.batch_size).restored_prob,
        "per-cell loop": lambda: per_cell_loop(model, ids, span, answer_id, noise),
        "ROME-style loop": lambda: rome_style_loop(model, ids, span, answer_id, noise),
    }
    times = {name: [] for name in cases}
    outputs = {}
    for name, fn in cases.items():  # warm-up, also the agreement check
        outputs[name] = fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    scale = float(outputs["batched"].abs().max())
    diff = max(float((outputs[name] - outputs["batched"]).abs().max()) for name in cases) / scale

    cells = 12 * ids.shape[0]
    print(f"GPT-2-small shape, random weights; prompt {ids.shape[0]} tokens, "
          f"subject tokens {span[0]}..{span[1] - 1}, {cells} cells, samples={args.samples}, "
          f"batch_size={args.batch_size} rows; torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}; "
          f"max |restored prob difference| / max restored prob = {diff:.1e}")
    print()
    print("| case | forwards | rows per forward | median s | min s | batched speed-up |")
    print("|---|---|---|---|---|---|")
    per_chunk = max(1, args.batch_size // args.samples)
    staged = (ids.shape[0] - span[0]) * -(-12 // per_chunk)  # one per restored token (and chunk)
    rows = {
        "batched": (f"3 full + {staged} staged suffix", f"≤ {per_chunk * args.samples}"),
        "per-cell loop": (cells, str(args.samples)),
        "ROME-style loop": (cells, str(args.samples + 1)),
    }
    base = statistics.median(times["batched"])
    for name in cases:
        med = statistics.median(times[name])
        print(f"| {name} | {rows[name][0]} | {rows[name][1]} | {med:.2f} | {min(times[name]):.2f} "
              f"| {med / base:.1f}x |")


if __name__ == "__main__":
    main()
