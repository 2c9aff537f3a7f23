"""The logit lens on any model: the classic table of a sentence, then per-layer statistics over a book.

Prints

- (a) the classic logit-lens table of a narrative sentence (each layer's top-1 next token, deepest on
  top), and writes it as a figure;
- (b) per-layer statistics over ``--tokens`` tokens of a book (:func:`reslens.lens.lens_stats`): top-1
  agreement with the final layer, the probability a layer gives the final top-1, KL(final || layer),
  entropy, log p(next token), and where the lens converges (the first layer from which agreement
  stays >= 50 %, and from which KL stays below 1 nat).

    python examples/logit_lens.py                                 # the embedded 4-layer GPT-2
    python examples/logit_lens.py --model smollm2                 # SmolLM2-135M-Instruct
    python examples/logit_lens.py --model smollm2 --file book.txt --tokens 2048
    python examples/logit_lens.py --model gemma3-270m             # Gemma 3 270M (each window led by <bos>)

The default book is Persuasion, one of the corpus's three held-out books (../shared/corpus/README.md);
reading starts ``--skip`` characters in, past the title page and contents. Cost: the lens unembeds every
layer at every position (31 rows x 49,152 logits per token on SmolLM2), about 6x a forward; the default
512 tokens took 284 s on SmolLM2 on a busy shared 2-core CPU (18 s on the embedded model).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import reslens
from reslens.lens import logit_lens
from reslens.lens import lens_stats

BOOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "105-persuasion.txt"
SENTENCE = "When the old sailor came back to the inn, he asked for a glass of rum and sat by the fire."

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None,
                    help="'smollm2', 'gemma3-270m', a path, or nothing for the embedded GPT-2 "
                         "(see reslens.load_model)")
parser.add_argument("--file", type=Path, default=BOOK, help="any plain-text file (default: Persuasion)")
parser.add_argument("--tokens", type=int, default=512, help="book tokens to score (default 512)")
parser.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
parser.add_argument("--skip", type=int, default=20_000, help="characters of the book to skip (default 20000)")
parser.add_argument("--text", default=SENTENCE, help="the sentence of the lens table")
parser.add_argument("--out-dir", type=Path, default=Path("."), help="where the figures go")
args = parser.parse_args()

if not args.file.is_file():
    sys.exit(f"--file {args.file}: no such file; give a plain-text file (e.g. a book from ../shared/corpus)")
if args.tokens < args.window or args.window < 2:
    sys.exit(f"--tokens ({args.tokens}) must be at least --window ({args.window}), and --window at least 2")
book = args.file.read_text(encoding="utf-8", errors="replace")

model, tokenizer = reslens.load_model(args.model)
arch = reslens.adapter(model)
tag = Path(args.model).stem if args.model else "embedded"
args.out_dir.mkdir(parents=True, exist_ok=True)
print(f"model: {args.model or 'embedded GPT-2'} ({arch.family}, {arch.n_layer} layers, "
      f"d_model {arch.d_model}, vocabulary {arch.d_vocab}, final norm: {arch.norm('final').kind})\n")

# (a) the classic table of one sentence
lens = logit_lens(model, [args.text], tokenizer=tokenizer)
print(lens.table(width=110))
real = lens.attention_mask[0]
converged = lens.convergence_layer[0][real]
print(f"\nper-token convergence layer (first layer from which the top-1 stays the final one): "
      f"median {float(converged.float().median()):.0f} of {arch.n_layer}; "
      f"{int((lens.top_ids[-1, 0, :-1, 0] == lens.input_ids[0, 1:]).sum())} of {int(real.sum()) - 1} "
      "next tokens are the model's top-1")
lens.plot(metric="rank").savefig(args.out_dir / f"logit_lens_{tag}.png", dpi=150, bbox_inches="tight")

# (b) per-layer statistics over a book: `tokens` tokens in windows of `window`
ids = tokenizer(book[args.skip:][: args.tokens * 12], add_special_tokens=False, verbose=False)["input_ids"]
n_windows = min(len(ids), args.tokens) // args.window
if n_windows == 0:
    sys.exit(f"--file {args.file}: fewer than {args.window} tokens after skipping {args.skip} characters")
windows = torch.tensor(ids[: n_windows * args.window]).view(n_windows, args.window)
# each window led by the start tokens the tokenizer adds (Gemma's <bos>; none for GPT-2 or SmolLM2), marked
# special so that they are never scored: the model reads a window as it reads any text
probe = reslens.tokenize(tokenizer, "x")
start_ids = probe.input_ids[0, : int(probe.special_mask[0].sum())]
windows = torch.cat([start_ids.expand(n_windows, -1), windows], dim=1)
special = torch.zeros_like(windows, dtype=torch.bool)
special[:, : len(start_ids)] = True
batches = [reslens.Batch(windows[i : i + 4], torch.ones_like(windows[i : i + 4], dtype=torch.bool),
                         special_mask=special[i : i + 4]) for i in range(0, n_windows, 4)]
start = time.perf_counter()
stats = lens_stats(model, batches)
print(f"\n{args.file.name}: {stats.n_tokens} tokens ({n_windows} windows of {args.window}), "
      f"{time.perf_counter() - start:.0f} s")
print(stats.table())


def first_layer_from_which(ok: torch.Tensor) -> str:
    """The first layer from which ``ok [R]`` holds to the end."""
    bad = (~ok).nonzero().flatten()
    first = 0 if bad.numel() == 0 else int(bad[-1]) + 1
    return str(stats.layers[first]) if first < len(stats.layers) else "never"


print(f"\nconvergence: top-1 agreement with the final layer stays >= 0.5 from layer "
      f"{first_layer_from_which(stats.top1_agreement >= 0.5)}, KL(final || layer) stays < 1 nat from layer "
      f"{first_layer_from_which(stats.mean.kl_final_layer < 1)} (of {arch.n_layer})")
stats.plot().savefig(args.out_dir / f"lens_stats_{tag}.png", dpi=150, bbox_inches="tight")
print(f"wrote {args.out_dir / f'logit_lens_{tag}.png'} and {args.out_dir / f'lens_stats_{tag}.png'}")
