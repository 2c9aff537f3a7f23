"""The MLP as key-value memories (Geva et al. 2021) on the embedded model.

Mines, for every key of every layer, its top-50 trigger sentences over the first 1M tokens of
../shared/corpus (the index is saved in ``kv_index/`` and resumed if it exists), prints a few
keys with their top prefixes and their values' top tokens, and draws the per-layer agreement
between a value's top token and the token that follows its key's top trigger, against the
random baseline 1/|V|. Pass another token budget as the first argument.
"""

import sys
from pathlib import Path


import reslens
from reslens import kv_memory as kv

max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
corpus = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
model, tokenizer = reslens.load_model()

out = Path("kv_index")
resume = out if (out / "index.json").is_file() else None
index = kv.mine_triggers(model, tokenizer, corpus, max_tokens=max_tokens, top_k=50, out=out, resume=resume)
print(index, "\n")

result = kv.agreement(index, model)
print(result.table(), "\n")

# Three keys per layer: the two strongest whose value predicts their top trigger's next token,
# and the key with the strongest top trigger.
for row, layer in enumerate(index.layers):
    agreeing = (result.value_top[row] == result.next_token[row]).nonzero().flatten()
    agreeing = agreeing[index.scores[row, agreeing, 0].argsort(descending=True)][:2].tolist()
    strongest = int(index.scores[row, :, 0].argmax())
    for key in dict.fromkeys(agreeing + [strongest]):
        index.show(layer, key, n=4)
        print(kv.value_tokens(model, layer, [key], k=8, tokenizer=tokenizer).table().splitlines()[1], "\n")

deletion = kv.deletion_neurons(model)
print(deletion.table(5))

result.plot().savefig("kv_agreement.png", dpi=150, bbox_inches="tight")
deletion.plot().savefig("kv_deletion_neurons.png", dpi=150, bbox_inches="tight")
result.to_frame().to_csv("kv_agreement.csv", index=False)
print("wrote kv_agreement.png, kv_deletion_neurons.png, kv_agreement.csv and kv_index/")
