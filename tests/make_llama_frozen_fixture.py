"""Regenerate tests/fixtures/{llama,smollm2}_frozen.safetensors. ONLY EVER RUN IT ON PRE-REFACTOR 8098230.

The fixtures freeze what reslens computed *before* the refactor (one corpus stream, the start-token
rule, the lens as a package, ``Arch`` as an abstract base); tests/test_frozen_llama.py checks the
refactored code against them bit for bit. Regenerating them from refactored code would make that
check meaningless, so this script refuses to run unless the ``reslens`` it imports is, file for
file, the ``src/reslens`` of commit 8098230 (git blob hashes, ``check_pristine`` of
tests/make_frozen_fixture.py; the rest of the repository may differ). After the refactor, adapt the
extraction helpers in tests/frozen_llama.py instead (see its docstring).

Usage (from the repository root, with the project's virtual environment; SmolLM2 must be cached)::

    python tests/make_llama_frozen_fixture.py                  # exports 8098230's src to a temp dir itself
    python tests/make_llama_frozen_fixture.py --src /tmp/base/src --kinds llama

Each model's results are computed twice and must agree bit for bit before anything is written. The
safetensors metadata records the commit, the library versions and the thread count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FROZEN_COMMIT = "8098230634cf40e8238e4cb485ec59470eef23fb"
REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FIXTURES = TESTS / "fixtures"
KINDS = ("llama", "smollm2")


def fixture_path(kind: str, folder: Path = FIXTURES) -> Path:
    return folder / f"{kind}_frozen.safetensors"


def _import_pristine(src: Path):
    """Import reslens from ``src`` and refuse unless it is src/reslens of FROZEN_COMMIT."""
    if "reslens" in sys.modules:
        raise SystemExit("reslens is already imported; run this script in a fresh interpreter")
    sys.path.insert(0, os.fspath(src))
    sys.path.insert(0, os.fspath(TESTS))
    import reslens
    from make_frozen_fixture import check_pristine

    package_dir = Path(reslens.__file__).resolve().parent
    if package_dir != src / "reslens":
        raise SystemExit(f"imported reslens from {package_dir}, not from {src / 'reslens'}")
    check_pristine(package_dir, FROZEN_COMMIT)
    return package_dir


def _same_bits(first: dict, second: dict) -> bool:
    import torch

    return first.keys() == second.keys() and all(
        first[k].dtype == second[k].dtype
        and first[k].shape == second[k].shape
        and torch.equal(first[k].flatten().view(torch.uint8), second[k].flatten().view(torch.uint8))
        for k in first
    )


def _write(kind: str, out: Path, package_dir: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    import frozen_llama
    import frozen_results

    first = frozen_llama.compute_llama_frozen(kind)
    second = frozen_llama.compute_llama_frozen(kind)
    if not _same_bits(first, second):
        raise SystemExit(
            f"two runs of compute_llama_frozen({kind!r}) differ: the results are not deterministic"
        )
    metadata = {
        "format": "reslens.frozen_results/1",
        "model": kind,
        "commit": FROZEN_COMMIT,
        "reslens_path": os.fspath(package_dir),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": str(frozen_llama._THREADS),
        "text_sha256": frozen_results.TEXT_SHA256,
        "n_keys": str(len(first)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(first.items())), os.fspath(out), metadata=metadata)
    size = out.stat().st_size
    print(
        f"{kind}: wrote {len(first)} tensors ({size / 1e6:.2f} MB) from reslens at {FROZEN_COMMIT[:7]}\n"
        f"to {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, help="a pristine src/ of commit 8098230 (default: git archive it)"
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out-dir", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if src is None:
            archive = subprocess.run(
                ["git", "-C", os.fspath(REPO), "archive", FROZEN_COMMIT, "src"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            src = Path(tmp) / "src"
        package_dir = _import_pristine(src.resolve())
        for kind in args.kinds:
            _write(kind, fixture_path(kind, args.out_dir), package_dir)


if __name__ == "__main__":
    main()
