"""Patchscopes (Ghandeharioun et al. 2024) on any model: what one hidden state holds, and the token-identity
patchscope beside the logit lens, layer by layer, on a held-out book.

Prints

- (a) the fact: what ``resid`` layer ``--layer`` holds at ``--position`` of ``--source`` (default: layer 12
  at " Tower" of "The Eiffel Tower"), read through every target prompt of ``reslens.lens.PROMPTS``, beside
  what each target prompt predicts unpatched (its prior);
- (b) per layer over ``--tokens`` tokens of a book (windows of ``--window``): how often the top-1 equals
  the model's output (``top1_agreement``) and the input token at that position (``input_token_top1``),
  for the logit lens, the paper's token-identity patchscope (patched and read at "?"), its variant read
  after " ->", and the linear shortcut fitted on ``--shortcut-tokens`` tokens of the corpus's training
  books (0: left out), as a markdown table.

    python examples/patchscope.py                                   # the embedded 4-layer GPT-2
    python examples/patchscope.py --model smollm2 --threads 2       # SmolLM2-135M-Instruct
    python examples/patchscope.py --model smollm2 --source "The Colosseum" --position um --tokens 0

The default book is Persuasion, one of the corpus's three held-out books (../shared/corpus/README.md),
from character ``--skip``; the shortcut reads the other books.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import reslens
from reslens.lens import PROMPTS, Patchscope, fit_shortcut, lens_stats, patchscope

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="'smollm2', a path, or nothing for the embedded GPT-2")
parser.add_argument("--source", default="The Eiffel Tower", help="the source prompt of (a)")
parser.add_argument("--position", default=" Tower", help="its token read in (a): text of the prompt")
parser.add_argument("--layer", type=int, default=12, help="the resid layer read in (a) (at most n_layer - 1)")
parser.add_argument("--file", type=Path, default=CORPUS / HELD_OUT[0], help="the book of (b)")
parser.add_argument("--corpus", type=Path, default=CORPUS, help="the shortcut's books: a .txt or a folder")
parser.add_argument("--tokens", type=int, default=512, help="book tokens scored (default 512; 0: (a) only)")
parser.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
parser.add_argument("--skip", type=int, default=20_000, help="characters of the book to skip (default 20000)")
parser.add_argument("--shortcut-tokens", type=int, default=20_000, help="the shortcut's tokens (0: none)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
args = parser.parse_args()

if args.threads is not None:
    torch.set_num_threads(args.threads)
if not args.file.is_file():
    sys.exit(f"--file {args.file}: no such file; give a plain-text file (e.g. a book from ../shared/corpus)")
model, tokenizer = reslens.load_model(args.model)
arch = reslens.adapter(model)
layer = min(args.layer, arch.n_layer - 1)  # resid n_layer written at a placeholder would change nothing
print(f"model: {args.model or 'embedded GPT-2'} ({arch.n_layer} layers)\n")

# (a) one hidden state through every target prompt, and each prompt's prior (its unpatched prediction)
for name in PROMPTS:
    out = patchscope(model, args.source, args.position, layers=[layer], target=name, tokenizer=tokenizer,
                     top_k=3)
    scope = Patchscope(model, name, tokenizer=tokenizer)
    with torch.no_grad():
        prior = model(input_ids=scope.target_ids[None]).logits[0, -1].float().softmax(-1).topk(3)
    shown = ", ".join(f"{token!r} {p:.2f}" for token, p in out.top(layer))
    unpatched = ", ".join(f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in zip(prior.indices.tolist(),
                                                                             prior.values.tolist()))
    print(f"{name:>21}: layer {layer} at {args.position!r} of {args.source!r} -> {shown}   "
          f"(unpatched: {unpatched})")

if args.tokens == 0:
    sys.exit()

# (b) agreement per layer over a held-out book: windows of `window` tokens, each led by the tokenizer's
# start tokens (none for GPT-2 or SmolLM2), marked special so that they are never scored
book = args.file.read_text(encoding="utf-8", errors="replace")
ids = tokenizer(book[args.skip:][: args.tokens * 12], add_special_tokens=False, verbose=False)["input_ids"]
n_windows = min(len(ids), args.tokens) // args.window
if n_windows == 0:
    sys.exit(f"--file {args.file}: fewer than {args.window} tokens after skipping {args.skip} characters")
windows = torch.tensor(ids[: n_windows * args.window]).view(n_windows, args.window)
probe = reslens.tokenize(tokenizer, "x")
start_ids = probe.input_ids[0, : int(probe.special_mask[0].sum())]
windows = torch.cat([start_ids.expand(n_windows, -1), windows], dim=1)
special = torch.zeros_like(windows, dtype=torch.bool)
special[:, : len(start_ids)] = True
batches = [reslens.Batch(windows[i : i + 4], torch.ones_like(windows[i : i + 4], dtype=torch.bool),
                         special_mask=special[i : i + 4]) for i in range(0, n_windows, 4)]

lenses = {"logit lens": None, "patchscope token_identity": Patchscope(model, tokenizer=tokenizer),
          "patchscope token_identity_arrow": Patchscope(model, "token_identity_arrow", tokenizer=tokenizer)}
if args.shortcut_tokens:
    books = [args.corpus] if args.corpus.is_file() else [
        f for f in sorted(args.corpus.glob("*.txt")) if f.name not in HELD_OUT]
    start = time.perf_counter()
    lenses["linear shortcut"] = fit_shortcut(model, books, tokenizer=tokenizer,
                                             max_tokens=args.shortcut_tokens, progress=False)
    print(f"\nlinear shortcut fitted on {args.shortcut_tokens} tokens in {time.perf_counter() - start:.0f} s")
stats = {}
for name, lens in lenses.items():
    start = time.perf_counter()
    stats[name] = lens_stats(model, batches, lens=lens, progress=False)
    print(f"{name}: {stats[name].n_tokens} tokens of {args.file.name}, {time.perf_counter() - start:.0f} s")

print("\ntop-1 = the model's output / = the input token, per layer\n")
print("| layer | " + " | ".join(stats) + " |")
print("|---|" + "---|" * len(stats))
for r, at in enumerate(next(iter(stats.values())).layers):
    cells = [f"{float(s.top1_agreement[r]):.3f} / {float(s.input_token_top1[r]):.3f}" for s in stats.values()]
    print(f"| {at}{' (output)' if at == arch.n_layer else ''} | " + " | ".join(cells) + " |")
