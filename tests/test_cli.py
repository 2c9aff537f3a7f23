"""The reslens command on a tiny local model (the embedded one is exercised in test_embedded)."""

import pytest

from reslens.cli import main
from reslens.models import embedded_model_dir
from helpers import make_model


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-gpt2")
    make_model(vocab_size=50257, n_positions=32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    return path


def test_lens_prints_the_table_and_writes_the_figure(local_dir, tmp_path, capsys):
    out = tmp_path / "lens.png"
    assert main(["lens", "Mr Holmes looked at the letter.", "--model", str(local_dir), "--out", str(out), "--metric", "rank"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[1].startswith("next") and any(line.startswith("input") for line in lines)
    assert "Holmes" in printed and "L3" in printed and "L0" in printed
    assert all(len(line) <= 100 for line in lines)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_text_is_cut_to_the_context(local_dir, capsys):
    assert main(["lens", "word " * 100, "--model", str(local_dir), "--width", "80"]) == 0
    captured = capsys.readouterr()
    assert "reading its first 32" in captured.err
    assert "[31]" in captured.out and "[32]" not in captured.out


def test_stats_over_a_file(local_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 40)
    assert main(["lens", "--file", str(text), "--stats", "--model", str(local_dir), "--max-length", "16"]) == 0
    printed = capsys.readouterr().out
    assert "top1=final" in printed and len(printed.splitlines()) == 3 + 4


def test_text_and_file_are_exclusive(local_dir, tmp_path):
    with pytest.raises(SystemExit, match="either TEXT or --file"):
        main(["lens", "--model", str(local_dir)])


def test_pca_prints_the_experiment_table(local_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The old sailor came back to the inn and asked for a glass of rum. " * 20)
    out = tmp_path / "pca.png"
    assert main(["pca", "--file", str(text), "--n", "12", "--model", str(local_dir), "--max-length", "24", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for condition in ("baseline", "no_embedding", "uncentred", "unit_norm", "ln_f", "random"):
        assert condition in printed
    assert "12 predictions" in printed and out.stat().st_size > 1000
