"""The seed's "one direction is the prediction" experiment, with every control, on any model.

Samples ``--n`` prediction positions (default 200, seed 0) from a book, runs PCA across layers of each
position's residual stack (``n_layer + 1`` rows: the embedding and every block output) and prints how
often PC1, read through the final norm and the unembedding, is the model's own final prediction, under
each control: no embedding row, no centring, unit norm, the final norm applied to each layer, and a
random direction (chance).

    python examples/pca_experiment.py                                  # the embedded 4-layer GPT-2
    python examples/pca_experiment.py --model smollm2                  # SmolLM2-135M (30 layers, RMSNorm)
    python examples/pca_experiment.py --model smollm2 --file book.txt --n 200 --seed 0

The default book is Persuasion, one of the corpus's three held-out books (../shared/corpus/README.md).
Under RMSNorm (Llama family, SmolLM2) the ``final_norm`` control differs from ``unit_norm`` only by the
norm's γ and eps (RMSNorm does not centre), so it is a weaker control there than under GPT-2's LayerNorm.
Cost: one forward of every window that holds a sampled position (``--max-length`` tokens each); on
SmolLM2, n=200 read 176 windows (22.5k tokens): 326 s on a busy shared 2-core CPU.
"""

import argparse
import sys
import time
from pathlib import Path

import reslens
from reslens.pca import CONDITIONS, pca_experiment

BOOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "105-persuasion.txt"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None,
                    help="'smollm2', a path, or nothing for the embedded GPT-2 (see reslens.load_model)")
parser.add_argument("--file", type=Path, default=BOOK, help="any plain-text file (default: Persuasion)")
parser.add_argument("--n", type=int, default=200, help="prediction positions to sample (default 200)")
parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
parser.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
parser.add_argument("--out-dir", type=Path, default=Path("."), help="where the figure and the csv go")
args = parser.parse_args()

if not args.file.is_file():
    sys.exit(f"--file {args.file}: no such file; give a plain-text file (e.g. a book from ../shared/corpus)")
text = args.file.read_text(encoding="utf-8", errors="replace")

start = time.perf_counter()
model, tokenizer = reslens.load_model(args.model)
arch = reslens.adapter(model)
print(f"model: {args.model or 'embedded GPT-2'} ({arch.family}, {arch.n_layer} layers, "
      f"d_model {arch.d_model}, final norm: {arch.norm('final').kind}); file: {args.file.name}")
experiment = pca_experiment(model, tokenizer, text, n=args.n, seed=args.seed, max_length=args.max_length)
print(experiment.table())
print(f"\n({arch.n_layer + 1} residual rows per prediction; {time.perf_counter() - start:.0f} s)")
for name, description, _ in CONDITIONS:
    print(f"  {name:<13} {description}")

args.out_dir.mkdir(parents=True, exist_ok=True)
tag = Path(args.model).stem if args.model else "embedded"
experiment.plot().savefig(args.out_dir / f"pca_experiment_{tag}.png", dpi=150, bbox_inches="tight")
experiment.to_frame().to_csv(args.out_dir / f"pca_experiment_{tag}.csv", index=False)
print(f"wrote {args.out_dir / f'pca_experiment_{tag}.png'} and {args.out_dir / f'pca_experiment_{tag}.csv'}")
