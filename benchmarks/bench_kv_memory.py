"""Trigger mining over the corpus: tokens/s of ``mine_triggers`` (all layers, top-50 per key)
against plain forwards over the same batches, and peak memory as the corpus doubles.

    python benchmarks/bench_kv_memory.py --tokens 1000000 --repeats 3          # the embedded GPT-2
    python benchmarks/bench_kv_memory.py --model smollm2 --tokens 100000 --repeats 1 --threads 1

``--model`` takes a ``reslens.load_model`` name (SmolLM2's gated MLP is mined signed, by |m|).
Units are sentences of the training books of ../shared/corpus (sorted file order, the three
held-out books left out). The
forward baselines run on the batches mining forms (same sentences, same length-sorted
groups, same padding), already tokenized; mining is timed end to end (reading, sentence
splitting and tokenizing included). The memory runs are separate processes (``--memory``)
so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import reslens
from reslens import kv_memory as kv
from reslens._corpus import corpus_texts
from reslens._stream import units as token_units
from reslens._inputs import pad_ids, pad_token_id
from reslens.arch import adapter

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")


def training_books() -> list[Path]:
    return [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]


def batches_like_mining(tokenizer, max_tokens: int, batch_size: int, window: int):
    """The padded batches ``mine_triggers`` forms for the first ``max_tokens`` tokens."""
    texts, _ = corpus_texts(training_books())
    units, total = [], 0
    for ids in token_units(tokenizer, texts, unit="sentence", max_length=window):
        if total + len(ids) > max_tokens:
            break
        units.append(ids)
        total += len(ids)
    batches, group = [], 16 * batch_size
    for start in range(0, len(units), group):
        chunk = sorted(units[start : start + group], key=len)
        pad_id = pad_token_id(tokenizer)
        batches += [
            pad_ids(chunk[i : i + batch_size], pad_id=pad_id) for i in range(0, len(chunk), batch_size)
        ]
    return batches, total


def mine(model, tokenizer, max_tokens: int, batch_size: int):
    return kv.mine_triggers(
        model, tokenizer, training_books(), max_tokens=max_tokens, batch_size=batch_size, progress=False
    )


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_run(tokens: int, batch_size: int, device: str, name: str | None) -> None:
    """Mine ``tokens`` tokens, sampling this process's RSS every 5 ms (``ru_maxrss`` is useless
    here: a child started from a large parent inherits the parent's peak)."""
    model, tokenizer = reslens.load_model(name, device=device)
    mine(model, tokenizer, 2_000, batch_size)  # warm-up: allocator pools, lazy imports
    before = _rss_mb()
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    index = mine(model, tokenizer, tokens, batch_size)
    done.set()
    sampler.join()
    row = {
        "tokens": index.n_tokens,
        "peak_rss_mb": max(peak[0], _rss_mb()),
        "before_mining_mb": before,
        "stored_examples": len(index.example_ids),
    }
    if device.startswith("cuda"):
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", help="cpu, or cuda for the GPU run (RSS then covers host memory only)"
    )
    parser.add_argument(
        "--lm-head-repeats",
        type=int,
        default=1,
        help="repeats of the (slow) forward with the LM head; 0 skips it",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="reslens.load_model name or path (default: the embedded GPT-2; e.g. smollm2)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the two peak-memory runs")
    parser.add_argument("--memory", type=int, default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory is not None:
        return memory_run(args.memory, args.batch_size, args.device, args.model)

    torch.manual_seed(0)
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    arch = adapter(model)
    window = min(arch.n_ctx, 128)
    batches, total = batches_like_mining(tokenizer, args.tokens, args.batch_size, window)

    def plain(runner):
        def run():
            with torch.no_grad():
                for b in (b.to(args.device) for b in batches):
                    runner(
                        input_ids=b.input_ids,
                        attention_mask=b.attention_mask.long(),
                        position_ids=b.position_ids,
                        use_cache=False,
                    )

        return run

    timings = {
        "forward (model, with LM head)": plain(model),
        "forward (model body, no LM head)": plain(arch.body),
        "mine_triggers (end to end)": lambda: mine(model, tokenizer, args.tokens, args.batch_size),
    }
    results = {name: [] for name in timings}
    for repeat in range(args.repeats):
        for name, fn in timings.items():  # interleaved, so drift hits every row alike
            if name == "forward (model, with LM head)" and repeat >= args.lm_head_repeats:
                continue  # the LM-head forward is several times slower than the rest; fewer repeats
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            results[name].append(time.perf_counter() - start)
    mining = statistics.median(results["mine_triggers (end to end)"])
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(
        f"model: {args.model or 'embedded GPT-2'} ({arch.n_layer} layers, d_mlp {arch.d_mlp}, "
        f"{'gated, mined signed' if arch.gated_mlp else 'GELU'}); machine: {device}, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {total} tokens in {len(batches)} batches of <= "
        f"{args.batch_size} sentences"
    )
    lm_head = min(args.lm_head_repeats, args.repeats)
    print(f"repeats: {args.repeats} (forward with LM head: {lm_head}), interleaved")
    print("| what | median s | tokens/s | mining throughput / this |")
    print("|---|---|---|---|")
    for name, times in results.items():
        if not times:  # --lm-head-repeats 0
            continue
        t = statistics.median(times)
        print(f"| {name} | {t:.2f} | {total / t:,.0f} | {t / mining:.2f} |")

    if args.skip_memory:
        return None
    print(
        "\n| corpus tokens | RSS before mining (MB) | peak RSS while mining (MB) | growth (MB) "
        "| examples stored |"
    )
    print("|---|---|---|---|---|")
    for tokens in (args.tokens // 2, args.tokens):
        model_args = ["--model", args.model] if args.model else []
        threads = ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory",
                str(tokens),
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
                *model_args,
                *threads,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {row['tokens']:,} | {row['before_mining_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
            f"{row['peak_rss_mb'] - row['before_mining_mb']:.0f} | {row['stored_examples']:,} |"
            + (f" GPU peak {row['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in row else "")
        )


if __name__ == "__main__":
    main()
