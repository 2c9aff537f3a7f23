"""reslens.attribution (direct logit attribution) against the model's own logits, on every family."""

from __future__ import annotations

import dataclasses
import sys

import matplotlib
import pytest
import torch

from helpers import FAMILIES, VOCAB, make_family, make_model
from reslens import Batch, attribution, heads
from reslens.arch import GPT2, Norm, adapter
from reslens.attribution import ATTRIBUTION_SITES, LogitAttribution, logit_attribution, logit_attribution_of
from reslens.hooks import capture

matplotlib.use("Agg")


def _model_logit(model, ids, target, against=None, position=-1, **kwargs):
    """The model's own logit (difference); under a final-logit soft-cap (Gemma 2) the one before the cap.

    That one is HuggingFace's LM head applied to the body's output (its final norm included); the test
    checks that capping it gives the model's logits, so the reference is the model's computation.
    """
    with torch.no_grad():
        logits = model(ids, **kwargs).logits[:, position]
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            raw = model.lm_head(model.model(ids, **kwargs).last_hidden_state)[:, position]
            torch.testing.assert_close(cap * torch.tanh(raw / cap), logits, atol=1e-6, rtol=1e-6)
            logits = raw
    rows = torch.arange(len(ids))
    out = logits[rows, torch.as_tensor(target).expand(len(ids))]
    return out if against is None else out - logits[rows, torch.as_tensor(against).expand(len(ids))]


def test_public_paths():
    import reslens

    assert reslens.attribution.logit_attribution is logit_attribution is attribution.logit_attribution
    assert attribution.LogitAttribution is LogitAttribution
    assert attribution.logit_attribution_of is logit_attribution_of
    # one home: reslens.heads does not re-export attribution (which reads heads, a floor below)
    names = ("LogitAttribution", "logit_attribution", "logit_attribution_of")
    assert not any(hasattr(heads, name) for name in names)


@pytest.mark.parametrize("against", [None, 11])
def test_logit_attribution_sums_to_the_model_logit(model, ids, against):
    dla = logit_attribution(model, ids, target=[3, 4, 5], against=against)
    expected = _model_logit(model, ids, [3, 4, 5], against)
    torch.testing.assert_close(dla.sum(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dla.logit, expected, atol=2e-5, rtol=1e-5)
    assert len(dla.labels) == 3 + 3 * 6 and dla.labels[-1] == "norm_bias" and dla.heads().shape == (3, 3, 4)
    assert dla.labels[:7] == ("embed", "pos_embed", "0.0", "0.1", "0.2", "0.3", "attn_bias 0")
    assert dla.labels[7] == "mlp 0"


def test_pieces_are_typed_and_labels_are_derived(model, ids):
    dla = logit_attribution(model, ids, target=3)
    assert dla.kind[:2] == ("embed", "pos_embed") and dla.kind[-1] == "norm_bias"
    assert dla.layer.dtype == torch.long and dla.head.dtype == torch.long
    for kind, layer, head, label in zip(dla.kind, dla.layer.tolist(), dla.head.tolist(), dla.labels):
        assert (layer >= 0) == (kind in ("head", "attn_bias", "mlp")) and (head >= 0) == (kind == "head")
        assert label == (f"{layer}.{head}" if kind == "head" else f"{kind} {layer}" if layer >= 0 else kind)
    is_head = torch.tensor([k == "head" for k in dla.kind])
    assert torch.equal(dla.heads().flatten(1), dla.contributions[:, is_head])
    with pytest.raises(ValueError, match="inconsistent"):
        dataclasses.replace(dla, layer=dla.layer.clone().fill_(-1))
    with pytest.raises(ValueError, match="unknown piece kinds"):
        dataclasses.replace(dla, kind=("ln_f bias",) + dla.kind[1:])


@pytest.mark.parametrize("left", [False, True])
def test_logit_attribution_with_padding_and_a_position(model, left):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, VOCAB, (8,), generator=gen), torch.randint(0, VOCAB, (5,), generator=gen)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    ids[0], mask[0] = a, True
    span = slice(3, 8) if left else slice(0, 5)
    ids[1, span], mask[1, span] = b, True
    batch = Batch(ids, mask)
    dla = logit_attribution(model, batch, target=7)
    alone = logit_attribution(model, b[None], target=7)
    torch.testing.assert_close(dla.contributions[1], alone.contributions[0], atol=1e-5, rtol=1e-5)
    assert dla.position.tolist() == ([7, 7] if left else [7, 4])  # None: each sequence's last real token
    at_4 = logit_attribution(model, batch, target=7, position=4)
    expected = _model_logit(model, ids, 7, position=4, attention_mask=mask.long(),
                            position_ids=batch.position_ids)
    torch.testing.assert_close(at_4.sum(), expected, atol=2e-5, rtol=1e-5)
    assert at_4.position.tolist() == [4, 4]
    negative = logit_attribution(model, batch, target=7, position=-4)
    assert torch.equal(negative.contributions, at_4.contributions)
    padded = 1 if left else 6
    with pytest.raises(ValueError, match=f"position={padded} is a padding position in sequence"):
        logit_attribution(model, batch, target=7, position=padded)


def test_logit_attribution_pieces_are_the_components(model, ids):
    """Head pieces sum (with the bias) to the attention output's piece; MLP pieces match mlp_out."""
    arch = adapter(model)
    dla = logit_attribution(model, ids, target=2)
    res = capture(model, ids, sites=("resid", "attn_out", "mlp_out"))
    x = res.resid[-1][:, -1]
    sigma = (x.var(-1, unbiased=False) + 1e-5).sqrt()
    u = arch.norm("final").weight * arch.W_U[2]
    u = u - u.mean()
    labels = list(dla.labels)
    with torch.no_grad():
        for layer in range(3):
            attn = (res.attn_out[layer, :, -1] @ u) / sigma
            cols = [labels.index(f"{layer}.{h}") for h in range(4)] + [labels.index(f"attn_bias {layer}")]
            torch.testing.assert_close(dla.contributions[:, cols].sum(-1), attn, atol=1e-5, rtol=1e-5)
            mlp = (res.mlp_out[layer, :, -1] @ u) / sigma
            piece = dla.contributions[:, labels.index(f"mlp {layer}")]
            torch.testing.assert_close(piece, mlp, atol=1e-5, rtol=1e-5)


def test_logit_attribution_on_a_base_model(base_model, ids):
    dla = logit_attribution(base_model, ids, target=1)
    with torch.no_grad():
        final = base_model(ids).last_hidden_state[:, -1]
    torch.testing.assert_close(dla.sum(), final @ adapter(base_model).W_E[1], atol=2e-5, rtol=1e-5)


def test_components_come_from_the_adapter_on_every_family(family_model, ids):
    """No pos_embed under rotary, no attn_bias without b_O, no norm_bias under RMSNorm: still exact."""
    arch = adapter(family_model)
    dla = logit_attribution(family_model, ids, target=[3, 4, 5], against=7)
    expected = _model_logit(family_model, ids, [3, 4, 5], 7)
    torch.testing.assert_close(dla.sum(), expected, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(dla.logit, expected, atol=3e-5, rtol=1e-5)
    kinds = set(dla.kind)
    assert ("pos_embed" in kinds) == (arch.W_pos is not None)
    assert ("attn_bias" in kinds) == (arch.b_O(0) is not None)
    assert ("norm_bias" in kinds) == (arch.norm("final").bias is not None)
    assert dla.heads().shape == (3, arch.n_layer, arch.n_head)
    # rotary: no position piece; RMSNorm: no norm bias; no o_proj bias except GPT-2's and NeoX's dense
    has_bias = arch.b_O(0) is not None
    n_global = len(arch.embedding_components(ids[:, -1], torch.zeros_like(ids[:, -1])))
    n_global += (arch.norm("final").bias is not None) + (arch.b_U is not None)
    assert len(dla.kind) == n_global + arch.n_layer * (arch.n_head + has_bias + 1)
    if arch.family != "gpt2":
        assert {"embed", "head", "mlp"} <= kinds <= {"embed", "head", "mlp", "attn_bias", "norm_bias"}
    tied = arch.W_U.data_ptr() == arch.W_E.data_ptr()
    assert tied == family_model.config.tie_word_embeddings  # Llama, Mistral, NeoX, ...: untied heads


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_attribution_on_the_bare_body_of_every_family(family, ids):
    """A tied body unembeds with W_E (pieces sum to final-norm output @ W_E); an untied one is refused."""
    body = make_family(family, bare=True)
    if not body.config.tie_word_embeddings:
        with pytest.raises(ValueError, match="not tied to its embedding"):
            logit_attribution(body, ids, target=[3, 4, 5], against=8)
        return
    dla = logit_attribution(body, ids, target=[3, 4, 5], against=8)
    with torch.no_grad():
        final = body(ids).last_hidden_state[:, -1]
    w_e = adapter(body).W_E
    torch.testing.assert_close(dla.sum(), (final * (w_e[[3, 4, 5]] - w_e[8])).sum(-1), atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(dla.logit, dla.sum(), atol=3e-5, rtol=1e-5)


def test_logit_attribution_after_a_bos_and_padding_on_every_family(family_model):
    """A Llama-family batch as tokenize builds it (BOS marked special, left padding): exact at the end."""
    ids = torch.tensor([[1, 5, 9, 14, 20, 7], [0, 0, 1, 33, 40, 41]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    special = torch.zeros_like(mask)
    special[0, 0], special[1, 2] = True, True
    batch = Batch(ids, mask, special_mask=special)
    dla = logit_attribution(family_model, batch, target=12, against=13)
    expected = _model_logit(family_model, ids, 12, 13, attention_mask=mask.long(),
                            position_ids=batch.position_ids)
    torch.testing.assert_close(dla.sum(), expected, atol=3e-5, rtol=1e-5)
    alone = logit_attribution(family_model, ids[1:, 2:], target=12, against=13)
    torch.testing.assert_close(dla.contributions[1], alone.contributions[0], atol=2e-5, rtol=1e-5)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _NoBiases(GPT2):
    """GPT-2 whose attention output bias and final-norm bias are declared absent (they are zeroed)."""

    def b_O(self, layer):
        return None

    def norm(self, which, layer=None):
        norm = super().norm(which, layer)
        return Norm(norm.weight, None, norm.eps, norm.centred) if which == "final" else norm


def test_absent_biases_are_not_pieces(ids):
    model = make_model()
    with torch.no_grad():
        for layer in range(3):
            adapter(model).attn_out_proj(layer).bias.zero_()
        adapter(model).final_norm_module.bias.zero_()
    dla = logit_attribution(_NoBiases(model), ids, target=4)
    assert set(dla.kind) == {"embed", "pos_embed", "head", "mlp"} and len(dla.kind) == 2 + 3 * 5
    torch.testing.assert_close(dla.sum(), _model_logit(model, ids, 4), atol=2e-5, rtol=1e-5)


def test_unembed_bias_is_its_own_piece(ids):
    model = make_model()
    head = adapter(model).lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.normal_()
    dla = logit_attribution(model, ids, target=4, against=9)
    assert dla.kind[-2:] == ("norm_bias", "unembed_bias")
    bias = model.lm_head.bias
    torch.testing.assert_close(dla.contributions[:, -1], (bias[4] - bias[9]).expand(3))
    torch.testing.assert_close(dla.sum(), _model_logit(model, ids, 4, 9), atol=2e-5, rtol=1e-5)


def test_pure_form_reads_one_capture(model, ids):
    """Capture once (the union of sites), then attribution and head scores with no further forward."""
    res = capture(model, ids, sites=(*ATTRIBUTION_SITES, "attn_pattern"), dtype=torch.float32)
    pure = logit_attribution_of(res, model, target=[3, 4, 5], against=11)
    wrapped = logit_attribution(model, ids, target=[3, 4, 5], against=11)
    for f in dataclasses.fields(pure):
        a, b = getattr(pure, f.name), getattr(wrapped, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    previous = heads.previous_token_scores(model, ids).scores
    assert torch.equal(heads.previous_token_scores_of(res).scores, previous)


def test_pure_form_refuses_residuals_it_cannot_use(model, ids):
    with pytest.raises(ValueError, match="needs the site.*mlp_out"):
        logit_attribution_of(capture(model, ids, sites=("resid", "attn_z", "logits")), model, 1)
    with pytest.raises(ValueError, match="every block"):
        logit_attribution_of(capture(model, ids, sites=ATTRIBUTION_SITES, layers=[0, 1]), model, 1)
    with pytest.raises(ValueError, match="another model"):
        logit_attribution_of(capture(model, ids, sites=ATTRIBUTION_SITES), make_model(n_embd=16, n_head=2), 1)
    with pytest.raises(TypeError, match="Residuals"):
        logit_attribution_of(ids, model, 1)


def test_logit_attribution_outputs_and_errors(model, ids):
    dla = logit_attribution(model, ids, target=3)
    assert len(dla.top(4)) == 4
    assert abs(dla.top(1)[0][1]) == pytest.approx(float(dla.contributions[0].abs().max()))
    frame = dla.to_frame()
    assert len(frame) == 3 * len(dla.labels)
    assert set(frame["kind"]) == {"embed", "pos_embed", "head", "attn_bias", "mlp", "norm_bias"}
    assert list(frame.columns) == ["seq", "label", "kind", "layer", "head", "contribution"]
    row = frame[(frame.seq == 2) & (frame.label == "1.3")]
    assert float(row.contribution.iloc[0]) == pytest.approx(float(dla.heads()[2, 1, 3]))
    assert "sum of pieces" in dla.table() and dla.plot().axes
    assert "tensor(" not in repr(dla) and "<table" in dla._repr_html_()
    for call, error, match in [
        (lambda: logit_attribution(model, ids, target=VOCAB), ValueError, "target=97 is out of range"),
        (lambda: logit_attribution(model, ids, target=[1, 2]), ValueError, "one token or 3 .one per"),
        (lambda: logit_attribution(model, ids, target=[1, 2, 2.5]), TypeError, r"target\[2\] must be a"),
        (lambda: logit_attribution(model, ids, target="the"), TypeError, "tokenizer= is required"),
        (lambda: logit_attribution(model, ids, target=2.0), TypeError, "target must be a token id"),
        (lambda: logit_attribution(model, ids, target=torch.tensor([2.0])), TypeError, "integer token ids"),
        (lambda: logit_attribution(model, ids, target=True), TypeError, r"got True \(bool\)"),
        (lambda: logit_attribution(model, ids, target=2, position=11), ValueError, "position=11 is out of"),
        (lambda: logit_attribution(model, ids, target=2, position=1.0), TypeError, "position must be an int"),
        (lambda: dla.top(0), ValueError, "k=0 is out of range"),
        (lambda: dla.table(seq=3), ValueError, "seq=3 is out of range"),
    ]:
        with pytest.raises(error, match=match):
            call()


def test_to_frame_without_pandas_names_the_extra(model, ids, monkeypatch):
    dla = logit_attribution(model, ids, target=3)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r'pip install "reslens\[frame\]"'):
        dla.to_frame()


def test_bars_on_given_axes_draw_what_a_new_figure_draws(model, ids):
    import matplotlib.pyplot as plt

    from reslens.plot import plot_logit_attribution_bars

    dla = logit_attribution(model, ids, target=3)
    own = plot_logit_attribution_bars(dla, 1).axes[0]
    _, ax = plt.subplots()
    given = plot_logit_attribution_bars(dla, 1, ax=ax).axes[0]
    heights = [[p.get_height() for p in a.patches] for a in (own, given)]
    assert heights[0] == heights[1] == pytest.approx(dla.contributions[1].tolist())
    assert [t.get_text() for t in own.get_xticklabels()] == [t.get_text() for t in given.get_xticklabels()]


def test_results_round_trip_through_safetensors(model, ids, tmp_path):
    results = [logit_attribution(model, ids, target=2, against=3), logit_attribution(model, ids, target=2)]
    for i, dla in enumerate(results):
        path = tmp_path / f"dla{i}.safetensors"
        dla.save(path)
        back = LogitAttribution.load(path)
        for f in dataclasses.fields(dla):
            a, b = getattr(dla, f.name), getattr(back, f.name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
        assert back.labels == dla.labels and isinstance(back.kind, tuple)


def test_kinds_are_documented():
    kinds = ("embed", "pos_embed", "head", "attn_bias", "mlp", "norm_bias", "unembed_bias")
    assert attribution.PIECE_KINDS == kinds
