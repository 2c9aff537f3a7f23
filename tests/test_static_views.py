"""The static views a person reads (issue 28, item 6): a KL scale the embedding row does not swamp,
a composition figure readable at any model size, an OV copying panel that is not a +-1 checkerboard,
whitespace tokens that never show as blank cells, and HTML reprs that say what they show."""

from dataclasses import replace

import matplotlib
import pytest
import torch

from reslens import heads
from reslens._text import cell_text
from reslens.lens import logit_lens
from reslens.lens._plot import plot_lens, plot_lens_stats, plot_lenses
from helpers import make_model

matplotlib.use("Agg")


@pytest.fixture
def swamped():
    """A lens whose embedding row's KL is 100x the rest (as on a trained model: 100+ nats against 1-17)."""
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    lens = logit_lens(model, ids)
    kl = lens.kl_final_layer.clone()
    kl[0] = 100.0 * kl[1:].nan_to_num().max() + 50.0  # row 0 reads the embedding
    return replace(lens, kl_final_layer=kl)


def _colour_bar(fig):
    return next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")


def test_the_kl_scale_is_set_by_the_rows_after_the_embedding_and_says_it_is_clipped(swamped):
    rest = float(swamped.kl_final_layer[1:].nan_to_num().max())
    for fig in (plot_lens(swamped, "kl"), plot_lenses([swamped, swamped], "kl")):
        image = next(ax for ax in fig.axes if ax.get_ylabel() == "layer").images[0]
        assert image.norm.vmax == pytest.approx(rest, rel=1e-6)  # not the embedding row's 100x
        label = _colour_bar(fig).get_ylabel()
        assert "clipped at" in label and f"{rest:.3g}" in label and "embedding" in label
    # where nothing is clipped the label stays plain
    plain = plot_lens(swamped, "entropy")
    assert "clipped" not in _colour_bar(plain).get_ylabel()


def test_the_lens_statistics_keep_the_nats_axis_off_the_embeddings_kl():
    class Mean:
        kl_final_layer = torch.tensor([120.0, 6.0, 3.0, 0.0])
        entropy = torch.tensor([9.0, 5.0, 3.0, 2.0])
        final_top1_prob = torch.tensor([0.0, 0.1, 0.3, 0.6])

    class Stats:
        layers, mean, n_tokens, lens_name = (0, 1, 2, 3), Mean(), 100, "logit lens"
        top1_agreement = torch.tensor([0.0, 0.2, 0.5, 1.0])
        input_token_top1 = torch.tensor([0.9, 0.2, 0.1, 0.0])

    fig = plot_lens_stats(Stats())
    right = fig.axes[1]
    assert right.get_ylim()[1] < 20 and "clipped" in right.get_ylabel()


WHITESPACE = [" ", "  ", "    ", "\u00a0", "\t", "\n", "\r\n", "\u2009", "\u202f", "\u2002", "\u3000",
              "\u200b", " \u00a0"]


def test_every_whitespace_token_shows_visibly_and_distinctly():
    shown = [cell_text(token, 10) for token in WHITESPACE]
    assert all(text.strip() for text in shown), dict(zip(WHITESPACE, shown))
    assert len(set(shown)) == len(shown), dict(zip(WHITESPACE, shown))
    assert cell_text("\u00a0", 8) == "⍽" and cell_text("  ", 8) == "␣␣"
    assert cell_text(" the", 8) == "the" and cell_text("the\u00a0cat", 8) == "the⍽cat"


def test_the_composition_figure_stays_readable_with_many_heads_and_shows_the_strongest_pair():
    model = make_model(n_layer=4, n_embd=64, n_head=16)  # 64 heads: a 64 x 64 grid before
    comp = heads.composition_scores(model, "k", n_baseline=4)
    fig = comp.plot()
    labelled = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax in labelled:
        assert len(ax.get_xticklabels()) <= 24 and len(ax.get_yticklabels()) <= 24
    writer, reader, _ = comp.top(1)[0]
    shown = [t.get_text() for ax in labelled for t in ax.get_yticklabels()]
    assert f"{writer} -> {reader}" in shown
    # the layer heatmap's strongest cell is that pair's block
    blocks = labelled[0].images[0].get_array()
    a, b = (int(label.split(".")[0]) for label in (writer, reader))
    assert float(blocks[a, b]) == pytest.approx(comp.top(1)[0][2])


def test_the_copying_panel_has_a_continuous_scale_and_says_what_it_shows():
    # one eigenvalue dwarfs three negative ones: the copying score reads nearly +1, the signs -0.5
    eig = torch.tensor([[[100.0, -1.0, -1.0, -1.0], [1.0, 1.0, -2.0, 0.5]]], dtype=torch.complex64)
    ov = heads.OVSummary(eig, (eig.sum(-1).real / eig.abs().sum(-1)).float())
    assert float(ov.copying[0, 0]) > 0.9
    assert ov.sign_balance.tolist() == [[-0.5, 0.5]]
    fig = ov.plot()
    panels = [ax for ax in fig.axes if ax.get_ylabel() == "layer"]
    assert [ax.get_title() for ax in panels] == ["copying scores", "copying (eigenvalue signs) scores"]
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert "Σλ/Σ|λ|" in bars[0] and "d_head" in bars[1]  # each colour bar says what its colour is
    image = panels[1].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (-1, 1)  # diverging, centred on 0


def test_the_lens_repr_names_its_lens_and_model_and_says_how_to_read_it():
    from reslens import adapter, capture
    from reslens.lens import LinearShortcut, lens_of

    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    res = capture(model, ids, sites=("resid",))
    d, n = model.config.n_embd, model.config.n_layer
    shortcut = LinearShortcut(torch.eye(d).repeat(n, 1, 1), torch.zeros(n, d))
    for lens, name in ((None, "logit lens"), (shortcut, "linear shortcut")):
        result = lens_of(res, adapter(model), lens=lens)
        page = result._repr_html_()
        caption = page[: page.index("<table")]
        assert f"{name} of GPT2LMHeadModel" in caption and result.model_name == "GPT2LMHeadModel"
        assert "top-1 token" in caption and "embedding" in caption
