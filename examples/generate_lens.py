"""The lens in motion: read every layer while the model writes, recorded with the KV cache.

Greedy generation from a few prompts with :func:`reslens.generate` (batched, left-padded), the logit
lens of every position recorded as it was computed (no second forward). The script prints what each
row wrote, then compares where the lens settles on the model's own choice while it writes against the
same measure on the prompt (text the model read, not wrote): per position, the first layer from which
the lens's top-1 stays the model's output (``convergence_layer``). Under greedy decoding the output's
top-1 at a written position is the token written next.

    python examples/generate_lens.py --model smollm2
    python examples/generate_lens.py                    # the embedded 4-layer GPT-2

Writes ``generate_lens.png`` (the lens of row 0) and ``generate_lens.safetensors``
(``reslens.generation.Generation.load`` reads it back) to ``--out-dir``.
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch

import reslens

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "When the old sailor came back to the inn, he asked for",
    "The three primary colours are",
    "def fibonacci(n):",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded GPT-2; "
                        "smollm2 for SmolLM2-135M-Instruct)")
    parser.add_argument("--new", type=int, default=24, help="new tokens per row (default 24)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the figure and result")
    return parser.parse_args()


def main():
    args = parse_args()
    model, tokenizer = reslens.load_model(args.model)
    start = time.perf_counter()
    gen = reslens.generate(model, PROMPTS, tokenizer=tokenizer, max_new_tokens=args.new, lens="logit")
    seconds = time.perf_counter() - start
    print(f"{len(PROMPTS)} rows, {sum(gen.new_tokens)} new tokens in {seconds:.1f} s (lens included)\n")
    for row, prompt in enumerate(PROMPTS):
        print(f"{row}: {prompt!r} -> {gen.texts[row]!r}")
    lens, mask = gen.lens, gen.residuals.attention_mask
    written = torch.zeros_like(mask)
    written[:, gen.prompt_length:] = True
    last = torch.zeros_like(mask)  # the last position: no next token, so not counted
    for row, n in enumerate(gen.new_tokens):
        last[row, gen.prompt_length + n - 1] = True
    n_layer = lens.layer_of_row[-1]
    print(f"\nfirst layer from which the lens's top-1 stays the model's output (of {n_layer}):")
    print("| positions | n | mean | median | top-1 at layer ≤ n_layer/2 |\n|---|---|---|---|---|")
    for name, where in (("prompt (read)", mask & ~written), ("written", mask & written & ~last)):
        layers = lens.convergence_layer[where].float()
        half = float((layers <= n_layer / 2).float().mean())
        print(f"| {name} | {layers.numel()} | {layers.mean():.1f} | {layers.median():.0f} | {half:.2f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lens.plot(metric="prob").savefig(args.out_dir / "generate_lens.png", dpi=120, bbox_inches="tight")
    gen.save(args.out_dir / "generate_lens.safetensors")
    print(f"\nwrote {args.out_dir / 'generate_lens.png'} and {args.out_dir / 'generate_lens.safetensors'}")


if __name__ == "__main__":
    main()
