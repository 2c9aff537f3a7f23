"""Generation recorded with the KV cache, against plain ``model.generate`` and generate-then-re-forward.

On SmolLM2-135M (``reslens download smollm2``), float32, CPU, greedy, a batch of ``--batch`` prompts of
different lengths (left-padded), ``--new`` new tokens each (no stop token, so every row writes them all).
Interleaved repeats (the order rotates), medians reported:

- ``generate``: plain ``model.generate(..., use_cache=True)`` -- what a user runs without reslens;
- ``reslens, lens off``: ``reslens.generate(model, ..., sites=("resid",))`` -- every layer's residual
  at every position, recorded during generation;
- ``reslens, lens on``: the same with ``lens="logit"`` (the lens of every layer and position, top-5);
- ``generate + re-forward``: plain ``model.generate``, then ``reslens.capture`` of every layer's residual
  over the final sequences (TransformerLens's ``generate(return_cache=True)`` way), and ``+ lens``: then
  the same lens from that capture.

    python benchmarks/bench_generate.py --repeats 5 --threads 2

Prints a Markdown table (median seconds and ratios to plain ``generate``) and the machine line.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "When the old sailor came back to the inn, he asked for",
    "Once upon a time",
    "The recipe calls for two cups of flour, one egg and",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import reslens
    from reslens.lens import lens_of

    model, tokenizer = reslens.load_model("smollm2")
    arch = reslens.adapter(model)
    prompts = (PROMPTS * args.batch)[: args.batch]
    batch = reslens.tokenize(tokenizer, prompts, padding_side="left")
    options = dict(max_new_tokens=args.new, do_sample=False, pad_token_id=0, eos_token_id=None)

    def plain():
        with torch.no_grad():
            return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                                  use_cache=True, **options)

    def refwd(lens: bool):
        sequences = plain()
        res = reslens.capture(model, sequences, sites="resid")
        return lens_of(res, arch) if lens else res

    runs = {
        "generate": plain,
        "reslens, lens off": lambda: reslens.generate(model, batch, max_new_tokens=args.new, stop=[]),
        "reslens, lens on": lambda: reslens.generate(model, batch, max_new_tokens=args.new, stop=[],
                                                     lens="logit"),
        "generate + re-forward": lambda: refwd(False),
        "generate + re-forward + lens": lambda: refwd(True),
    }
    first = plain()
    recorded = reslens.generate(model, batch, max_new_tokens=args.new, stop=[])
    assert torch.equal(first, recorded.sequences), "reslens.generate wrote other tokens than model.generate"
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["generate"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"SmolLM2-135M float32, batch {args.batch} x {batch.input_ids.shape[1]}-column prompts, "
          f"{args.new} new tokens, {args.repeats} repeats")
    print("| run | median, s | ÷ generate |\n|---|---|---|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
