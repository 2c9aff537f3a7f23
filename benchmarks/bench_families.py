"""Capture and the logit lens on every family, against the plain HuggingFace forward, side by side.

Each family at one realistic small shape (random weights, float32, CPU): 6 layers, d_model 512, 8 heads
(4 key/value heads where the family groups them), head width 64, MLP width 1,536 (experts: 8 of width
512, 2 routed), vocabulary 32,000; a batch of 2 x 256 tokens. Interleaved repeats per family (the
order rotates each repeat), medians reported:

- ``forward``: ``model(ids, output_hidden_states=True, use_cache=False)`` under ``no_grad`` -- what a
  user runs without reslens to get every layer's residual and the logits;
- ``capture``: ``reslens.capture(model, ids, sites=("resid", "logits"))`` -- like for like;
- ``capture+``: also ``attn_out``, ``mlp_out`` and ``attn_z`` (more than HF returns);
- ``lens``: ``reslens.lens.logit_lens(model, ids)`` (every layer's lens, top-5, no ``output_hidden_states``
  counterpart in HF).

    python benchmarks/bench_families.py --repeats 5 --threads 2

Prints a Markdown table (median seconds, ratios to ``forward``) and the machine line.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPE = dict(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             intermediate_size=1536, vocab_size=32000, max_position_embeddings=1024)
GPT2_SHAPE = dict(n_layer=6, n_embd=512, n_head=8, n_inner=1536, vocab_size=32000, n_positions=1024)


def build(family: str) -> torch.nn.Module:
    """A random model of ``family`` (:data:`helpers.FAMILIES`) at :data:`SHAPE`."""
    from helpers import make_family

    if family == "gpt2":
        return make_family("gpt2", **GPT2_SHAPE)
    shape = dict(SHAPE)
    if family.startswith("gpt_neox"):
        shape.pop("num_key_value_heads"), shape.pop("head_dim")
    if family in ("mixtral", "olmoe", "qwen3_moe"):
        shape["intermediate_size"] = 512
        shape.update(num_local_experts=8) if family == "mixtral" else shape.update(num_experts=8)
        if family == "qwen3_moe":
            shape["moe_intermediate_size"] = 512
    if family == "gemma2":
        shape["query_pre_attn_scalar"] = 64
    if family == "gemma3":
        shape.update(query_pre_attn_scalar=64, sliding_window=128,
                     layer_types=["sliding_attention"] * 5 + ["full_attention"])
    if family == "gemma2":
        shape.update(sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 3)
    return make_family(family, **shape)


def main() -> None:
    from helpers import FAMILIES

    from reslens import capture
    from reslens.lens import logit_lens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"batch {args.batch} x {args.pos}, {args.repeats} interleaved repeats, medians in seconds\n")
    print("| family | forward | capture | capture+ | lens | capture ÷ forward | capture+ ÷ forward | lens ÷ forward |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        model = build(family)
        ids = torch.randint(3, 32000, (args.batch, args.pos), generator=torch.Generator().manual_seed(0))
        cases = {
            "forward": lambda: model(ids, output_hidden_states=True, use_cache=False),
            "capture": lambda: capture(model, ids, sites=("resid", "logits")),
            "capture+": lambda: capture(model, ids, sites=("resid", "logits", "attn_out", "mlp_out", "attn_z")),
            "lens": lambda: logit_lens(model, ids),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        with torch.no_grad():
            for fn in cases.values():
                fn()  # warm-up
            names = list(cases)
            for repeat in range(args.repeats):
                for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                    start = time.perf_counter()
                    cases[name]()
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        base = med["forward"]
        print(f"| {family} | {base:.3f} | {med['capture']:.3f} | {med['capture+']:.3f} | {med['lens']:.3f} | "
              f"{med['capture'] / base:.3f} | {med['capture+'] / base:.3f} | {med['lens'] / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
