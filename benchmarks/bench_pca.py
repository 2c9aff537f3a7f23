"""The 200-prediction PCA experiment on the embedded model: time of the batched PCA against
the forward passes that produce the residuals, and against a loop of scikit-learn fits.

    python benchmarks/bench_pca.py --repeats 5

Text: the held-out book Persuasion from ../shared/corpus (windows of 128 tokens).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from sklearn.decomposition import PCA

import reslens
from reslens import Batch, capture
from reslens.arch import adapter
from reslens._pca_samples import model_top1 as _final_prediction
from reslens._pca_samples import sample_windows as _sample_windows
from reslens.pca import _batched_pca, _stack_pca

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "105-persuasion.txt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = reslens.load_model()
    g = adapter(model)
    windows, chosen = _sample_windows(tokenizer, CORPUS.read_text(), args.n, 0, 128, 8)
    used = sorted({w for w, _ in chosen})
    ids = torch.full((len(used), 128), 0, dtype=torch.long)
    mask = torch.zeros((len(used), 128), dtype=torch.bool)
    for row, w in enumerate(used):
        ids[row, : len(windows[w])], mask[row, : len(windows[w])] = torch.tensor(windows[w]), True
    row_of = {w: row for row, w in enumerate(used)}
    seq = torch.tensor([row_of[w] for w, _ in chosen])
    pos = torch.tensor([p for _, p in chosen])
    batch = Batch(ids, mask)

    def forward():
        res = capture(g, batch, sites=("resid",))
        return res.resid[:, seq, pos].transpose(0, 1), _final_prediction(g, res, seq, pos)

    stacks, final = forward()

    def batched():
        _batched_pca(g, stacks, center=True, normalize=None)

    def batched_readout():
        _stack_pca(g, stacks, final, center=True, normalize=None)

    def sklearn_loop():
        for stack in stacks.double().numpy():
            PCA(svd_solver="full").fit(stack)

    cases = {
        "forward passes (capture resid of the windows)": forward,
        "batched torch PCA": batched,
        "batched torch PCA + PC1 vocabulary readouts": batched_readout,
        "loop of sklearn PCA fits": sklearn_loop,
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    fwd = med["forward passes (capture resid of the windows)"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"embedded model ({g.n_layer} x {g.d_model}), {args.n} predictions in {len(used)} windows "
        f"of <=128 tokens, {args.repeats} interleaved repeats\n"
    )
    print("| case | median s | ratio to forward |")
    print("|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m:.4f} | {m / fwd:.3f} |")
    speedup = med["loop of sklearn PCA fits"] / med["batched torch PCA"]
    print(f"\nbatched PCA is {speedup:.1f}x faster than the sklearn loop")


if __name__ == "__main__":
    random.seed(0)
    main()
