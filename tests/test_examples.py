"""Every script in examples/ runs to the end on the embedded model with small sizes (as einops runs its
notebooks): the examples a researcher starts from never rot."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The old sailor came back to the inn and asked for a glass of rum. “Yes,” said White Fang's master, "
    "and Mr Holmes looked at the letter for a long time. It was a dark and stormy night; the rain fell. "
) * 40

#: script -> its arguments (small sizes): {text} a plain-text file, {corpus} a folder of them, {out} a folder
ARGS = {
    "attribution_patching.py": ["--seq-len", "6", "--n", "2", "--top", "3", "--sample", "2"],
    "capture.py": [],
    "generate_lens.py": ["--new", "4", "--out-dir", "{out}"],
    "head_ablation.py": ["--seq-len", "6", "--n", "2"],
    "logit_lens.py": [
        "--file",
        "{text}",
        "--tokens",
        "64",
        "--window",
        "32",
        "--skip",
        "0",
        "--out-dir",
        "{out}",
    ],
    "pca_experiment.py": ["--file", "{text}", "--n", "10", "--max-length", "32", "--out-dir", "{out}"],
    "induction_heads.py": ["--n", "2", "--seq-len", "10", "--batch", "2", "--out-dir", "{out}"],
    "kv_memories.py": ["--corpus", "{corpus}", "--max-tokens", "3000", "--top-k", "5", "--out-dir", "{out}"],
    "learned_lenses.py": [
        "--corpus", "{corpus}", "--held-out", "{text}", "--shortcut-tokens", "2000", "--tuned-tokens", "1024",
        "--tokens-per-step", "256", "--eval-tokens", "500", "--out-dir", "{out}",
    ],
    "causal_trace.py": ["--samples", "2", "--window", "1", "--out", "{out}"],
    "rank_one_edit.py": ["--corpus", "{corpus}", "--stats-tokens", "2000"],
    "lens_change.py": ["--memories", "2", "--top", "5", "--out-dir", "{out}"],
    "lens_bench.py": ["--model", "embedded", "--corpus", "{corpus}", "--held-out", "{text}", "--tuned-tokens",
                      "256", "--jacobian-tokens", "48", "--eval-tokens", "200", "--causal-positions", "3",
                      "--out-dir", "{out}"],
    "explorer_screenshots.py": ["--out", "{out}"],
    "patchscope.py": ["--file", "{text}", "--corpus", "{corpus}", "--tokens", "64", "--window", "32",
                      "--skip", "0", "--shortcut-tokens", "500"],
}


def test_every_example_is_listed():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(ARGS)


#: scripts that drive a headless Chromium (they skip, saying why, where there is none)
BROWSER = {"explorer_screenshots.py"}


@pytest.mark.parametrize("script", sorted(ARGS))
def test_example_runs(script, tmp_path):
    if script in BROWSER:
        sys.path.insert(0, str(ROOT / "tests"))
        from cdp import need_browser

        need_browser()  # skips, saying why, where there is no Chromium (fails with RESLENS_REQUIRE_BROWSER=1)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "book.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "out").mkdir()
    fill = {
        "{text}": str(tmp_path / "text.txt"),
        "{corpus}": str(tmp_path / "corpus"),
        "{out}": str(tmp_path / "out"),
    }
    args = [fill.get(a, a) for a in ARGS[script]]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{script} printed nothing"
    if script in BROWSER:
        assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
            "explorer-heads.png", "explorer-lens.png", "explorer-trace.png"]
