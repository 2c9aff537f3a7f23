"""Capture and the logit lens against the plain HuggingFace forward on a Llama-family model, side by side.

Default: a random ``LlamaForCausalLM`` of SmolLM2-135M's shape (30 layers, d_model 576, 9 heads / 3 KV
heads, d_mlp 1536, vocabulary 49,152, tied head); ``--real`` uses SmolLM2-135M itself from the reslens
cache (``reslens download smollm2``) and also times its first and cached loads.

    python benchmarks/bench_llama.py --repeats 5 [--batch 4 --pos 256] [--real]

Cases are interleaved (A, B, C, ..., A, B, C, ...) after one warm-up each; medians and ratios to the
forward come from the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import torch

from reslens import capture
from reslens.lens import logit_lens

RESID_SITES = ("resid", "resid_mid", "attn_out", "mlp_out")


def smollm2_shaped() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).eval()


def load_times() -> tuple[float, float]:
    """Seconds for load_model('smollm2') in a fresh process: once (cached) and import overhead alone."""
    code = "import time; t = time.perf_counter(); import reslens; reslens.load_model('smollm2'); " \
           "print(time.perf_counter() - t)"
    cached = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    code = "import time; t = time.perf_counter(); import reslens.models, transformers; print(time.perf_counter() - t)"
    imports = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    return cached, imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M from the cache instead of random weights")
    args = parser.parse_args()

    if args.real:
        import reslens

        model, _ = reslens.load_model("smollm2")
    else:
        model = smollm2_shaped()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.pos), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(ids, output_hidden_states=True)

    cases = {
        "HF forward, output_hidden_states=True": forward,
        f"capture {'+'.join(RESID_SITES)}": lambda: capture(model, ids, sites=RESID_SITES),
        f"capture {'+'.join(RESID_SITES)}+logits": lambda: capture(model, ids, sites=(*RESID_SITES, "logits")),
        "logit_lens, all 31 layers, top-5 + every metric": lambda: logit_lens(model, ids, top_k=5),
    }
    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["HF forward, output_hidden_states=True"])
    what = "SmolLM2-135M-Instruct (dequantised Q4_1)" if args.real else "random LlamaForCausalLM, SmolLM2-135M shape"
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {what}; batch {args.batch} x {args.pos}; {args.repeats} interleaved repeats\n")
    print("| case | median s | min s | ratio to forward |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f} | {med / base:.2f} |")
    if args.real:
        cached, imports = load_times()
        print(f"\nload_model('smollm2') from the cache, fresh process: {cached:.2f} s (of which imports {imports:.2f} s)")


if __name__ == "__main__":
    main()
