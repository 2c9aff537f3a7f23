"""Ablating heads: does the second copy of a repeated random sequence still get predicted without them?

Random token sequences written twice: a model with induction heads predicts the second copy from the
first (low loss). Zero- or mean-ablating its strongest induction heads (``--heads``) should raise that
loss; ablating as many random heads from the first layers is the control. Every ablation is a
:func:`reslens.heads.head_ablation` edit of the heads' slice of ``attn_z``, run with :func:`reslens.patch`.

    python examples/head_ablation.py --model smollm2 --heads 17.3 17.4 17.5 18.6 18.7
    python examples/head_ablation.py                  # the embedded GPT-2 (it has no induction heads)
"""

import argparse
import random

import torch

import reslens
from reslens.heads import head_ablation, repeated_tokens


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded GPT-2)")
    parser.add_argument("--heads", nargs="+", default=["2.0", "3.1"], help="heads to ablate, as layer.head")
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--n", type=int, default=8, help="sequences")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def second_copy_loss(model, ids, seq_len, edits):
    """Mean cross-entropy (nats) of the second copy's tokens, under ``edits``."""
    with reslens.patch(model, edits), torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    pred, target = logits[:, seq_len:-1], ids[:, seq_len + 1 :]  # positions that predict copy-2 tokens
    return float(torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1)))


def main():
    args = parse_args()
    model, tokenizer = reslens.load_model(args.model)
    arch = reslens.adapter(model)
    ids = repeated_tokens(model, seq_len=args.seq_len, n=args.n, seed=args.seed)
    controls = random.Random(args.seed).sample(
        [f"{layer}.{head}" for layer in range(max(1, arch.n_layer // 3)) for head in range(arch.n_head)],
        len(args.heads))
    reference = repeated_tokens(model, seq_len=args.seq_len, n=args.n, seed=args.seed + 1)
    print(f"second-copy loss over {args.n} x 2 x {args.seq_len} random tokens, nats:")
    print(f"  no ablation: {second_copy_loss(model, ids, args.seq_len, {}):.2f}")
    for name, heads in ((" ".join(args.heads), args.heads), (f"control {' '.join(controls)}", controls)):
        for how in ("zero", "mean"):
            edits = head_ablation(model, heads, how=how, reference=None if how == "zero" else reference)
            print(f"  {how}-ablate {name}: {second_copy_loss(model, ids, args.seq_len, edits):.2f}")


if __name__ == "__main__":
    main()
