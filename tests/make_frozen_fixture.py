"""Regenerate tests/fixtures/gpt2_frozen.safetensors. ONLY EVER RUN IT ON THE PRE-REFACTOR COMMIT 1216a70.

The fixture freezes what reslens computed *before* the refactor; tests/test_frozen.py checks
the refactored code against it bit for bit. Regenerating it from refactored code would make
that check meaningless, so this script refuses to run unless the ``reslens`` it imports is,
file for file, the ``src/reslens`` of commit 1216a70 (git blob hashes compared with
``git ls-tree``). After the refactor, adapt the extraction helpers in
tests/frozen_results.py instead (see its docstring).

Usage (from the repository root, with the project's virtual environment)::

    python tests/make_frozen_fixture.py                      # exports 1216a70 to a temp dir itself
    python tests/make_frozen_fixture.py --src /tmp/frozen_base/src   # an existing pristine copy

The results are computed twice and must agree bit for bit before anything is written. The
safetensors metadata records the commit, the library versions and the thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FROZEN_COMMIT = "1216a7065bb1bc9364a5ed5e41705f6557039f17"
REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DEFAULT_OUT = TESTS / "fixtures" / "gpt2_frozen.safetensors"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", os.fspath(REPO), *args], check=True, capture_output=True, text=True
    ).stdout


def _blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_pristine(package_dir: Path, commit: str = FROZEN_COMMIT) -> None:
    """Raise unless ``package_dir`` holds exactly the files of ``src/reslens`` at ``commit``."""
    expected = {}
    for line in _git("ls-tree", "-r", commit, "--", "src/reslens").splitlines():
        meta, path = line.split("\t", 1)
        expected[path.removeprefix("src/reslens/")] = meta.split()[2]
    found = {
        p.relative_to(package_dir).as_posix(): _blob_sha1(p)
        for p in package_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    differ = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if differ or missing or extra:
        raise SystemExit(
            f"refusing to write the fixture: {package_dir} is not src/reslens of {commit[:7]} "
            f"(differ: {differ}, missing: {missing}, extra: {extra})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, help="a pristine src/ of commit 1216a70 (default: git archive it)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
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
        src = src.resolve()
        if "reslens" in sys.modules:
            raise SystemExit("reslens is already imported; run this script in a fresh interpreter")
        sys.path.insert(0, os.fspath(src))
        sys.path.insert(0, os.fspath(TESTS))

        import reslens

        package_dir = Path(reslens.__file__).resolve().parent
        if package_dir != src / "reslens":
            raise SystemExit(f"imported reslens from {package_dir}, not from {src / 'reslens'}")
        check_pristine(package_dir)

        import torch
        import transformers
        from safetensors.torch import save_file

        import frozen_results

        first = frozen_results.compute_frozen_results()
        second = frozen_results.compute_frozen_results()
        if first.keys() != second.keys() or not all(
            first[k].dtype == second[k].dtype
            and first[k].shape == second[k].shape
            and torch.equal(first[k].flatten().view(torch.uint8), second[k].flatten().view(torch.uint8))
            for k in first
        ):
            raise SystemExit("two runs of compute_frozen_results() differ: the results are not deterministic")

        metadata = {
            "format": "reslens.frozen_results/1",
            "commit": FROZEN_COMMIT,
            "reslens_path": os.fspath(package_dir),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "threads": str(frozen_results._THREADS),
            "text_sha256": frozen_results.TEXT_SHA256,
            "n_keys": str(len(first)),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(first.items())), os.fspath(args.out), metadata=metadata)
        size = args.out.stat().st_size
        print(f"wrote {len(first)} tensors ({size / 1e6:.2f} MB) from reslens at {FROZEN_COMMIT[:7]}")
        print(f"to {args.out}")


if __name__ == "__main__":
    main()
