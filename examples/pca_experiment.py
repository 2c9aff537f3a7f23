"""The "one direction is the prediction" experiment on the embedded model, with its controls.

Samples 200 prediction positions from a held-out book, runs PCA across layers of each
position's residual stack, and prints how often PC1 read through the final norm and the unembedding
is the model's final prediction, under each control condition.
"""

from pathlib import Path

import reslens
from reslens.pca import pca_experiment

model, tokenizer = reslens.load_model()
book = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "105-persuasion.txt"
experiment = pca_experiment(model, tokenizer, book.read_text(encoding="utf-8"), n=200, seed=0)
print(experiment.table())
experiment.plot().savefig("pca_experiment.png", dpi=150, bbox_inches="tight")
experiment.to_frame().to_csv("pca_experiment.csv", index=False)
print("wrote pca_experiment.png and pca_experiment.csv")
