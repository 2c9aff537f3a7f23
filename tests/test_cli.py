"""The reslens command on a tiny local model (the embedded one is exercised in test_embedded)."""

from pathlib import Path

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
    assert (
        main(
            [
                "lens",
                "Mr Holmes looked at the letter.",
                "--model",
                str(local_dir),
                "--out",
                str(out),
                "--metric",
                "rank",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"model: {local_dir} (gpt2, 3 layers x 32)"
    assert lines[1] == "logit lens: top-1 token per layer"
    assert lines[4].startswith("next") and any(line.startswith("input") for line in lines)
    assert "Holmes" in printed and "L3" in printed and "L0" in printed
    assert all(len(line) <= 100 for line in lines)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lens_reads_through_a_learned_lens(local_dir, tmp_path, capsys):
    import torch

    from reslens.lenses import TunedLens

    weight = 0.01 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    lens = TunedLens(weight, torch.zeros(3, 32))
    lens.save(tmp_path / "tuned.safetensors")
    argv = ["lens", "Mr Holmes looked at the letter.", "--model", str(local_dir), "--lens"]
    assert main([*argv, str(tmp_path / "tuned.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "tuned lens: top-1 token per layer"
    assert main([*argv, str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--lens" in err and "no such file" in err
    assert main([*argv, str(tmp_path / "tuned.safetensors"), "--mid"]) == 2
    assert "resid layers only" in capsys.readouterr().err


def test_long_text_is_cut_to_the_context(local_dir, capsys):
    assert main(["lens", "word " * 100, "--model", str(local_dir), "--width", "80"]) == 0
    captured = capsys.readouterr()
    assert "reading its first 32" in captured.err
    assert "[31]" in captured.out and "[32]" not in captured.out


def test_stats_over_a_file(local_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 40)
    assert (
        main(["lens", "--file", str(text), "--stats", "--model", str(local_dir), "--max-length", "16"]) == 0
    )
    printed = capsys.readouterr().out
    assert "top1=final" in printed and len(printed.splitlines()) == 1 + 3 + 4


def test_text_and_file_are_exclusive(local_dir, tmp_path, capsys):
    assert main(["lens", "--model", str(local_dir)]) == 2
    assert "either TEXT or --file" in capsys.readouterr().err


def test_pca_prints_the_experiment_table(local_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The old sailor came back to the inn and asked for a glass of rum. " * 20)
    out = tmp_path / "pca.png"
    assert (
        main(
            [
                "pca",
                "--file",
                str(text),
                "--n",
                "12",
                "--model",
                str(local_dir),
                "--max-length",
                "24",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for condition in ("baseline", "no_embedding", "uncentred", "unit_norm", "final_norm", "random"):
        assert condition in printed
    assert "12 predictions" in printed and out.stat().st_size > 1000


# --- every subcommand: one line on stderr, exit code 2, before any model loads -------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["lens", "--file", "{tmp}/missing.txt"], "no such file"),
        (["lens", "--file", "{tmp}"], "is a folder"),
        (["lens", "--file", "{tmp}/binary.bin"], "not a UTF-8 text file"),
        (["lens", "text", "--top-k", "0"], "--top-k must be a positive integer"),
        (["lens", "text", "--out", "{tmp}"], "is a folder"),
        (["lens", "text", "--out", "{tmp}/plain/lens.png"], "not a writable folder"),
        (["lens", "text", "--device", "cuda"], "CUDA is not available"),
        (["lens", "text", "--device", "toaster"], "is not a torch device"),
        (["pca", "--file", "{tmp}/missing.txt"], "no such file"),
        (["pca", "--file", "{tmp}/book.txt", "--n", "-3"], "--n must be a positive integer"),
        (["heads", "--top", "0"], "--top must be a positive integer"),
        (["trace", "prompt", "--subject", "p", "--samples", "0"], "--samples must be a positive integer"),
        (["memories", "text", "--top", "0"], "--top must be a positive integer"),
        (["lens", "--file", "{tmp}/book.txt", "--stats", "--max-length", "1"],
         "--max-length must be at least 2 (tokens per window: a prediction needs a token before it); got 1"),
        (["pca", "--file", "{tmp}/book.txt", "--max-length", "8"], "--max-length must be at least 9"),
        (["heads", "--seq-len", "1"], "--seq-len must be at least 2 (random tokens per repeat); got 1"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(argv, message, tmp_path, capsys, monkeypatch):
    import reslens.models

    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "book.txt").write_text("Some text. " * 50)
    (tmp_path / "plain").write_text("a file where a folder should be")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(reslens.models, "load_model", no_loading)
    monkeypatch.setattr(reslens, "load_model", no_loading, raising=False)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_errors_inside_the_work_are_one_line_too(local_dir, capsys):
    code = main(["trace", "Mr Holmes looked", "--subject", "Watson", "--model", str(local_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("reslens trace: error:") and err.count("\n") == 1


def test_help_returns_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys; from reslens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "usage: reslens" in out and out.strip().endswith("NO TORCH")


@pytest.mark.parametrize(
    "argv",
    [
        ["lens", "Mr Holmes looked at the letter.", "--out", "{new}/lens.png"],
        ["lens", "--file", "{tmp}/book.txt", "--stats", "--max-length", "16", "--out", "{new}/stats.png"],
        ["pca", "--file", "{tmp}/book.txt", "--n", "6", "--max-length", "16", "--out", "{new}/pca.png"],
        ["heads", "--seq-len", "5", "--n", "2", "--out", "{new}/heads.png"],
        ["trace", "Mr Holmes looked", "--subject", "Holmes", "--samples", "2", "--out", "{new}/trace.png"],
        ["memories", "--mine", "{tmp}/book.txt", "--max-tokens", "200", "--out", "{new}/index.safetensors",
         "--figure", "{new}/deeper/agreement.png"],
    ],
)
def test_every_output_path_gets_its_folder_made(argv, local_dir, tmp_path, capsys):
    """``--out NEW_DIR/x.png`` makes the folder, as every reslens save does (it failed after the work)."""
    (tmp_path / "book.txt").write_text("The old sailor came back to the inn and asked for rum. " * 20)
    new = tmp_path / "new" / "folder"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{new}", str(new)) for a in argv]
    assert main([*args, "--model", str(local_dir)]) == 0, capsys.readouterr().err
    written = [Path(a) for a in args if a.startswith(str(new))]
    assert written and all(path.is_file() and path.stat().st_size > 0 for path in written)
    # and every output names its model first (the default 4-layer toy used to be silent)
    assert capsys.readouterr().out.splitlines()[0] == f"model: {local_dir} (gpt2, 3 layers x 32)"


def test_the_embedded_default_says_what_it_is(capsys):
    for argv in (["lens", "Hello there"], ["memories", "Hello there", "--layer", "0", "--top", "2"]):
        assert main(argv) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first == ("model: embedded GPT-2 (4 layers x 128; a weak CPU-trained stand-in: --model "
                         "smollm2 for a real one)")


def test_a_warning_is_one_line_naming_the_command(capsys):
    argv = ["trace", "The capital of France is", "--subject", "France", "--answer", "the", "--samples", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("reslens trace: warning: answer='the' has p=")
    assert "did you mean answer=' the'?" in err
    assert err.count("\n") == 1 and "UserWarning" not in err


def test_glyphs_missing_from_the_font_are_one_line_not_a_warning_each(tmp_path, capsys):
    """Gemma's vocabulary puts tokens of many scripts in a lens figure; matplotlib warns once a glyph."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reslens.cli import _save

    figure = plt.figure()
    figure.text(0.1, 0.5, "继续访问 이유 ʐ")
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        figure.savefig(tmp_path / "raw.png")
    if not any("missing from font" in str(w.message) for w in raw):
        pytest.skip("matplotlib's font here has every glyph of the test text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _save(figure, tmp_path / "lens.png")
    plt.close(figure)
    assert not [w for w in caught if "missing from font" in str(w.message)]
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "missing from matplotlib's font" in line]) == 1
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
