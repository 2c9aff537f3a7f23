"""Time ``reslens.heads``'s weight-based circuits for the GPT-2-small shape (all 144 heads) on CPU.

``--shape smollm2``: a random Llama-family model of SmolLM2-135M's shape instead (30 layers, d_model
576, 9 heads / 3 key/value heads, vocab 49152, rotary), with ``composition_by_offset`` at 8 offsets.

Random weights (``GPT2Config()`` defaults: 12 layers, d_model 768, 12 heads, vocab 50257,
seed 0, float32). Each case runs once as a warm-up, then ``--repeats`` times; the median
and the minimum are printed as a Markdown table with the machine line.

- ``ov_eigen_summary``: ``W_U^T W_E`` once (``[768, 50257] @ [50257, 768]``, in float64 since
  issue 18 item 10), then one ``d_head x d_head`` matrix and its eigenvalues per head;
  ``fold_ln=True`` and ``effective_embedding="embed+mlp0"`` (block 0's MLP on all 50257
  embeddings) as extra rows.
- ``composition_scores`` for ``q``, ``k``, ``v``: all 9,504 earlier -> later pairs through
  ``d_head``-sized factors, plus the random baseline (200 samples).
- ``dense composition (extrapolated)``: the textbook ``‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F)``
  with ``[768, 768]`` matrices, timed on 50 pairs and scaled to 9,504 pairs, for reference.

    nice -n 10 python benchmarks/bench_heads.py [--repeats 3] [--threads N] [--shape gpt2|smollm2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from reslens import heads
from reslens.arch import adapter


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def dense_composition_per_pair(model, n_pairs: int = 50) -> float:
    arch = adapter(model)
    w_ov = [arch.W_V(layer).detach() @ arch.W_O(layer).detach() for layer in range(2)]  # [H, d, d]
    w_qk = [arch.W_Q(layer).detach() @ arch.W_K(layer).detach().transpose(-1, -2) for layer in range(2)]
    start = time.perf_counter()
    for i in range(n_pairs):
        a, b = w_ov[0][i % 12], w_qk[1][(i * 5) % 12]
        (a @ b).norm() / (a.norm() * b.norm())
    return (time.perf_counter() - start) / n_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shape", choices=("gpt2", "smollm2"), default="gpt2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.shape == "smollm2":
        return bench_llama_shape(args)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    g = adapter(model)
    n_pairs = sum(g.n_head * g.n_head * (g.n_layer - 1 - a) for a in range(g.n_layer))

    rows = []
    for label, fn in [
        ("ov_eigen_summary()", lambda: heads.ov_eigen_summary(model)),
        ("ov_eigen_summary(fold_ln=True)", lambda: heads.ov_eigen_summary(model, fold_ln=True)),
        ('ov_eigen_summary(effective_embedding="embed+mlp0")',
         lambda: heads.ov_eigen_summary(model, effective_embedding="embed+mlp0")),
        ('composition_scores("q")', lambda: heads.composition_scores(model, "q")),
        ('composition_scores("k")', lambda: heads.composition_scores(model, "k")),
        ('composition_scores("v")', lambda: heads.composition_scores(model, "v")),
    ]:
        median, best = timed(fn, args.repeats)
        rows.append((label, median, best))
    per_pair = dense_composition_per_pair(model)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-small shape "
          f"({g.n_layer} x {g.n_head} heads, d_model {g.d_model}, vocab {g.d_vocab}), random weights, "
          "float32")
    print()
    print("| case | median s | min s |")
    print("| --- | ---: | ---: |")
    for label, median, best in rows:
        print(f"| `{label}` | {median:.2f} | {best:.2f} |")
    print(f"| dense `[768,768]` composition, one kind, {n_pairs} pairs (extrapolated from 50) | "
          f"{per_pair * n_pairs:.1f} | |")


def bench_llama_shape(args) -> None:
    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    g = adapter(model)
    offsets = (0, 1, 2, 4, 8, 16, 32, 64)
    rows = []
    for label, fn in [
        ("ov_eigen_summary()", lambda: heads.ov_eigen_summary(model)),
        ("ov_eigen_summary(fold_ln=True)", lambda: heads.ov_eigen_summary(model, fold_ln=True)),
        ('composition_scores("k")', lambda: heads.composition_scores(model, "k")),
        ('composition_scores("v")', lambda: heads.composition_scores(model, "v")),
        (f'composition_by_offset("k", {len(offsets)} offsets)',
         lambda: heads.composition_by_offset(model, "k", offsets)),
    ]:
        median, best = timed(fn, args.repeats)
        rows.append((label, median, best))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M shape "
          f"({g.n_layer} x {g.n_head} heads, {g.n_kv_head} key/value heads, d_model {g.d_model}, "
          f"vocab {g.d_vocab}), random weights, float32")
    print()
    print("| case | median s | min s |")
    print("| --- | ---: | ---: |")
    for label, median, best in rows:
        print(f"| `{label}` | {median:.2f} | {best:.2f} |")


if __name__ == "__main__":
    main()
