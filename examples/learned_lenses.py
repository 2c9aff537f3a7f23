"""Learned lenses vs the logit lens: the linear shortcut (Din et al. 2023), the tuned lens (Belrose et al.).

Fits the linear shortcut over ``--shortcut-tokens`` corpus tokens (closed form), trains the tuned
lens over ``--tuned-tokens`` (the paper's recipe: SGD with Nesterov momentum, identity init; a
checkpoint every 10 steps, resumed when it exists), then scores the three lenses on
``--eval-tokens`` of a held-out book: per layer KL(final || lens) and the cross-entropy with the
next token, printed as a table and drawn. The lenses are saved (``<out-dir>/shortcut_<model>.safetensors``,
``tuned_<model>.safetensors``) and reused by a later run unless ``--refit``.

    python examples/learned_lenses.py                      # the embedded GPT-2, minutes
    python examples/learned_lenses.py --model smollm2 --tuned-tokens 60000 --threads 2

The default corpus is ../shared/corpus without its three held-out books (see its README), the default
held-out text its ``105-persuasion.txt``; ``--corpus`` and ``--held-out`` take any .txt file or folder.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import reslens
from reslens import lenses

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="reslens.load_model name or path (default: the embedded GPT-2)"
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="training text: a .txt file or a folder")
    parser.add_argument("--held-out", type=Path, default=CORPUS / HELD_OUT[0], help="evaluation text (.txt)")
    parser.add_argument("--shortcut-tokens", type=int, default=200_000, help="tokens for the linear shortcut")
    parser.add_argument("--tuned-tokens", type=int, default=20_000, help="tokens for the tuned lens")
    parser.add_argument("--tokens-per-step", type=int, default=512, help="tuned-lens tokens per SGD step")
    parser.add_argument("--eval-tokens", type=int, default=10_000, help="held-out tokens scored")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where lenses, figure and csv go")
    parser.add_argument("--refit", action="store_true", help="fit and train again even if the lenses exist")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    return parser.parse_args()


def training_files(path: Path) -> list[Path]:
    """The corpus's .txt files without the held-out books; a plain message when there are none."""
    if not path.exists():
        sys.exit(
            f"no corpus at {path}: pass --corpus PATH, a .txt file or a folder of .txt files (plain prose)"
        )
    files = [path] if path.is_file() else [f for f in sorted(path.glob("*.txt")) if f.name not in HELD_OUT]
    if not files:
        sys.exit(f"{path} holds no .txt file to train on: pass --corpus PATH")
    return files


def fitted(path: Path, refit: bool, make):
    """The lens saved at ``path``, or ``make()`` (timed) saved there."""
    if path.is_file() and not refit:
        lens = lenses.load_lens(path)
        print(f"loaded {lens} from {path}")
        return lens
    start = time.perf_counter()
    lens = make()
    seconds = time.perf_counter() - start
    n = lens.config["n_tokens"]
    print(f"{lens}: {n} tokens in {seconds:.0f} s ({n / seconds:.0f} tokens/s)")
    lens.save(path)
    return lens


def main() -> None:
    args = parse_args()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 alone prints (every rank computes)
        sys.stdout = open(os.devnull, "w")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    files = training_files(args.corpus)
    if not args.held_out.is_file():
        sys.exit(
            f"no held-out text at {args.held_out}: pass --held-out FILE (a .txt not in the training corpus)"
        )
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    name = Path(args.model or "embedded").name
    out = args.out_dir
    shortcut = fitted(
        out / f"shortcut_{name}.safetensors",
        args.refit,
        lambda: lenses.fit_shortcut(model, files, tokenizer=tokenizer, max_tokens=args.shortcut_tokens),
    )
    tuned = fitted(
        out / f"tuned_{name}.safetensors",
        args.refit,
        lambda: lenses.train_tuned_lens(
            model,
            files,
            tokenizer=tokenizer,
            max_tokens=args.tuned_tokens,
            tokens_per_step=args.tokens_per_step,
            checkpoint=out / f"tuned_{name}.ckpt.safetensors",
        ),
    )
    loss = tuned.config.get("loss")
    if loss:
        first, last = torch.tensor(loss[0]), torch.tensor(loss[-1])
        print(
            f"tuned-lens training KL, mean over layers: step 1 {first.mean():.3f}, step {len(loss)} "
            f"{last.mean():.3f} nats"
        )

    scores = lenses.compare_lenses(
        model, [args.held_out], [None, shortcut, tuned], tokenizer=tokenizer, max_tokens=args.eval_tokens
    )
    print(f"\nheld out: {args.held_out.name}")
    print(scores.table())
    logit, short, tune = scores.kl_final_layer[:, :-1]
    print(
        f"\nlayers before the last where the lens beats the logit lens on KL: shortcut "
        f"{int((short < logit).sum())}/{len(logit)}, tuned {int((tune < logit).sum())}/{len(logit)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    scores.plot().savefig(out / f"lenses_{name}.png", dpi=150, bbox_inches="tight")
    scores.to_frame().to_csv(out / f"lenses_{name}.csv", index=False)
    scores.save(out / f"lenses_{name}.safetensors")
    print(f"wrote lenses_{name}.png, lenses_{name}.csv, lenses_{name}.safetensors in {out}")


if __name__ == "__main__":
    main()
