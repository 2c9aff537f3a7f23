"""One lens bench: the logit lens, the linear shortcut, a tuned lens, the Jacobian lens and the token-identity
patchscope on the same held-out tokens, with a causal check (reslens.lens.compare_lenses).

The shortcut is the one the model comes with (fitted on text the model wrote itself, kept in its cache
as ``shortcut.safetensors``; see reslens.model_lens). The tuned lens is warm-started from that shortcut and
trained on ``--tuned-tokens`` corpus tokens (or read from ``--tuned FILE``); the Jacobian lens is fitted on
``--jacobian-tokens`` (d_model vector-Jacobian products per window: the costly one; 0 leaves it out).
Every lens is then scored on ``--eval-tokens`` of a held-out book (KL both ways, cross-entropy, top-1
agreement, calibration) and ``--causal-positions`` positions are edited along each lens's direction.

    python examples/lens_bench.py                          # SmolLM2
    python examples/lens_bench.py --model gemma3-270m
    python examples/lens_bench.py --model embedded --eval-tokens 2000 --causal-positions 16   # seconds

The training corpus is ../shared/corpus without its three held-out books (see its README); the held-out
text is its ``105-persuasion.txt`` unless ``--held-out FILE``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import reslens
from reslens import lens as L
from reslens.model_lens import model_lens

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, or embedded")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="a folder of .txt books")
    parser.add_argument("--held-out", type=Path, default=None, help="held-out .txt (default: Persuasion)")
    parser.add_argument("--tuned", type=Path, default=None, help="a saved tuned lens (else warm-started)")
    parser.add_argument("--tuned-tokens", type=int, default=1_200, help="tokens to warm-start the tuned lens")
    parser.add_argument("--jacobian-tokens", type=int, default=64, help="Jacobian-lens tokens (0: none)")
    parser.add_argument("--eval-tokens", type=int, default=1_500, help="held-out tokens scored")
    parser.add_argument("--causal-positions", type=int, default=32, help="positions the causal check edits")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where the figure and result go")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def timed(what, make):
    start = time.perf_counter()
    value = make()
    print(f"{what}: {time.perf_counter() - start:.0f} s", flush=True)
    return value


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.corpus.is_dir():
        sys.exit(f"no corpus at {args.corpus}: pass --corpus FOLDER (of .txt books)")
    train = [f for f in sorted(args.corpus.glob("*.txt")) if f.name not in HELD_OUT and f != args.held_out]
    held_out = args.held_out or args.corpus / HELD_OUT[0]
    if not held_out.is_file():
        sys.exit(f"no held-out text at {held_out}: pass --held-out FILE (a .txt not in the training corpus)")
    name = None if args.model == "embedded" else args.model
    model, tokenizer = reslens.load_model(name)
    shortcut = model_lens(name, model)
    if shortcut is None:
        sys.exit(f"{args.model} has no shortcut yet: run `reslens download {args.model}` first")
    common = dict(tokenizer=tokenizer, max_length=64, batch_size=4)
    if args.tuned is not None:
        tuned = L.load_lens(args.tuned, model=model)
    else:
        tuned = timed(f"tuned lens, warm start, {args.tuned_tokens} tokens", lambda: L.train_tuned_lens(
            model, train, max_tokens=args.tuned_tokens, tokens_per_step=256, init=shortcut, **common))
    lenses = {"logit": None, "shortcut": shortcut, "tuned": tuned}
    if args.jacobian_tokens:  # d_model vector-Jacobian products per window: minutes per window on a CPU
        what = f"Jacobian lens, {args.jacobian_tokens} tokens"
        lenses["jacobian"] = timed(what, lambda: L.fit_jacobian_lens(
            model, train, max_tokens=args.jacobian_tokens, max_length=64, batch_size=1, tokenizer=tokenizer))
    lenses["patchscope"] = L.Patchscope(model, "token_identity", tokenizer=tokenizer)
    scores = timed("bench", lambda: L.compare_lenses(
        model, [held_out], lenses, max_tokens=args.eval_tokens, causal_positions=args.causal_positions,
        **common))
    print(f"\nheld out: {held_out.name}\n{scores.table()}")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"lens_bench_{args.model}"
    scores.plot().savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
    scores.save(out / f"{stem}.safetensors")
    print(f"wrote {stem}.png and {stem}.safetensors in {out}")


if __name__ == "__main__":
    main()
