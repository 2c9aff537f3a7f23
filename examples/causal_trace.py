"""Causal tracing (ROME, Meng et al. 2022) of facts a model knows: three heatmaps and ROME's bucket averages.

For every fact, the subject's token embeddings are corrupted with Gaussian noise (3 x their std,
``--samples`` draws) and each (layer, token) state is restored in turn: a single hidden state
(``resid``), or a window of ``--window`` MLP / attention outputs centred on the layer, as ROME.
The script traces every fact three times (hidden states, MLP, attention), draws ROME's three
heatmaps for one fact (``--fact``), and prints ROME's position-bucket averages (first subject
token, middle subject tokens, last subject token, first subsequent token, further tokens, last
token) with 95% intervals over the facts (Student t), for each kind.

    python examples/causal_trace.py --model smollm2 --out trace_out     # 10 facts, 30 layers
    python examples/causal_trace.py                                     # the embedded 4-layer GPT-2
    python examples/causal_trace.py --model gemma3-270m --facts 0 4 5 8 --window 6 --out trace_gemma

Defaults: ``--samples 3`` (ROME: 10; on SmolLM2 the 3 x 10 traces take about 970 CPU-seconds:
~8 minutes on two idle cores, 20 on a shared, loaded machine), ``--window 10`` as ROME for models
of 20 layers or more (1 for smaller ones: a 10-layer window would cover the embedded model's 4
layers whole), every fact checked first: the model's greedy continuation of the prompt must be
the answer (ROME keeps only facts the model knows).

Writes to ``--out``: ``causal_trace.png`` (the three heatmaps of fact ``--fact``),
``causal_trace_average_{resid,mlp,attn}.png`` (bucket x layer averages) and
``trace_summary_{resid,mlp,attn}.safetensors`` (``TraceSummary.load`` reads them back, every
per-fact trace included).
"""

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import reslens
from reslens.arch import adapter
from reslens.tracing import Noise, trace_many

#: Facts SmolLM2-135M-Instruct completes greedily with the answer (checked by ``trace_many``), written for
#: this project: ``(prompt, subject as it appears in the prompt, answer as it follows the prompt)``. The
#: subject ends before the last token in all of them, so ROME's "first subsequent" and "further" buckets
#: are filled; several subjects have 3+ tokens (the "middle" bucket). The answer may be several tokens
#: (" San Francisco"); the probability traced is that of its first token.
FACTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    ("The Colosseum is located in", "The Colosseum", " Rome"),
    ("The Golden Gate Bridge is located in", "The Golden Gate Bridge", " San Francisco"),
    ("Shakespeare was born in the country of", "Shakespeare", " England"),
    ("The iPhone is made by", "The iPhone", " Apple"),
    ("The PlayStation is made by", "The PlayStation", " Sony"),
    ("Tiger Woods is a professional", "Tiger Woods", " golf"),
    ("The native language of Vladimir Putin is", "Vladimir Putin", " Russian"),
    ("The official language of France is", "France", " French"),
    ("The capital of Japan is", "Japan", " Tokyo"),
]

#: Facts the embedded 4-layer GPT-2 gets right as top-1 (it is weak: about 5.2 nats/token, so these are
#: name completions, and every subject ends at the last token).
EMBEDDED_FACTS = [
    ("“Yes,” said White", "White", " Fang"),
    ("said White", "White", " Fang"),
    ("I saw White", "White", " Fang"),
    ("Alice and the White", "White", " Fang"),
    ("Mr. Knight", "Knight", "ley"),
    ("Mr. Bing", "Bing", "ley"),
    ("Miss Bing", "Bing", "ley"),
    ("“Yes,” said Miss", "Miss", " Hav"),
]

KINDS = ("resid", "mlp", "attn")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded GPT-2; "
                                                      "'smollm2' for SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the figures and summaries")
    parser.add_argument("--samples", type=int, default=3, help="noise samples per restoration (ROME: 10)")
    parser.add_argument("--window", type=int, default=None,
                        help="MLP / attention window (default 10 as ROME; 1 for models under 20 layers)")
    parser.add_argument("--fact", type=int, default=0, help="index of the fact whose heatmaps are drawn")
    parser.add_argument("--facts", type=int, nargs="+", default=None,
                        help="indices of the facts to trace (default: all; --fact and the printed indices "
                             "then count within these); a fact the model does not complete is skipped")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward")
    return parser.parse_args()


def print_facts(summary, facts):
    print(f"{'#':>2}  {'prompt':<52} {'subject tokens':<26} {'answer':<15} {'clean p':>7} {'corrupt':>7}")
    traced = [i for i in range(len(facts)) if i not in summary.skipped]
    for i, r in zip(traced, summary.results):
        start, end = r.subject_span
        subject = "|".join(r.tokens[start:end])
        print(f"{i:>2}  {facts[i][0]!r:<52} {subject!r:<26} {facts[i][2]!r:<15} {r.clean_prob:>7.3f} "
              f"{r.corrupted_prob:>7.3f}")
    for i in summary.skipped:
        print(f"{i:>2}  {facts[i][0]!r:<52} skipped: the model's greedy continuation is not {facts[i][2]!r}")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = reslens.load_model(args.model)
    arch = adapter(model)
    facts = EMBEDDED_FACTS if args.model is None else FACTS
    if args.facts is not None:
        bad = [i for i in args.facts if not 0 <= i < len(facts)]
        if bad:
            raise SystemExit(f"--facts: {bad} out of range; give indices 0..{len(facts) - 1}")
        facts = [facts[i] for i in args.facts]
    window = args.window if args.window is not None else (10 if arch.n_layer >= 20 else 1)
    noise = Noise(samples=args.samples)
    print(f"{arch}; {len(facts)} facts, {args.samples} noise samples, window {window}\n")

    summaries, started = {}, time.perf_counter()
    for kind in KINDS:
        t0 = time.perf_counter()
        summaries[kind] = trace_many(model, tokenizer, facts, kind=kind, window=window, noise=noise,
                                     batch_size=args.batch_size, progress=True)
        summaries[kind].save(args.out / f"trace_summary_{kind}.safetensors")
        print(f"{kind}: {summaries[kind].n_facts} facts traced in {time.perf_counter() - t0:.0f} s")
    print(f"all traces: {time.perf_counter() - started:.0f} s\n")
    print_facts(summaries["resid"], facts)

    traced = [i for i in range(len(facts)) if i not in summaries["resid"].skipped]
    which = traced.index(args.fact) if args.fact in traced else 0
    n_tokens = summaries["resid"].results[which].n_tokens
    fig, axes = plt.subplots(3, 1, figsize=(3.5 + 0.35 * arch.n_layer, 3 * (1.2 + 0.3 * n_tokens)))
    for ax, kind in zip(axes, KINDS):
        result = summaries[kind].results[which]
        print("\n" + result.table(cell=6))
        result.plot(ax=ax)
    fig.savefig(args.out / "causal_trace.png", dpi=120, bbox_inches="tight")
    print(f"\nwrote {args.out / 'causal_trace.png'} (fact {traced[which]})")

    for kind in KINDS:
        print("\n" + summaries[kind].interval_table())
        summaries[kind].plot().savefig(args.out / f"causal_trace_average_{kind}.png", dpi=120,
                                       bbox_inches="tight")
        plt.close("all")
    print(f"\nwrote {args.out}/causal_trace_average_{{resid,mlp,attn}}.png and trace_summary_*.safetensors")


if __name__ == "__main__":
    main()
