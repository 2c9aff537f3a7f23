"""Time of ``reslens.hooks.capture`` against a plain HuggingFace forward with
``output_hidden_states=True``, measured side by side (interleaved) in one run.

GPT-2-small shape (124M parameters, random weights), batch 8 x 512, CPU by default.

    python benchmarks/bench_capture.py --repeats 5

Prints a Markdown table of medians and ratios to the plain forward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from reslens import capture

RESID_SITES = ("resid", "resid_mid", "attn_out", "mlp_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=50256, eos_token_id=50256)).eval().to(args.device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.pos), device=args.device)

    def plain():
        with torch.no_grad():
            model(ids, output_hidden_states=True)

    cases = {
        "HF forward, output_hidden_states=True": plain,
        f"capture {'+'.join(RESID_SITES)}": lambda: capture(model, ids, sites=RESID_SITES),
        f"capture {'+'.join(RESID_SITES)}+logits": lambda: capture(model, ids, sites=(*RESID_SITES, "logits")),
        "capture every site (+mlp_act, attn_pattern, final, logits)": lambda: capture(
            model, ids, sites=(*RESID_SITES, "mlp_act", "attn_pattern", "final", "logits")
        ),
    }
    plain()  # warm-up
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["HF forward, output_hidden_states=True"])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"shape: GPT-2 small (124M), batch {args.batch} x {args.pos}, {args.device}, {args.repeats} interleaved repeats\n")
    print("| case | median s | min s | ratio to forward |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
