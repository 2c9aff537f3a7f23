"""ROME's rank-one edit on the embedded GPT-2: make "said White" continue with " Holmes"
instead of " Fang", check paraphrases and an unrelated prompt, then restore the weights.

The causal trace (examples/causal_trace.py) puts the fact in the MLP of layer 0 at the
subject's last token, so the edit writes a new key -> value pair into block 0's MLP output
projection. The second moment of that MLP's keys (ROME's key statistics) is computed once, as
an explicit SecondMoment, from the project's corpus (../shared/corpus; pass another folder of
.txt files as the first argument, and a token budget as the second).
"""

import sys
from pathlib import Path

import torch

import reslens
from reslens.arch import adapter
from reslens.rome import SecondMoment, rank_one_edit

corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "corpus"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
model, tokenizer = reslens.load_model()
prompts = ["said White", "“Yes,” said White", "I saw White", "the White", "said Mr.", "Mr. Knight"]


def top1(prompt):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        p = model(ids).logits[0, -1].softmax(-1)
    return f"{tokenizer.decode([int(p.argmax())])!r} ({float(p.max()):.3f})"


before = {p: top1(p) for p in prompts}
weight = adapter(model).mlp_out_param(0)
original = weight.detach().clone()
stats = SecondMoment.compute(model, 0, corpus, tokenizer=tokenizer, max_tokens=max_tokens)
print(stats)
edit = rank_one_edit(model, tokenizer, "said White", "White", " Holmes", layer=0, second_moment=stats)
print(edit)
with edit:  # applied here, restored on exit
    for p in prompts:
        print(f"{p!r:22} {before[p]:>18} -> {top1(p)}")
assert torch.equal(weight, original)
print("restored: the MLP output projection is bit-identical; 'said White' ->", top1("said White"))
