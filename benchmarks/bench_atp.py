"""Attribution patching with verification vs exact patching of every head, one forward at a time, on SmolLM2.

The induction task of ``examples/attribution_patching.py``: ``--n`` random sequences of ``--seq-len``
tokens written twice after the BOS; the corrupted batch has the first copy replaced by other random
tokens; metric: mean log-prob of the second copy's tokens. Side by side, in one process:

- ``atp + verify top K``: :func:`reslens.atp.attribution_patching` of all 270 heads (one corrupted
  forward, one clean forward and backward) and the exact patch of its top ``--top`` heads, batched;
- ``atp only``: the estimate alone (``verify=0``);
- ``batched exact, all heads``: the same function verifying every head (``verify=270``);
- ``one forward per head``: every head's corrupted ``attn_z`` slice patched into the clean run with
  :func:`reslens.patch`, one full forward each, 270 forwards (what one does without the tool).

Every case but the loop runs once as a warm-up, then ``--repeats`` times; medians are printed, with the
largest difference between the batched exact effects and the one-forward-per-head ones (they must agree).

    nice -n 10 python benchmarks/bench_atp.py [--n 4] [--seq-len 20] [--top 50] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import reslens
from reslens.atp import attribution_patching, log_prob
from reslens.heads import repeated_tokens


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=20)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def task(model, tokenizer, n, length):
    arch = reslens.adapter(model)
    bos = arch.start_token(tokenizer)
    bos = tokenizer.eos_token_id if bos is None else bos
    clean = repeated_tokens(model, seq_len=length, n=n, seed=0, bos_token_id=bos)
    corrupt = clean.clone()
    other = repeated_tokens(model, seq_len=length, n=n, seed=1, bos_token_id=bos)
    corrupt[:, 1 : 1 + length] = other[:, 1 : 1 + length]
    return clean, corrupt, log_prob(clean[:, length + 2 :], list(range(length + 1, 2 * length)))


def one_forward_per_head(model, clean, corrupt, metric):
    """Every head's exact effect, each with its own full forward: ``[n_layer, n_head]``."""
    arch = reslens.adapter(model)
    z = reslens.capture(model, corrupt, sites="attn_z")
    d = arch.d_head
    with torch.no_grad():
        base = float(metric(model(input_ids=clean).logits.float()))
    out = torch.zeros(arch.n_layer, arch.n_head)
    for layer in range(arch.n_layer):
        zc = z.get("attn_z", layer)
        for head in range(arch.n_head):
            def fn(x, zc=zc, head=head):
                x = x.clone()
                x[..., head * d : (head + 1) * d] = zc[..., head * d : (head + 1) * d]
                return x

            with reslens.patch(model, {("attn_z", layer): fn}), torch.no_grad():
                out[layer, head] = float(metric(model(input_ids=clean).logits.float())) - base
    return out


def timed(fn, repeats, warm=True):
    result = fn() if warm else None  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    print(f"  ... {statistics.median(times):.2f} s", flush=True)  # progress, before the table
    return statistics.median(times), result


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = reslens.load_model(args.model)
    arch = reslens.adapter(model)
    n_heads = arch.n_layer * arch.n_head
    clean, corrupt, metric = task(model, tokenizer, args.n, args.seq_len)

    def atp(verify):
        return attribution_patching(model, clean, corrupt, metric=metric, kinds="heads", verify=verify,
                                    sample=0)

    rows = []
    t_top, r_top = timed(lambda: atp(args.top), args.repeats)
    t_est, _ = timed(lambda: atp(0), args.repeats)
    t_all, r_all = timed(lambda: atp(n_heads), args.repeats)
    # no warm-up run for the loop: its first forwards warm it, and it is the slow case
    t_loop, loop = timed(lambda: one_forward_per_head(model, clean, corrupt, metric), args.repeats,
                         warm=False)
    rows += [(f"atp + verify top {args.top}", t_top), ("atp only", t_est),
             (f"batched exact, all {n_heads} heads (+ atp)", t_all),
             (f"one forward per head ({n_heads})", t_loop)]
    diff = max(abs(float(x) - float(loop[lay, h])) for lay, h, x in
               zip(r_all.checked_layer, r_all.checked_index, r_all.checked_exact))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model {args.model}; batch {tuple(clean.shape)}")
    print("| case | seconds (median) | vs one forward per head |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t_loop / t:.1f}x |")
    print(f"max |batched exact - one-forward exact| over all heads: {diff:.2e}")
    top = ", ".join(lab for lab, _ in r_top.top("heads", 6))
    print(f"Spearman of the estimate vs exact over the top {args.top}: {r_top.spearman():.3f}; over all "
          f"heads: {r_all.spearman():.3f}; top heads by estimate: {top}")


if __name__ == "__main__":
    main()
