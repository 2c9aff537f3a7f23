"""Results read well in a notebook: every result has a short ``__repr__`` and a real ``_repr_html_``, and the
HTML renders in a browser (headless Chromium: DOM assertions and a non-blank screenshot)."""

import importlib
import os
import shutil
import subprocess

import pytest
import torch

import reslens
from reslens import atp, attribution, heads, hub, lens, lens_stats, pca, rome, tracing
from reslens import kv_memory as kv
from reslens.lens._metrics import reference

pytestmark = pytest.mark.slow

TEXT = "When the old sailor came back to the inn, he asked for a glass of rum."

#: the public modules whose classes are results or values (reslens.arch, the adapter, is not a result)
PUBLIC = ("reslens", "reslens.residuals", "reslens.hooks", "reslens.lens", "reslens.pca", "reslens.kv_memory",
          "reslens.heads", "reslens.attribution", "reslens.tracing", "reslens.rome", "reslens.generation",
          "reslens.atp")
#: public classes that are not results or values: the hook context managers and the lenses' base class
NOT_RESULTS = {"Trace", "Patch", "Lens"}


def public_result_classes() -> dict[str, type]:
    """Every public result or value class, by name."""
    found = {}
    for name in PUBLIC:
        module = importlib.import_module(name)
        for attr in module.__all__:
            value = getattr(module, attr)
            if isinstance(value, type) and value.__name__ not in NOT_RESULTS:
                found[value.__name__] = value
    # values reached through a public name rather than an ``__all__`` entry
    found["Reference"] = type(reference(torch.zeros(1, 2), fused=False))  # the lens's final distribution
    found["Known"] = hub.Known  # reslens.hub.KNOWN's entries
    return found


@pytest.fixture(scope="module")
def results():
    """One of every public result and value type, on the embedded model (small sizes)."""
    model, tok = reslens.load_model()
    arch = reslens.adapter(model)
    n_layer, d_model, d_mlp = arch.n_layer, arch.d_model, arch.d_mlp
    batch = reslens.tokenize(tok, [TEXT])
    sites = ("resid", "mlp_act", "attn_z", "mlp_out", "attn_pattern", "logits")
    res = reslens.capture(model, batch, sites=sites)
    sentences = [TEXT, "Mr Holmes looked at the letter for a long time.", "It was a dark and stormy night."]
    book = " ".join(sentences * 4)
    index = kv.mine_triggers(model, tok, sentences, top_k=3, progress=False)
    memories = kv.contributions(model, [TEXT], 2, tokenizer=tok)
    stats = lens_stats.lens_stats(model, book, tokenizer=tok, max_length=16, progress=False)
    tuned = lens.TunedLens.identity(n_layer, d_model, {"model": "embedded"})
    maps = torch.eye(d_model).repeat(n_layer, 1, 1), torch.zeros(n_layer, d_model)
    moments = lens.ShortcutMoments(n_layer, d_model)
    moments.add(res.resid[:, 0])
    experiment = pca.pca_experiment(model, tok, [book], n=8, max_length=16, min_context=4, progress=False)
    noise = tracing.Noise(samples=2)
    scope = lens.Patchscope(model, tokenizer=tok)
    out = {
        "Batch": batch,
        "Residuals": res,
        "LensResult": lens.lens_of(res, arch, tokenizer=tok),
        "LensStats": stats,
        "MetricStats": stats.mean,
        "Reference": reference(res.logits[0].float(), fused=False),
        "LogitLens": lens.LogitLens(),
        "AffineLens": lens.AffineLens(*maps),
        "TunedLens": tuned,
        "LinearShortcut": lens.LinearShortcut(*maps),
        "ShortcutMoments": moments,
        "LensComparison": lens.compare_lenses(model, [book], [None, tuned], tokenizer=tok, max_tokens=64,
                                              max_length=16, progress=False),
        "ResidualPCA": pca.ResidualPCA(n_components=2).fit(res.resid[:, 0, -1]),
        "TrajectoryPCAResult": pca.trajectory_pca(model, [TEXT], tokenizer=tok),
        "PCAExperiment": experiment,
        "ConditionResult": experiment.baseline,
        "MemoryContributions": memories,
        "Memory": memories.top(1)[0],
        "ValueTokens": kv.value_tokens(model, 2, [1, 2], k=3, tokenizer=tok),
        "DeletionNeurons": kv.deletion_neurons(model),
        "TriggerIndex": index,
        "Trigger": index.triggers(index.layers[0], 0)[0],
        "KeyValueAgreement": kv.agreement(index, model, n_shuffles=2),
        "HeadScores": heads.induction_scores(model, seq_len=10, n=2),
        "OVSummary": heads.ov_eigen_summary(model),
        "CompositionScores": heads.composition_scores(model, "k", n_baseline=4),
        "CompositionByOffset": heads.composition_by_offset(model, "k", [1, 2], n_baseline=4),
        "LogitAttribution": attribution.logit_attribution(model, [TEXT], " the", tokenizer=tok),
        "Noise": noise,
        "TraceResult": tracing.causal_trace(model, tok, "“Yes,” said White", "White", kind="mlp", window=1,
                                            noise=noise),
        "TraceSummary": tracing.trace_many(model, tok, [("“Yes,” said White", "White", None)], kind="mlp",
                                           window=1, noise=noise, progress=False),
        "SecondMoment": rome.SecondMoment.compute(model, 1, sentences, tokenizer=tok, max_tokens=64),
        "RankOneEdit": rome.RankOneEdit(model, 1, torch.ones(d_mlp), torch.ones(d_model),
                                        key=torch.ones(d_mlp), value=torch.ones(d_model)),
        "Known": hub.KNOWN["smollm2"],
        "JacobianLens": lens.fit_jacobian_lens(model, [book], tokenizer=tok, max_tokens=48, max_length=16,
                                               skip_first=2, progress=False),
        "JacobianSums": lens.JacobianSums(n_layer, d_model),
        "LensChange": lens.lens_change(model, [TEXT], " the", tokenizer=tok, layers=1),
        "Patchscope": scope,
        "PatchscopeResult": lens.patchscope(model, TEXT, -1, tokenizer=tok, layers=[1, 2]),
        "Generation": reslens.generate(model, [TEXT], tokenizer=tok, max_new_tokens=3, lens="logit"),
        "Explorer": reslens.explore(model, TEXT, tokenizer=tok, changes=4),
        "AtPResult": atp.attribution_patching(model, batch.input_ids, noise=noise, span=(1, 3),
                                              metric=atp.log_prob([13]), kinds=("heads", "mlp"), verify=2,
                                              sample=1, graddrop=True),
        "KindScores": atp.KindScores(mlp=torch.zeros(n_layer)),
        "KLToClean": atp.kl_to_clean(),
        "EdgeResult": atp.edge_attribution(model, batch.input_ids, noise=noise, span=(1, 3),
                                           metric=atp.log_prob([13])),
    }
    return out


def test_every_public_result_and_value_class_is_shown(results):
    """Each public result or value class is in the fixture, and defines both a ``__repr__`` and a
    ``_repr_html_`` of its own (not object's)."""
    classes = public_result_classes()
    assert sorted(classes) == sorted(results), set(classes) ^ set(results)
    for name, cls in classes.items():
        assert isinstance(results[name], cls), name
        assert cls.__repr__ is not object.__repr__, name
        # an instance's: scikit-learn's estimators give ``_repr_html_`` as a property
        assert callable(getattr(results[name], "_repr_html_", None)), name


def test_every_result_has_a_short_repr_and_an_html_table(results):
    for name, result in results.items():
        text = repr(result)
        assert len(text) < 600 and "tensor(" not in text, (name, text[:200])
        html = result._repr_html_()
        assert isinstance(html, str) and "<table" in html, name


def test_the_main_reprs_say_what_they_show_and_how_to_read_it(results):
    """A caption before the table (issue 28): what is shown, and how to read it."""
    phrases = {"LensResult": "top-1 token of that layer", "LensStats": "one row per layer",
               "TraceResult": "restored to its clean value", "HeadScores": "a row per layer",
               "OVSummary": "a row per layer", "CompositionScores": "random matrices",
               "MemoryContributions": "sum of memories"}
    for name, phrase in phrases.items():
        page = results[name]._repr_html_()
        assert phrase in page[: page.index("<table")].replace("&#x27;", "'"), name
    assert "logit lens of " in results["LensResult"]._repr_html_()


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
