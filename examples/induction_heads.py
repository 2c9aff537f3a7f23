"""Induction heads as a two-head circuit on the embedded GPT-2 (Elhage et al. 2021, Olsson et al. 2022).

An induction head in a later layer finds the earlier copy of the current token and attends to
the token after it; it can find that token because a previous-token head in an earlier layer
wrote "my previous token was X" into the residual stream, which the induction head reads
with its keys: K-composition. This script finds both kinds of head, the K-composition
between them, the copying heads (OV eigenvalues), and which heads write the induction
prediction into the logit (direct logit attribution), and writes the figures.

    python examples/induction_heads.py [--out-dir DIR]

Note: the embedded model shipped today is a provisional CPU-trained stand-in with no
induction heads (see its MODEL_CARD.md), so the numbers printed here are near chance; the
script is the same one that will show the circuit once the GPU-trained model replaces it.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import reslens  # noqa: E402
from reslens import attribution, heads  # noqa: E402
from reslens.plot import plot_head_score_panels  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", type=Path, default=Path("."),
                    help="where the PNG figures go (default: here)")
args = parser.parse_args()
args.out_dir.mkdir(parents=True, exist_ok=True)

model, tokenizer = reslens.load_model()
arch = reslens.adapter(model)  # the family adapter: pass it around instead of re-wrapping the model
bos = tokenizer.eos_token_id  # GPT-2 marks document starts with <|endoftext|>

# 1. Scores from attention patterns: induction on repeated random tokens, previous-token on text.
seq_len = 50
induction = heads.induction_scores(model, seq_len=seq_len, n=10, seed=0, bos_token_id=bos)
text = (
    "The old captain walked down to the harbour every morning, and every morning he counted the "
    "boats that had come in during the night. When the fog lay thick on the water he counted them "
    "twice, because he did not trust his eyes, and then he went back up the hill to his house."
)
previous = heads.previous_token_scores(model, text, tokenizer=tokenizer)
print(induction.table(k=3), "\n")
print(previous.table(k=3), "\n")

# 2. Copying heads from the weights alone: eigenvalues of W_E W_V W_O W_U^T.
ov = heads.ov_eigen_summary(model)
print(ov.table(k=3), "\n")
current = heads.current_token_scores(model, text, tokenizer=tokenizer)
print("candidate deleting heads (copying <= -0.3, attention to self >= 0.3):", ov.deleters(current) or "none",
      "\n")

# 3. The circuit: K-composition from the previous-token head into the induction head.
k_comp = heads.composition_scores(model, "k")
print(k_comp.table(k=5), "\n")
(ind_label, ind_score), = induction.top(1)
ind_layer, ind_head = map(int, ind_label.split("."))
earlier = torch.nan_to_num(previous.scores.clone(), nan=-1.0)
earlier[ind_layer:] = -1.0  # only heads in earlier layers can compose into it
prev_layer, prev_head = divmod(int(earlier.argmax()), previous.n_head)
if ind_layer == 0:
    print(f"the strongest induction head {ind_label} is in layer 0, so no head can compose into it")
else:
    pair = float(k_comp.scores[prev_layer, prev_head, ind_layer, ind_head])
    prev_score = float(previous.scores[prev_layer, prev_head])
    print(f"strongest induction head {ind_label} (score {ind_score:.3f}); strongest earlier "
          f"previous-token head {prev_layer}.{prev_head} (score {prev_score:.3f})")
    print(f"K-composition {prev_layer}.{prev_head} -> {ind_label}: {pair:+.3f} above the random baseline "
          f"{k_comp.baseline:.3f}")
    print(f"heads composing most into {ind_label}:", k_comp.reader(ind_layer, ind_head).top(3), "\n")

# 4. Who writes the induction prediction? Capture once, analyse many: one forward over a repeated sequence
#    records the attention patterns and the sites direct logit attribution reads; both analyses use it.
ids = heads.repeated_tokens(arch, seq_len=20, n=1, seed=1, bos_token_id=bos)
res = reslens.capture(arch, ids, sites=(*attribution.SITES, "attn_pattern"), dtype=torch.float32)
print(heads.induction_scores_of(res, seq_len=20, start=1).table(k=3), "\n")
position = 1 + 20 + 10  # token 10 of the second copy; the next token is token 11 of the first copy
target = int(ids[0, position + 1])
dla = attribution.logit_attribution_of(res, arch, target, position=position, tokenizer=tokenizer)
print(dla.table(k=8))

figures = {
    "head_scores.png": plot_head_score_panels([induction, previous, ov.copying_scores]),
    "k_composition.png": k_comp.plot(),
    "induction_logit_attribution.png": dla.plot(),
}
for name, figure in figures.items():
    figure.savefig(args.out_dir / name, dpi=150, bbox_inches="tight")
print(f"\nwrote head_scores.png, k_composition.png, induction_logit_attribution.png to {args.out_dir}")
