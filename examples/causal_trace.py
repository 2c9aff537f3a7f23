"""Causal tracing (ROME) of a fact the embedded GPT-2 knows: "said White" -> " Fang".

Corrupts the subject's embeddings with noise (3 x their std, 10 samples), restores each
(layer, token) state, and draws ROME's three heatmaps: hidden states, MLP outputs and
attention outputs. The embedded model has 4 layers, so ROME's 10-layer window would cover
all of them: the MLP and attention traces here restore one layer at a time (window=1).
Then it averages traces over the project's small set of facts in ROME's position buckets.

The embedded model is weak (about 5.2 nats/token): it knows few facts, and in all of the ones
below the subject ends at the last token, so the "first subsequent" and "further" buckets are
empty and the hidden-state effect is flat across layers at the last token.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import reslens
from reslens.tracing import causal_trace, trace_many

#: Facts the embedded model gets right as top-1 (written for this project; not corpus text).
FACTS = [
    ("said White", "White", " Fang"),
    ("“Yes,” said White", "White", " Fang"),
    ("I saw White", "White", " Fang"),
    ("Alice and the White", "White", " Fang"),
    ("Mr. Knight", "Knight", "ley"),
    ("Mr. Bing", "Bing", "ley"),
    ("Miss Bing", "Bing", "ley"),
    ("“Yes,” said Miss", "Miss", " Hav"),
]

model, tokenizer = reslens.load_model()
prompt, subject, answer = FACTS[1]

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for ax, kind in zip(axes, ("resid", "mlp", "attn")):
    result = causal_trace(model, tokenizer, prompt, subject, answer=answer, kind=kind, window=1)
    print(result.table(), end="\n\n")
    layer, token, effect = result.peak
    print(f"{kind}: the indirect effect peaks at layer {layer}, token {token} ({result.tokens[token]!r}): "
          f"{effect:+.3f} of a total effect of {result.total_effect:+.3f}\n")
    result.plot(ax=ax)
fig.savefig("causal_trace.png", dpi=150, bbox_inches="tight")
print("wrote causal_trace.png")

summary = trace_many(model, tokenizer, FACTS, kind="mlp", window=1, progress=False)
print(summary.table())
summary.plot().savefig("causal_trace_average.png", dpi=150, bbox_inches="tight")
print("wrote causal_trace_average.png")
