"""The suite stands on its own from a plain clone: a test reaches ``../shared`` only through
``helpers.shared_corpus``, which skips with the reason when the corpus is absent."""

import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from helpers import shared_corpus

TESTS = Path(__file__).resolve().parent


def test_shared_corpus_skips_with_its_reason_when_the_folder_is_absent(monkeypatch, tmp_path):
    missing = tmp_path / "missing"
    monkeypatch.setenv("RESLENS_CORPUS", str(missing))
    with pytest.raises(pytest.skip.Exception, match=r"no corpus at .*missing .*set RESLENS_CORPUS"):
        shared_corpus()
    missing.mkdir()
    assert shared_corpus() == missing


def test_no_test_but_the_helper_names_the_shared_folder():
    """A string literal that names the shared folder (a path being built to it) is in helpers.py alone."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "helpers.py":
            continue
        with path.open("rb") as handle:
            for token in tokenize.tokenize(handle.readline):
                if token.type == tokenize.STRING and re.search(r"""['"/]shared['"/]""", token.string):
                    offenders.append(f"{path.relative_to(TESTS)}:{token.start[0]}")
    assert not offenders, f"use helpers.shared_corpus() (it skips, saying why, in a clone): {offenders}"


@pytest.mark.slow
def test_the_corpus_test_skips_from_a_clone_without_the_corpus(tmp_path):
    """The test that reads the corpus, run with the corpus pointed at a missing folder, skips saying why."""
    env = {**os.environ, "RESLENS_CORPUS": str(tmp_path / "missing")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{TESTS / 'test_triggers.py'}::test_embedded_values_agree_with_triggers_above_chance"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no corpus at" in done.stdout
