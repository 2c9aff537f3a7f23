"""The MLP as key-value memories (Geva et al. 2021): triggers, value agreement, deletion neurons.

Mines, for every key of every layer, its top-50 trigger sentences over the first ``--max-tokens``
corpus tokens (a gated MLP's triggers keep both signs: ranked by |m|, a negative coefficient
writing -v), then prints

- the per-layer agreement between the token a value promotes (its top token; its bottom token
  where the top trigger's coefficient is negative) and the token after the key's top trigger,
  with the random (1/|V|) and shuffled baselines,
- a few readable memories: the top trigger prefixes with the activating token in [[ ]], and the
  value's top and bottom tokens,
- the deletion neurons per layer (cos(key ⊙ γ, value) below -0.5; for a gated MLP the up key,
  with the gate key's cosine beside it).

The index is saved (``--index``, default ``<out-dir>/kv_index_<model>.safetensors``) every 100k
tokens and resumed when it exists (the same corpus, options and model, or an error), so an
interrupted run continues where it stopped.

    python examples/kv_memories.py                                  # the embedded GPT-2
    python examples/kv_memories.py --model smollm2 --max-tokens 1000000 --index /tmp/kv_smollm2.safetensors
    torchrun --standalone --nproc-per-node 2 examples/kv_memories.py --model smollm2 --threads 1

Under ``torchrun`` the ranks mine alternate batches and merge exactly (the one-process index);
rank 0 writes the index and alone goes on to the agreement, the memories and the figures.

The default corpus is ../shared/corpus without its three held-out books (see its README);
``--corpus`` takes any .txt file or folder of .txt files.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import reslens
from reslens import kv_memory as kv

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus"
HELD_OUT = ("105-persuasion.txt", "2852-hound-of-the-baskervilles.txt", "12-through-the-looking-glass.txt")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="reslens.load_model name or path (default: the embedded "
        "GPT-2; 'smollm2' for SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=CORPUS,
        help="a .txt file or a folder of them (default: ../shared/corpus, held-out books left out)",
    )
    parser.add_argument(
        "--include-held-out", action="store_true", help="also read the corpus README's three held-out books"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=1_000_000, help="corpus tokens to mine (default 1M)"
    )
    parser.add_argument("--top-k", type=int, default=50, help="triggers kept per key (default 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward (default 32)")
    parser.add_argument(
        "--index", type=Path, default=None, help="the trigger index file (resumed if it exists)"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where figures and the csv go")
    parser.add_argument("--memories", type=int, default=8, help="example memories printed (default 8)")
    parser.add_argument(
        "--through-final-norm",
        action="store_true",
        help="also read values through the final norm: W_U final_norm(v)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a shared 2-core machine)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    return parser.parse_args()


def corpus_files(path: Path, include_held_out: bool) -> list[Path]:
    """The corpus's .txt files (sorted), without the held-out books; a plain message when missing."""
    if not path.exists():
        sys.exit(
            f"no corpus at {path}: this example needs text to mine. Pass --corpus PATH, a .txt file or a "
            "folder of .txt files (plain UTF-8 prose, e.g. Project Gutenberg books; ~1M tokens is ~4 MB)"
        )
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    if not files:
        sys.exit(f"{path} holds no .txt file: pass --corpus PATH, a .txt file or a folder of .txt files")
    return files if include_held_out else [f for f in files if f.name not in HELD_OUT]


def books_read(files: list[Path], tokenizer, n_tokens: int, unit: str, window: int) -> list[str]:
    """The files the first ``n_tokens`` mined tokens came from (the last one possibly in part)."""
    from reslens._stream import units

    names, total = [], 0
    for f in files:
        if total >= n_tokens:
            break
        names.append(f.name)
        text = f.read_text(encoding="utf-8")
        total += sum(map(len, units(tokenizer, [text], unit=unit, max_length=window)))
    return names


def show_memories(index, result, model, tokenizer, n: int) -> None:
    """``n`` memories from evenly spaced layers: per layer the agreeing key with the strongest top trigger."""
    rows = (
        torch.linspace(0, len(index.layers) - 1, min(n, len(index.layers))).round().long().unique().tolist()
    )
    for row in rows:
        layer = index.layers[row]
        agreeing = (result.value_top[row] == result.next_token[row]) & (result.next_token[row] >= 0)
        keys = agreeing.nonzero().flatten()
        if not len(keys):
            continue
        key = int(keys[index.scores[row, keys, 0].abs().argmax()])
        sign = "m < 0: writes -v, promotes the bottom tokens" if bool(result.negative[row, key]) else "m > 0"
        head, triggers = index.format(layer, key, n=4, tokenizer=tokenizer).split("\n", 1)
        print(f"{head} [{sign}]\n{triggers}")
        vt = kv.value_tokens(model, layer, [key], k=8, tokenizer=tokenizer)
        print("  value top:    " + " ".join(repr(t) for t in vt.tokens(key)))
        print("  value bottom: " + " ".join(repr(t) for t in vt.tokens(key, bottom=True)) + "\n")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    files = corpus_files(args.corpus, args.include_held_out)
    model, tokenizer = reslens.load_model(args.model, device=args.device)
    name = args.model or "embedded"
    index_path = args.index or args.out_dir / f"kv_index_{Path(name).name}.safetensors"
    resume = index_path if index_path.is_file() else None
    if resume is not None:
        print("resuming", kv.TriggerIndex.load(index_path).describe())
    start = time.perf_counter()
    index = kv.mine_triggers(
        model,
        tokenizer,
        files,
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        batch_size=args.batch_size,
        out=index_path,
        resume=resume,
        save_every=100_000,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank mines; rank 0 alone goes on
        return
    seconds = time.perf_counter() - start
    print(index, f"({seconds:.0f} s this run)")
    print(
        "books read:", ", ".join(books_read(files, tokenizer, index.n_tokens, index.unit, index.window)), "\n"
    )

    result = kv.agreement(index, model)
    print(result.table(), "\n")
    if args.through_final_norm:
        print(kv.agreement(index, model, through_final_norm=True).table(), "\n")
    show_memories(index, result, model, tokenizer, args.memories)

    deletion = kv.deletion_neurons(model)
    print(deletion.table(5))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    result.plot().savefig(args.out_dir / "kv_agreement.png", dpi=150, bbox_inches="tight")
    deletion.plot().savefig(args.out_dir / "kv_deletion_neurons.png", dpi=150, bbox_inches="tight")
    result.to_frame().to_csv(args.out_dir / "kv_agreement.csv", index=False)
    print(
        f"wrote kv_agreement.png, kv_deletion_neurons.png, kv_agreement.csv in {args.out_dir}; "
        f"index {index_path}"
    )


if __name__ == "__main__":
    main()
