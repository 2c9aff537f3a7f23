"""ROME's rank-one edit of one fact, with ROME's three measures, then the weights restored bit-exactly.

    python examples/rank_one_edit.py --model smollm2      # "The Colosseum is located in" -> " Paris"
    python examples/rank_one_edit.py                      # the embedded GPT-2: "said White" -> " Holmes"

The edit writes a new key -> value pair into one block's MLP output projection (ROME: the block
where the causal trace's MLP effect at the subject's last token peaks; ``--layer`` overrides, and
``--summary trace_summary_mlp.safetensors`` from ``examples/causal_trace.py`` picks that peak).
ROME's key statistics ``C = E[k k^T]`` come from ``SecondMoment.compute`` over ``--corpus``
(default: the project's ``../shared/corpus``), ``--stats-tokens`` tokens in windows of 512.

Measures (ROME's CounterFact, on prompts written here): **efficacy** (the edited prompt: p(new
answer), and whether it is the top-1), **paraphrases** (other wordings of the same fact: does the
new answer carry over? the share where p(new) > p(old)), **neighbourhood** (other subjects of
the same relation: does their answer stay? the share where p(true) > p(new) after the edit).
The edited weight is compared with its clone at the end: it must be bit-identical.
"""

import argparse
import time
from pathlib import Path

import torch

import reslens
from reslens.arch import adapter
from reslens.rome import SecondMoment, rank_one_edit
from reslens.tracing import BUCKETS, TraceSummary

#: ``model -> (prompt, subject, old answer, new answer, paraphrases, neighbours [(prompt, true answer)],
#: layer)``; the layer is where examples/causal_trace.py found the MLP effect at the last subject token
#: highest (SmolLM2: averaged over its 10 facts; the embedded model: layer 0).
EDITS = {
    "smollm2": (
        "The Colosseum is located in", "The Colosseum", " Rome", " Paris",
        ["The Colosseum can be found in the city of", "Where is the Colosseum? It is in",
         "The Colosseum is an ancient amphitheatre in the city of", "Tourists visit the Colosseum in",
         "The famous Colosseum is in"],
        [("The Vatican is located in the city of", " Rome"),
         ("The Roman Forum is located in the city of", " Rome"),
         ("St. Peter's Basilica is located in the city of", " Rome"),
         ("The Sistine Chapel is located in the city of", " Rome"),
         ("The Pope lives in the city of", " Rome"),
         ("The Kremlin is located in the city of", " Moscow"),
         ("The Acropolis is located in the city of", " Athens"),
         ("The Statue of Liberty is located in", " New")],
        4,
    ),
    None: (
        "said White", "White", " Fang", " Holmes",
        ["“Yes,” said White", "I saw White", "the White"],
        [("said Mr.", None), ("Mr. Knight", None), ("Mr. Bing", None), ("Miss Bing", None),
         ("said Miss", None)],
        0,
    ),
}


def parse_args():
    here = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="'smollm2' or none for the embedded GPT-2")
    parser.add_argument("--corpus", type=Path, default=here, help="text file or folder for C")
    parser.add_argument("--stats-tokens", type=int, default=20_000, help="corpus tokens for C (ROME: ~100k "
                                                                         "Wikipedia samples)")
    parser.add_argument("--layer", type=int, default=None, help="block to edit (default: see EDITS)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="a trace_summary_mlp.safetensors: edit where its last subject token peaks")
    return parser.parse_args()


def probs(model, tokenizer, prompt, answers):
    """``(top-1 token, p(answer) for each answer's first token)`` at the prompt's last position."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        p = model(ids).logits[0, -1].float().softmax(-1)
    first = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    return tokenizer.decode([int(p.argmax())]), [float(p[i]) for i in first]


def report(model, tokenizer, rows, old, new):
    """``{prompt: (top-1, p(true), p(new))}`` for ``rows`` of ``(prompt, true answer)``."""
    out = {}
    for prompt, true in rows:
        top, (p_true, p_new) = probs(model, tokenizer, prompt, [true if true is not None else old, new])
        out[prompt] = (top, p_true, p_new)
    return out


def main():
    args = parse_args()
    model, tokenizer = reslens.load_model(args.model)
    prompt, subject, old, new, paraphrases, neighbours, layer = EDITS["smollm2" if args.model else None]
    if args.model is None:  # the embedded model's neighbours: their own top-1 is the answer that must stay
        neighbours = [(p, probs(model, tokenizer, p, [" "])[0]) for p, _ in neighbours]
    if args.summary is not None:
        summary = TraceSummary.load(args.summary)
        layer = int(summary.mean[BUCKETS.index("last subject token")].nan_to_num(-1.0).argmax())
        print(f"{args.summary}: the MLP effect at the last subject token peaks at layer {layer}")
    layer = args.layer if args.layer is not None else layer
    rows = [(prompt, old)] + [(p, old) for p in paraphrases] + neighbours
    before = report(model, tokenizer, rows, old, new)

    t0 = time.perf_counter()
    stats = SecondMoment.compute(model, layer, args.corpus, tokenizer=tokenizer, max_tokens=args.stats_tokens,
                                 max_length=512)
    print(f"{stats} in {time.perf_counter() - t0:.0f} s")
    weight = adapter(model).mlp_out_param(layer)
    original = weight.detach().clone()
    t0 = time.perf_counter()
    edit = rank_one_edit(model, tokenizer, prompt, subject, new, layer, second_moment=stats)
    print(f"{edit} in {time.perf_counter() - t0:.0f} s\n")
    with edit:  # applied here, restored on exit
        assert not torch.equal(weight, original)
        after = report(model, tokenizer, rows, old, new)
    assert torch.equal(weight, original), "the restored weight differs from the original"

    print(f"{'prompt':<58} {'true':>8} {'before: top-1':>15} {'p(true)':>8} {'p(new)':>8}   "
          f"{'after: top-1':>13} {'p(true)':>8} {'p(new)':>8}")
    groups = [("efficacy", rows[:1]), ("paraphrases", rows[1 : 1 + len(paraphrases)]),
              ("neighbourhood", rows[1 + len(paraphrases) :])]
    for name, group in groups:
        print(f"-- {name}")
        for p, true in group:
            b, a = before[p], after[p]
            print(f"{p!r:<58} {true!r:>8} {b[0]!r:>15} {b[1]:>8.3f} {b[2]:>8.3f}   {a[0]!r:>13} {a[1]:>8.3f} "
                  f"{a[2]:>8.3f}")
    top1 = after[prompt][0] == tokenizer.decode(tokenizer(new, add_special_tokens=False)["input_ids"][:1])
    para = [after[p][2] > after[p][1] for p, _ in groups[1][1]]
    kept = [after[p][1] > after[p][2] for p, _ in groups[2][1]]
    same_top = [after[p][0] == before[p][0] for p, _ in groups[2][1]]
    print(f"\nedit of block {layer}'s MLP output projection, {prompt!r} ({subject!r}): {old!r} -> {new!r}")
    print(f"efficacy: p({new!r}) {before[prompt][2]:.3f} -> {after[prompt][2]:.3f}, top-1 {top1}")
    print(f"paraphrases: p(new) > p(old) in {sum(para)}/{len(para)}; mean p(new) "
          f"{sum(before[p][2] for p, _ in groups[1][1]) / len(para):.3f} -> "
          f"{sum(after[p][2] for p, _ in groups[1][1]) / len(para):.3f}")
    mean_true = [sum(d[p][1] for p, _ in groups[2][1]) / len(kept) for d in (before, after)]
    print(f"neighbourhood: p(true) > p(new) in {sum(kept)}/{len(kept)}, same top-1 in "
          f"{sum(same_top)}/{len(same_top)}; mean p(true) {mean_true[0]:.3f} -> {mean_true[1]:.3f}")
    print("restored: the MLP output projection is bit-identical to the original")


if __name__ == "__main__":
    main()
