"""Data-parallel trigger mining: tokens/s of ``mine_triggers`` in 1 process and in 2 (torchrun, gloo),
the time of the exact merge, and the bytes each rank sends to it.

    python benchmarks/bench_distributed.py --tokens 20000 --repeats 3                  # the embedded GPT-2
    python benchmarks/bench_distributed.py --model smollm2 --tokens 6000 --repeats 3

Configurations, interleaved per repeat, each a fresh process (model loading not timed):

- 1 process, 2 threads (what one process does on this 2-core machine),
- 1 process, 1 thread,
- 2 processes (``torch.distributed.run --standalone --nproc-per-node 2``), 1 thread each.

Each run mines all layers, top-50 per key, over the first ``--tokens`` tokens of the training books
of ../shared/corpus (sentences, sorted file order, held-out books left out), and reports the time of
``mine_triggers`` on rank 0 (after a barrier: the slowest rank), the time spent in the merge
(``_Miner.merged``, the only communication, timed after a barrier so that waiting for the slower
rank is counted apart), and the bytes a rank contributes to it: the top-k
state (float32 scores + int64 example and position per slot) and the token ids of the examples it
holds (int64 id, length and tokens). The 2-process index is checked equal to the 1-process one.
Every rank reads and tokenises the whole stream (so that the examples' numbers and the batches are
those of one process); the rate of that reading alone, in this process, bounds the speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")
CONFIGS = (("1 process, 2 threads", 1, 2), ("1 process, 1 thread", 1, 1),
           ("2 processes, 1 thread each", 2, 1))


def worker(args: argparse.Namespace) -> None:
    """Mine once (in this process, or as one torchrun rank) and print rank 0's measurements as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    import reslens
    from reslens import kv_memory as kv
    from reslens.kv_memory import mining

    model, tokenizer = reslens.load_model(args.model)
    books = [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]
    merge = {"seconds": 0.0, "bytes": 0, "calls": 0}
    merged = mining._Miner.merged.__func__

    def timed_merge(cls, miner, shard):
        state = sum(t.numel() * t.element_size() for t in (miner.scores, miner.example, miner.position))
        tokens = 8 * (2 * len(miner.stored) + sum(map(len, miner.stored.values())))
        start = time.perf_counter()
        shard.barrier()  # waiting for the slower rank is imbalance, not the merge
        merge["wait"] = merge.get("wait", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        out = merged(cls, miner, shard)
        merge["seconds"] += time.perf_counter() - start
        merge["bytes"], merge["calls"] = state + tokens if shard.parallel else 0, merge["calls"] + 1
        merge["state_bytes"], merge["token_bytes"] = state, tokens
        return out

    mining._Miner.merged = classmethod(timed_merge)
    from reslens._distributed import shard_of

    shard = shard_of()
    shard.barrier()
    start = time.perf_counter()
    index = kv.mine_triggers(model, tokenizer, books, max_tokens=args.tokens, top_k=50,
                             batch_size=args.batch_size, progress=False)
    shard.barrier()
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for t in (index.scores, index.example, index.position, index.example_tokens):
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    if shard.primary:
        print(json.dumps({"seconds": seconds, "tokens": index.n_tokens, "merge": merge,
                          "index": digest.hexdigest(), "layers": len(index.layers),
                          "d_mlp": int(index.scores.shape[1]), "top_k": index.top_k, "world": shard.world}))
    if shard.parallel:
        import torch.distributed as dist

        dist.destroy_process_group()


def run(nproc: int, threads: int, args: argparse.Namespace) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--tokens", str(args.tokens), "--threads", str(threads),
          "--batch-size", str(args.batch_size)] + (["--model", args.model] if args.model else [])
    if nproc == 1:
        command = [sys.executable, *me]
    else:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        command = [sys.executable, *launch, *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a reslens.load_model name (default: embedded GPT-2)")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"model {args.model or 'embedded GPT-2'}, {args.tokens} tokens, batch {args.batch_size}, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    for repeat in range(args.repeats):
        for name, nproc, threads in CONFIGS:
            runs[name].append(run(nproc, threads, args))
            r = runs[name][-1]
            print(f"  repeat {repeat}: {name}: {r['seconds']:.1f} s, merge {r['merge']['seconds']:.3f} s",
                  flush=True)
    indexes = {r["index"] for rs in runs.values() for r in rs}
    first = runs[CONFIGS[0][0]][0]
    print(f"\n{first['tokens']} tokens, {first['layers']} layers x {first['d_mlp']} keys x "
          f"top-{first['top_k']}; every run's index the same: {len(indexes) == 1}")
    base = statistics.median(r["seconds"] for r in runs[CONFIGS[0][0]])
    print(f"{'configuration':<28} {'median s':>9} {'tok/s':>8} {'vs 1 proc 2 thr':>16} {'merge s':>8} "
          f"{'merge MB/rank':>14}")
    for name, _, _ in CONFIGS:
        seconds = statistics.median(r["seconds"] for r in runs[name])
        merge_s = statistics.median(r["merge"]["seconds"] for r in runs[name])
        sent = statistics.median(r["merge"]["bytes"] for r in runs[name]) / 1e6
        print(f"{name:<28} {seconds:>9.1f} {first['tokens'] / seconds:>8.0f} {base / seconds:>15.2f}x "
              f"{merge_s:>8.3f} {sent:>14.1f}")
    print(f"waiting for the slower rank before the merges (median): "
          f"{statistics.median(r['merge'].get('wait', 0.0) for r in runs[CONFIGS[2][0]]):.3f} s")
    two = runs[CONFIGS[2][0]][0]["merge"]
    print(f"a rank's merge input: top-k state {two['state_bytes'] / 1e6:.1f} MB "
          f"(= layers x d_mlp x top_k x 20 B), token ids {two['token_bytes'] / 1e6:.2f} MB")
    print(f"reading and tokenising the stream alone (1 thread, what every rank repeats): "
          f"{reading_rate(args):.0f} tok/s")


def reading_rate(args: argparse.Namespace) -> float:
    """Tokens/s of reading, sentence-splitting and tokenising the first ``--tokens`` tokens, median of 3."""
    import torch

    import reslens
    from reslens._corpus import corpus_texts
    from reslens._stream import units

    torch.set_num_threads(1)
    _, tokenizer = reslens.load_model(args.model)
    books = [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]
    rates = []
    for _ in range(3):
        start, total = time.perf_counter(), 0
        texts, _ = corpus_texts(books)
        for ids in units(tokenizer, texts, unit="sentence", max_length=128):
            if total + len(ids) > args.tokens:
                break
            total += len(ids)
        rates.append(total / (time.perf_counter() - start))
    return statistics.median(rates)


if __name__ == "__main__":
    main()
