"""The MLP as key-value memories (Geva et al. 2021) on the embedded model.

Mines, for every key of every layer, its top-50 trigger sentences over the first 1M tokens of
../shared/corpus (the index is saved in ``kv_index.safetensors`` and resumed if it exists: the
same corpus, options and model, or an error), prints a few keys with their top prefixes and
their values' top tokens, and draws the per-layer agreement between a value's top token and
the token that follows its key's top trigger, against the random baseline 1/|V|.

    python examples/kv_memories.py [--max-tokens 1000000] [--corpus DIR] [--out-dir .]
"""

import argparse
from pathlib import Path

import reslens
from reslens import kv_memory as kv

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--max-tokens", type=int, default=1_000_000, help="corpus tokens to mine (default 1M)")
CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
parser.add_argument("--corpus", type=Path, default=CORPUS,
                    help="a .txt file or a folder of them (default: ../shared/corpus)")
parser.add_argument("--out-dir", type=Path, default=Path("."), help="where the index, figures and csv go")
args = parser.parse_args()

model, tokenizer = reslens.load_model()
out = args.out_dir / "kv_index.safetensors"
resume = out if out.is_file() else None
if resume is not None:
    print("resuming", kv.TriggerIndex.load(out).describe())
index = kv.mine_triggers(model, tokenizer, args.corpus, max_tokens=args.max_tokens, top_k=50, out=out,
                         resume=resume)
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
        index.show(layer, key, n=4, tokenizer=tokenizer)
        print(kv.value_tokens(model, layer, [key], k=8, tokenizer=tokenizer).table().splitlines()[1], "\n")

deletion = kv.deletion_neurons(model)
print(deletion.table(5))

result.plot().savefig(args.out_dir / "kv_agreement.png", dpi=150, bbox_inches="tight")
deletion.plot().savefig(args.out_dir / "kv_deletion_neurons.png", dpi=150, bbox_inches="tight")
result.to_frame().to_csv(args.out_dir / "kv_agreement.csv", index=False)
print(f"wrote kv_agreement.png, kv_deletion_neurons.png, kv_agreement.csv and {out.name} in {args.out_dir}")
