"""Results read well in a notebook: every result has a short ``__repr__`` and a real ``_repr_html_``, and the
HTML renders in a browser (headless Chromium: DOM assertions and a non-blank screenshot)."""

import os
import shutil
import subprocess

import pytest

import reslens
from reslens import attribution, heads, lens, lens_stats, pca, tracing
from reslens import kv_memory as kv

pytestmark = pytest.mark.slow

TEXT = "When the old sailor came back to the inn, he asked for a glass of rum."


@pytest.fixture(scope="module")
def results():
    """One of every result type, on the embedded model (small sizes)."""
    model, tok = reslens.load_model()
    res = reslens.capture(
        model,
        reslens.tokenize(tok, [TEXT]),
        sites=("resid", "mlp_act", "attn_z", "mlp_out", "attn_pattern", "logits"),
    )
    sentences = [TEXT, "Mr Holmes looked at the letter for a long time.", "It was a dark and stormy night."]
    index = kv.mine_triggers(model, tok, sentences, top_k=3, progress=False)
    out = {
        "Residuals": res,
        "LensResult": lens.lens_of(res, reslens.adapter(model), tokenizer=tok),
        "LensStats": lens_stats.lens_stats(
            model, " ".join(sentences * 4), tokenizer=tok, max_length=16, progress=False
        ),
        "TrajectoryPCAResult": pca.trajectory_pca(model, [TEXT], tokenizer=tok),
        "MemoryContributions": kv.contributions(model, res, 2),
        "ValueTokens": kv.value_tokens(model, 2, [1, 2], k=3, tokenizer=tok),
        "DeletionNeurons": kv.deletion_neurons(model),
        "TriggerIndex": index,
        "KeyValueAgreement": kv.agreement(index, model, n_shuffles=2),
        "HeadScores": heads.induction_scores(model, seq_len=10, n=2),
        "OVSummary": heads.ov_eigen_summary(model),
        "CompositionScores": heads.composition_scores(model, "k", n_baseline=4),
        "LogitAttribution": attribution.logit_attribution(model, [TEXT], " the", tokenizer=tok),
        "TraceResult": tracing.causal_trace(
            model, tok, "“Yes,” said White", "White", kind="mlp", window=1, noise=tracing.Noise(samples=2)
        ),
    }
    return out


def test_every_result_has_a_short_repr_and_an_html_table(results):
    for name, result in results.items():
        text = repr(result)
        assert len(text) < 600 and "tensor(" not in text, (name, text[:200])
        html = result._repr_html_()
        assert isinstance(html, str) and "<table" in html, name


def test_tables_are_text_not_escaped_strings(results):
    table = results["LensResult"].table()
    assert isinstance(table, str) and "\n" in table


def _chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_the_html_renders_in_a_browser(results, tmp_path):
    browser = _chromium()
    if browser is None:
        message = "no headless Chromium here (apt-get install chromium-headless-shell)"
        if os.environ.get("RESLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    sections = "".join(
        f'<section id="{name}"><h2>{name}</h2>{r._repr_html_()}</section>' for name, r in results.items()
    )
    page = tmp_path / "results.html"
    page.write_text(
        f"<!doctype html><html><meta charset='utf-8'><body>{sections}</body></html>", encoding="utf-8"
    )
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for name in results:
        assert f'id="{name}"' in dom, name
    assert dom.count("<table") >= len(results)
    # the lens grid: one cell per (layer, position), each with a token and a background colour
    lens_html = results["LensResult"]._repr_html_()
    assert "background" in lens_html and "sailor" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert image.size == (1200, 2400) and hi - lo > 100  # something was drawn, not a blank page
    assert len(set(image.resize((60, 120)).tobytes())) > 20


def test_tokens_show_readably():
    from reslens._text import cell_text
    from reslens._tokens import readable

    _, tok = reslens.load_model()
    quote = tok("“", add_special_tokens=False).input_ids  # one character split over two byte-level tokens
    assert len(quote) == 2 and all("\ufffd" in tok.decode([i]) for i in quote)
    assert [readable(tok, i) for i in quote] == ["\\xe2\\x80", "\\x9c"]
    assert cell_text(" ", 5) == "␣" and cell_text(" the", 5) == "the" and cell_text("\n", 5) == "\\n"
