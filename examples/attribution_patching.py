"""Attribution patching that checks itself: induction heads and the components that carry a fact.

1. Induction: ``n`` random sequences written twice (after the model's BOS); the corrupted batch has the
   first copy replaced by other random tokens, so nothing can be copied. Metric: the mean log-prob of
   the second copy's tokens. AtP estimates every head's and MLP's effect of patching its corrupted
   output into the clean run; the top ``--top`` of each kind and ``--sample`` others are then patched
   exactly and the two are shown side by side.
2. Facts (ROME's causal-tracing facts): the subject's embedding is noised (``Noise(samples=3)``, 3x the
   subject embeddings' std, as the causal-tracing section); metric: log p(answer) at the last token.

    python examples/attribution_patching.py --model smollm2 [--method ig --steps 8]
    python examples/attribution_patching.py                 # the embedded GPT-2 (no induction heads)
"""

import argparse
import time

import torch

import reslens
from reslens.atp import attribution_patching, log_prob
from reslens.heads import repeated_tokens
from reslens.tracing import Noise, subject_span

FACTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    ("The Colosseum is located in", "The Colosseum", " Rome"),
    ("The native language of Vladimir Putin is", "Vladimir Putin", " Russian"),
    ("The capital of Japan is", "Japan", " Tokyo"),
]
EMBEDDED_FACTS = [("“Yes,” said White", "White", " Fang"), ("Mr. Knight", "Knight", "ley")]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded GPT-2)")
    parser.add_argument("--seq-len", type=int, default=20)
    parser.add_argument("--n", type=int, default=4, help="repeated random sequences")
    parser.add_argument("--top", type=int, default=20, help="top candidates of each kind patched exactly")
    parser.add_argument("--sample", type=int, default=10, help="other components per kind patched exactly")
    parser.add_argument("--method", default="atp", choices=("atp", "ig"), help="AtP or integrated gradients")
    parser.add_argument("--steps", type=int, default=8, help="integrated-gradients steps (--method ig)")
    parser.add_argument("--skip-facts", action="store_true", help="the induction part only")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def induction(model, tokenizer, args):
    arch = reslens.adapter(model)
    bos = arch.start_token(tokenizer)
    bos = tokenizer.eos_token_id if bos is None else bos
    length = args.seq_len
    clean = repeated_tokens(model, seq_len=length, n=args.n, seed=args.seed, bos_token_id=bos)
    corrupt = clean.clone()
    other = repeated_tokens(model, seq_len=length, n=args.n, seed=args.seed + 1, bos_token_id=bos)
    corrupt[:, 1 : 1 + length] = other[:, 1 : 1 + length]  # first copy replaced: nothing to copy
    positions = list(range(length + 1, 2 * length))  # second-copy positions predicting the next copy token
    metric = log_prob(clean[:, length + 2 :], positions)
    start = time.perf_counter()
    r = attribution_patching(model, clean, corrupt, metric=metric, kinds=("heads", "mlp"), verify=args.top,
                             sample=args.sample, seed=args.seed, method=args.method, steps=args.steps)
    took = time.perf_counter() - start
    print(f"== induction: {args.n} x 2 x {length} random tokens, metric = mean log p(second copy) ==")
    print(r.table(n=15))
    print("top heads by estimate:", ", ".join(f"{lab} {v:+.3f}" for lab, v in r.top("heads", 8)))
    exact = sorted(zip(r.checked_exact.tolist(), r.labels))[:8]
    print("largest exact effects:", ", ".join(f"{lab} {x:+.3f}" for x, lab in exact))
    print(f"Spearman (heads) {r.spearman('heads'):.3f}, (mlp) {r.spearman('mlp'):.3f}; {took:.1f} s")
    return r


def facts(model, tokenizer, args):
    chosen = FACTS if reslens.adapter(model).n_layer > 4 else EMBEDDED_FACTS
    for prompt, subject, answer in chosen:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        start, end = subject_span(tokenizer, prompt, subject)
        target = tokenizer(answer, add_special_tokens=False).input_ids[0]
        r = attribution_patching(model, ids, noise=Noise(samples=3), span=(start, end),
                                 metric=log_prob([target]), kinds=("heads", "mlp"), verify=args.top,
                                 sample=args.sample, seed=args.seed, method=args.method, steps=args.steps)
        print(f"\n== fact: {prompt!r} -> {answer!r} (subject tokens {start}..{end - 1}) ==")
        print(r.table(n=8))
        print("top heads:", ", ".join(f"{lab} {v:+.3f}" for lab, v in r.top("heads", 5)),
              "| top MLPs:", ", ".join(f"{lab} {v:+.3f}" for lab, v in r.top("mlp", 3)))


def main():
    args = parse_args()
    model, tokenizer = reslens.load_model(args.model)
    torch.manual_seed(args.seed)
    induction(model, tokenizer, args)
    if not args.skip_facts:
        facts(model, tokenizer, args)


if __name__ == "__main__":
    main()
