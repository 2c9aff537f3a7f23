"""kv_memory memories and neurons: exact decompositions against HuggingFace, positions, value
tokens, deletion neurons, coefficient edits, typed and saveable results."""

import sys

import pytest
import torch

from helpers import assert_same_state, hook_counts, make_family, make_model, model_state

import reslens
from reslens import kv_memory as kv
from reslens._inputs import pad_ids
from reslens.arch import GPT2, MLPWeights
from reslens.hooks import capture


@pytest.fixture
def acts(model, ids):
    return capture(model, ids, sites=("resid", "resid_mid", "mlp_act", "mlp_out", "logits"))


def test_public_names_of_today_still_import():
    from reslens.kv_memory import (  # noqa: F401
        UNITS, DeletionNeurons, KeyValueAgreement, MemoryContributions, TriggerIndex, ValueTokens, agreement,
        coefficients, contributions, deletion_neurons, edit_coefficients, keys, mine_triggers, value_tokens,
        values,
    )

    assert callable(kv.contributions) and kv.UNITS == ("sentence", "window")


@pytest.mark.parametrize(
    "sites, other, what",
    [  # the acts come from a 3-layer model, d_model 32, d_mlp 128
        (("mlp_act", "resid"), dict(n_layer=2), r"deepest resid layer is 3, where .* at most 2"),
        (("mlp_act",), dict(n_layer=2), r"deepest block is 2, where this 2-layer model .* at most 1"),
        (("mlp_act",), dict(n_inner=64), r"mlp_act width \(d_mlp\) is 128, .* has 64"),
        (("mlp_act", "resid"), dict(n_embd=16, n_head=2, n_inner=128),
         r"resid width \(d_model\) is 32, .* has 16"),
    ],
)
def test_contributions_of_residuals_from_another_model_is_refused(ids, sites, other, what):
    """Residuals record their model's sizes; another model's are named, not read as this one's (the first
    two were read silently, the others failed on a matrix product or not at all)."""
    acts = capture(make_model(), ids, sites=sites)
    with pytest.raises(ValueError, match=f"residuals were captured from another model: their {what}"):
        kv.contributions_of(acts, make_model(seed=1, **other), 1)


def test_contributions_captures_then_calls_the_pure_form(model, ids, acts):
    """``contributions(model, inputs, ...)`` is ``contributions_of(capture(...), model, ...)``, exactly, and
    captures only what it needs (the forward stops after the block unless the final norm is read)."""
    for kwargs in (dict(), dict(token=5), dict(token=5, through_final_norm=True), dict(position=3, seq=2)):
        wrapped = kv.contributions(model, ids, 1, **kwargs)
        pure = kv.contributions_of(acts, model, 1, **kwargs)
        for name in ("coefficients", "magnitude", "order", "bias"):
            assert torch.equal(getattr(wrapped, name), getattr(pure, name)), (kwargs, name)
        assert (wrapped.position, wrapped.seq, wrapped.token) == (pure.position, pure.seq, pure.token)
    with pytest.raises(TypeError, match=r"call contributions_of\(residuals, arch, layer\)"):
        kv.contributions(model, acts, 1)  # the former argument order: residuals go to the pure form
    with pytest.raises(ValueError, match="position=11 is out of range"):
        kv.contributions(model, ids, 1, position=11)


def test_keys_and_values_are_the_conv1d_columns_and_rows(model):
    for layer in range(3):
        mlp = model.transformer.h[layer].mlp
        assert torch.equal(kv.keys(model, layer)[7], mlp.c_fc.weight[:, 7])
        assert torch.equal(kv.values(model, layer)[7], mlp.c_proj.weight[7])
        assert kv.keys(model, layer).shape == kv.values(model, layer).shape == (128, 32)
    assert torch.equal(kv.keys(GPT2(model), -1), kv.keys(model, 2))  # an adapter is accepted too


def test_coefficients_come_from_the_keys(model, acts):
    """m = gelu(ln_2(resid_mid) @ keys.T + b): the accessor's orientation reproduces HF's activation."""
    from transformers.activations import ACT2FN

    for layer in range(3):
        block = model.transformer.h[layer]
        pre = block.ln_2(acts.resid_mid[layer]) @ kv.keys(model, layer).T + block.mlp.c_fc.bias
        torch.testing.assert_close(ACT2FN["gelu_new"](pre), kv.coefficients(acts, layer), rtol=0, atol=1e-5)


def test_memories_sum_to_mlp_out(model, acts):
    for layer in range(3):
        bias = model.transformer.h[layer].mlp.c_proj.bias
        out = kv.coefficients(acts, layer) @ kv.values(model, layer) + bias
        torch.testing.assert_close(out, acts.mlp_out[layer], rtol=0, atol=1e-5)
        c = kv.contributions_of(acts, model, layer, position=4, seq=1)
        torch.testing.assert_close(c.updates.sum(0) + c.bias, acts.mlp_out[layer, 1, 4], rtol=0, atol=1e-5)
        torch.testing.assert_close(c.total(), acts.mlp_out[layer, 1, 4], rtol=0, atol=1e-5)


class NoOutputBias(GPT2):
    """An adapter whose MLP reports no output bias (as Llama's): b_out is None."""

    def mlp_weights(self, layer):
        w = super().mlp_weights(layer)
        return MLPWeights(w.W_in, w.b_in, w.W_gate, w.b_gate, w.W_out, None, w.act)


def test_a_missing_output_bias_is_zeros_and_the_sum_stays_exact(ids):
    model = make_model()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.bias.zero_()
    arch = NoOutputBias(model)
    acts = capture(model, ids, sites=("mlp_act", "mlp_out"))
    c = kv.contributions_of(acts, arch, 1, position=3, seq=2)
    assert torch.equal(c.bias, torch.zeros(32))
    torch.testing.assert_close(c.total(), acts.mlp_out[1, 2, 3], rtol=0, atol=1e-5)


def test_magnitude_ranking_equals_brute_force(model, acts):
    c = kv.contributions_of(acts, model, 2, position=-1, seq=2)
    m = acts.mlp_act[2, 2, -1]
    v = model.transformer.h[2].mlp.c_proj.weight.detach()
    brute = [(abs(float(m[i])) * float(v[i].norm()), i) for i in range(128)]
    expected = [i for _, i in sorted(brute, key=lambda t: -t[0])]
    assert c.order.tolist()[:20] == expected[:20]
    top = c.top(3)
    assert isinstance(top[0], kv.Memory) and top[0].neuron == expected[0] and top[0].layer == 2
    assert top[0].coefficient == pytest.approx(float(m[expected[0]]))
    assert top[0].score == pytest.approx(brute[expected[0]][0], rel=1e-5)
    assert c.rank_by == "magnitude" and c.token_effect is None


def test_token_ranking_raw_and_through_the_final_norm(model, acts):
    token = 17
    c = kv.contributions_of(acts, model, 1, position=-1, seq=0, token=token)
    m, v, e = acts.mlp_act[1, 0, -1], model.transformer.h[1].mlp.c_proj.weight, model.lm_head.weight[token]
    brute = torch.stack([m[i] * (v[i] @ e) for i in range(128)])
    torch.testing.assert_close(c.token_effect, brute, rtol=0, atol=1e-6)
    assert c.order.tolist() == torch.sort(brute, descending=True, stable=True).indices.tolist()

    lin = kv.contributions_of(acts, model, 1, position=-1, seq=0, token=token, through_final_norm=True)
    assert lin.through_final_norm
    x = acts.resid[3, 0, -1]  # the final raw residual at that position
    ln = model.transformer.ln_f
    sigma = torch.sqrt(x.var(unbiased=False) + ln.eps)
    update = acts.mlp_out[1, 0, -1] - model.transformer.h[1].mlp.c_proj.bias
    expected = (ln.weight * (update - update.mean()) / sigma) @ e  # the final norm with its scale frozen here
    torch.testing.assert_close(lin.token_effect.sum(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(lin.token_effect, c.token_effect)


def test_position_indexes_the_padded_axis_of_a_left_padded_batch(model):
    """reslens's one meaning: the padded pos axis (negatives from its end), None = last real token."""
    batch = pad_ids([[5, 6, 7, 8, 9], [10, 11]], padding_side="left")
    acts = capture(model, batch, sites=("mlp_act", "mlp_out"))
    alone = capture(model, torch.tensor([[10, 11]]), sites=("mlp_act", "mlp_out"))
    last = kv.contributions_of(acts, model, 0, seq=1)  # None: the last real token
    assert last.position == 4
    torch.testing.assert_close(last.total(), alone.mlp_out[0, 0, -1], rtol=0, atol=1e-5)
    assert kv.contributions_of(acts, model, 0, position=-1, seq=1).position == 4
    first = kv.contributions_of(acts, model, 0, position=3, seq=1)  # index 3 of the padded axis, not token 3
    assert first.position == 3
    torch.testing.assert_close(first.total(), alone.mlp_out[0, 0, 0], rtol=0, atol=1e-5)
    assert kv.contributions_of(acts, model, 0, position=-5, seq=0).position == 0
    with pytest.raises(ValueError, match="padding position of sequence seq=1"):
        kv.contributions_of(acts, model, 0, position=0, seq=1)  # the old meaning (1st real token): padding
    with pytest.raises(ValueError, match="out of range"):
        kv.contributions_of(acts, model, 0, position=5, seq=1)


def test_position_none_in_a_right_padded_batch_is_each_sequences_last_token(model):
    batch = pad_ids([[5, 6, 7, 8, 9], [10, 11]], padding_side="right")
    acts = capture(model, batch, sites=("mlp_act",))
    assert kv.contributions_of(acts, model, 0, seq=1).position == 1
    assert kv.contributions_of(acts, model, 0, seq=0).position == 4
    with pytest.raises(ValueError, match="padding position"):
        kv.contributions_of(acts, model, 0, position=-1, seq=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layer=3), ValueError, "out of range"),
        (dict(layer=1, position=11), ValueError, "position=11 is out of range"),
        (dict(layer=1, position=1.0), TypeError, "position must be an int"),
        (dict(layer=1, seq=3), ValueError, "seq=3"),
        (dict(layer=1, seq=True), TypeError, "seq must be an int"),
        (dict(layer=1, token=97), ValueError, "token=97 is out of range"),
        (dict(layer=1, token=3.0), TypeError, "token must be a token id"),
        (dict(layer=1, token=" the"), TypeError, "tokenizer= is required"),
        (dict(layer=1, rank_by="token"), ValueError, "needs token="),
        (dict(layer=1, rank_by="size"), ValueError, "rank_by"),
        (dict(layer=1, token=3, through_final_norm=1), TypeError, "through_final_norm"),
        (dict(layer="1"), TypeError, "layer"),
    ],
)
def test_contributions_bad_input(model, acts, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.contributions_of(acts, model, **kwargs)


def test_through_final_norm_needs_the_final_residual(model, ids):
    acts = capture(model, ids, sites=("mlp_act",))
    with pytest.raises(ValueError, match="final raw residual"):
        kv.contributions_of(acts, model, 0, token=3, through_final_norm=True)
    with pytest.raises(ValueError, match="no 'mlp_act'"):
        kv.coefficients(capture(model, ids, sites="resid"), 0)
    with pytest.raises(TypeError, match="through_ln_f"):  # the old name is gone
        kv.contributions_of(acts, model, 0, token=3, through_ln_f=True)


def test_results_are_saveable_and_print_short(model, acts, tmp_path):
    c = kv.contributions_of(acts, model, 1, position=2, seq=1, token=5, through_final_norm=True)
    c.save(tmp_path / "c.safetensors")
    back = kv.MemoryContributions.load(tmp_path / "c.safetensors")
    assert torch.equal(back.token_effect, c.token_effect) and back.through_final_norm and back.token == 5
    assert back.top(3) == c.top(3)
    assert "MemoryContributions(block 1" in repr(c) and len(repr(c)) < 200 and "<table>" in c._repr_html_()

    vt = kv.value_tokens(model, 2, [3, 0], k=4, tokenizer=CharDecoder())
    vt.save(tmp_path / "vt.safetensors")
    back = kv.ValueTokens.load(tmp_path / "vt.safetensors")
    assert torch.equal(back.top_ids, vt.top_ids) and back.token_strings == vt.token_strings
    assert back.tokens(3) == vt.tokens(3) and "<table>" in vt._repr_html_()

    d = kv.deletion_neurons(model)
    d.save(tmp_path / "d.safetensors")
    back = kv.DeletionNeurons.load(tmp_path / "d.safetensors")
    assert torch.equal(back.cos, d.cos) and back.cos_gate is None and not back.centred
    assert len(repr(d)) < 200 and "<table>" in d._repr_html_()


def test_to_frame_without_pandas_names_the_extra(model, acts, monkeypatch):
    c = kv.contributions_of(acts, model, 1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r'pip install "reslens\[frame\]"'):
        c.to_frame()
    with pytest.raises(ImportError, match="reslens"):
        kv.deletion_neurons(model).to_frame()


class CharDecoder:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("through_final_norm", [False, True])
def test_value_tokens_equal_brute_force(model, through_final_norm):
    vt = kv.value_tokens(model, 2, [3, 0, 127], k=5, through_final_norm=through_final_norm, chunk_size=2)
    v = model.transformer.h[2].mlp.c_proj.weight[[3, 0, 127]]
    if through_final_norm:
        v = model.transformer.ln_f(v)
    scores = v @ model.lm_head.weight.T
    assert torch.equal(vt.top_ids, scores.topk(5).indices)
    assert torch.equal(vt.bottom_ids, scores.topk(5, largest=False).indices)
    torch.testing.assert_close(vt.top_scores, scores.topk(5).values)
    assert vt.convention == ("W_U final_norm(v)" if through_final_norm else "W_U v")
    assert len(vt.to_frame()) == 3 * 2 * 5


@pytest.mark.parametrize(
    "neurons, kwargs, error, match",
    [
        ([128], {}, ValueError, "out of range"),
        (1.5, {}, TypeError, "neurons must be an int"),
        (True, {}, TypeError, "neurons must be an int"),
        ([1, True], {}, TypeError, r"neurons\[1\] must be an int"),
        ([1.0, 2.0], {}, TypeError, r"neurons\[0\] must be an int"),
        (torch.tensor([1.0]), {}, TypeError, "dtype torch.float32"),
        (torch.tensor([True]), {}, TypeError, "dtype torch.bool"),
        ("3", {}, TypeError, "neurons must be"),
        ([], {}, ValueError, "empty"),
        ([1], {"chunk_size": 0}, ValueError, "chunk_size=0 is out of range"),
        ([1], {"k": 0}, ValueError, "k=0 is out of range"),
    ],
)
def test_value_tokens_bad_input(model, neurons, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.value_tokens(model, 2, neurons, **kwargs)


def test_deletion_neurons(model):
    before = kv.deletion_neurons(model)
    k, g = model.transformer.h[0].mlp.c_fc.weight[:, 5], model.transformer.h[0].ln_2.weight
    v = model.transformer.h[0].mlp.c_proj.weight[5]
    torch.testing.assert_close(before.cos[0, 5], torch.nn.functional.cosine_similarity(k * g, v, dim=0))
    edited = make_model()
    with torch.no_grad():
        edited.transformer.h[2].mlp.c_proj.weight[9] = -3 * k * g
        edited.transformer.h[2].mlp.c_fc.weight[:, 9] = k
    result = kv.deletion_neurons(edited)
    assert result.most_negative(1) == [(2, 9, pytest.approx(-1.0, abs=1e-5))]
    assert result.most_negative(1, layer=0)[0][0] == 0
    assert result.cos.shape == (3, 128) and len(result.to_frame()) == 3 * 128
    assert "L2N9" in result.table()


def test_deletion_neurons_centred_is_an_explicit_opt_in(model):
    plain, centred = kv.deletion_neurons(model), kv.deletion_neurons(model, centred=True)
    k, g = model.transformer.h[1].mlp.c_fc.weight[:, 3], model.transformer.h[1].ln_2.weight
    reads = k * g - (k * g).mean()
    v = model.transformer.h[1].mlp.c_proj.weight[3]
    torch.testing.assert_close(centred.cos[1, 3], torch.nn.functional.cosine_similarity(reads, v, dim=0))
    assert centred.centred and not plain.centred and not torch.equal(plain.cos, centred.cos)
    assert "centre" in centred.direction and "centre" not in plain.direction
    with pytest.raises(TypeError, match="centred"):
        kv.deletion_neurons(model, centred="yes")


# --- coefficient edits ----------------------------------------------------------------------------


def test_edit_moves_mlp_out_by_delta_times_value(model, ids):
    clean = capture(model, ids, sites=("mlp_act", "mlp_out"))
    before = model_state(model)
    with kv.edit_coefficients(model, {1: {4: 2.0, 9: None}}):
        edited = capture(model, ids, sites=("mlp_act", "mlp_out"))
    v = model.transformer.h[1].mlp.c_proj.weight
    m = clean.mlp_act[1]
    delta = (2.0 - m[..., 4])[..., None] * v[4] + (0.0 - m[..., 9])[..., None] * v[9]
    torch.testing.assert_close(edited.mlp_out[1], clean.mlp_out[1] + delta, rtol=0, atol=1e-5)
    assert torch.equal(edited.mlp_out[0], clean.mlp_out[0])
    assert hook_counts(model) == {}
    assert_same_state(before, model_state(model))


def test_edit_at_chosen_positions(model, ids):
    clean = capture(model, ids, sites="mlp_act")
    with kv.edit_coefficients(model, {0: {3: 7.0}}, positions=[2, -1]):
        edited = capture(model, ids, sites="mlp_act", layers=[0])
    assert edited.mlp_act[0, :, [2, 10], 3].eq(7.0).all()
    assert torch.equal(edited.mlp_act[0, :, :2], clean.mlp_act[0, :, :2])


@pytest.mark.parametrize(
    "edits, kwargs, error, match",
    [
        ({}, {}, TypeError, "non-empty mapping"),
        ({3: {0: 1.0}}, {}, ValueError, "out of range"),
        ({0: {128: 1.0}}, {}, ValueError, "out of range"),
        ({0: {True: 1.0}}, {}, TypeError, "neurons"),
        ({0: {1.0: 1.0}}, {}, TypeError, "neurons"),
        ({0: {1: "big"}}, {}, TypeError, "number, or None"),
        ({0: {1: float("nan")}}, {}, ValueError, "must be finite"),
        ({0: [1]}, {}, TypeError, "mapping"),
        ({0: {1: 1.0}}, {"positions": [1.5]}, TypeError, "positions"),
        ({0: {1: 1.0}}, {"positions": True}, TypeError, "positions"),
        ({0: {1: 1.0}}, {"positions": []}, ValueError, "empty"),
    ],
)
def test_edit_bad_input(model, edits, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.edit_coefficients(model, edits, **kwargs)
    assert hook_counts(model) == {}


def test_edit_removes_hooks_on_exceptions(model, ids):
    with pytest.raises(RuntimeError, match="inside"):
        with kv.edit_coefficients(model, {0: {1: None}}):
            raise RuntimeError("inside")
    assert hook_counts(model) == {}


# --- every family, through the adapter -------------------------------------------------------------


def test_memories_are_exact_in_every_family(family_model, ids):
    """Σ m_i v_i + b_out == mlp_out (b_out zeros where the MLP has none), value tokens through the
    family's own final norm, and deletion cosines of the up (and gate) keys."""
    from reslens.arch import adapter

    arch = adapter(family_model)
    acts = capture(arch, ids, sites=("mlp_act", "mlp_out", "resid"))
    for layer in range(arch.n_layer):
        c = kv.contributions_of(acts, arch, layer, position=5, seq=1, token=7, through_final_norm=True)
        torch.testing.assert_close(c.total(), acts.mlp_out[layer, 1, 5], rtol=0, atol=1e-5)
        w = arch.mlp_weights(layer)
        assert torch.equal(kv.values(arch, layer), w.W_out) and torch.equal(kv.keys(arch, layer), w.W_in)
        norm = arch.norm("final")
        x = acts.resid[arch.n_layer, 1, 5].float()
        update = acts.mlp_out[layer, 1, 5].float() - c.bias  # the memories' part of mlp_out, as captured
        expected = (norm.gamma * norm.centre(update) / norm.scale(x)) @ arch.W_U[7].float()
        torch.testing.assert_close(c.token_effect.sum(), expected, rtol=0, atol=1e-4)
    # A value is read as the direction it writes: what contributions_of gives per unit coefficient at a
    # position (v_i, or under an MLP output norm, Gemma 2/3 and OLMo 2, v_i ⊙ γ_out / σ there) up to its
    # positive per-position scale, so raw vocabulary rankings are those of the memory's actual piece.
    wrote = kv.contributions_of(acts, arch, 1, position=5, seq=1).values  # [d_mlp, d_model]
    directions = kv.value_directions(arch, 1)
    cos = torch.nn.functional.cosine_similarity(directions, wrote, dim=-1)
    torch.testing.assert_close(cos, torch.ones(arch.d_mlp), rtol=0, atol=1e-5)
    raw = kv.value_tokens(arch, 1, [0, 5], k=3)
    assert torch.equal(raw.top_ids, (wrote[[0, 5]] @ arch.W_U.float().T).topk(3).indices)
    vt = kv.value_tokens(arch, 1, [0, 5], k=3, through_final_norm=True)
    scores = arch.norm("final")(directions[[0, 5]]) @ arch.W_U.float().T
    assert torch.equal(vt.top_ids, scores.topk(3).indices)
    folded = arch.out_norm("mlp", 1) is not None
    assert (raw.convention, vt.convention) == (
        ("W_U (γ_out ⊙ v)", "W_U final_norm(γ_out ⊙ v)") if folded else ("W_U v", "W_U final_norm(v)"))
    d = kv.deletion_neurons(arch)
    assert d.cos.shape == (arch.n_layer, arch.d_mlp)
    assert (d.cos_gate is not None) == arch.gated_mlp
    reads = arch.mlp_weights(1).W_in.float() * arch.norm("mlp", 1).gamma  # the residual direction a key reads
    expected = torch.nn.functional.cosine_similarity(reads, wrote, dim=-1)
    torch.testing.assert_close(d.cos[1], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mixtral", "olmoe", "qwen3_moe"])
def test_a_routed_memory_is_labelled_by_its_expert_and_neuron(family, ids, tmp_path):
    """Memory i of a mixture of experts is neuron i % d_expert of expert i // d_expert: 'L1 E2 N5'."""
    from helpers import make_family
    from reslens.arch import adapter

    arch = adapter(make_family(family))
    acts = capture(arch, ids, sites=("mlp_act", "mlp_out"))
    c = kv.contributions_of(acts, arch, 1, position=5, seq=1)
    torch.testing.assert_close(c.total(), acts.mlp_out[1, 1, 5], rtol=0, atol=1e-5)
    n_expert = arch.mlp_weights(1).n_expert
    d_expert = arch.d_mlp // n_expert
    assert (n_expert > 1) == (family != "llama")

    def label(layer, i):
        return f"L{layer} E{i // d_expert} N{i % d_expert}" if n_expert > 1 else f"L{layer}N{i}"

    top = c.top(3)
    assert [m.label for m in top] == [label(1, m.neuron) for m in top]
    assert top[0].expert == (top[0].neuron // d_expert if n_expert > 1 else None)
    assert label(1, top[0].neuron) in c._repr_html_()
    c.save(tmp_path / "c.safetensors")
    assert kv.MemoryContributions.load(tmp_path / "c.safetensors").top(1)[0].label == top[0].label
    vt = kv.value_tokens(arch, 1, [top[0].neuron], k=2)
    assert vt.table().splitlines()[1].startswith(label(1, top[0].neuron) + " ")
    deletion = kv.deletion_neurons(arch)
    layer, neuron, _ = deletion.most_negative(1)[0]
    assert f"most negative: {label(layer, neuron)} (" in deletion.table()


# --- gated MLPs (Llama, Mistral, Qwen2) ------------------------------------------------------------

GATED = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", GATED)
def test_gated_coefficients_are_act_of_the_gate_times_the_up_reading(family, ids):
    """m = act(g·x̂)(u·x̂): the mlp_act site equals the product of the mlp_gate and mlp_up sites and the
    adapter's MLPWeights.coefficients of the normed input; m @ W_out == mlp_out; m takes both signs."""
    from helpers import make_family
    from reslens.arch import adapter

    arch = adapter(make_family(family))
    acts = capture(arch, ids, sites=("resid_mid", "mlp_act", "mlp_gate", "mlp_up", "mlp_out"))
    for layer in range(arch.n_layer):
        w = arch.mlp_weights(layer)
        m = kv.coefficients(acts, layer)
        torch.testing.assert_close(m, w.act(acts.mlp_gate[layer]) * acts.mlp_up[layer], rtol=0, atol=1e-6)
        x_hat = arch.norm("mlp", layer)(acts.resid_mid[layer])
        torch.testing.assert_close(m, w.coefficients(x_hat), rtol=0, atol=1e-5)
        torch.testing.assert_close(m @ kv.values(arch, layer), acts.mlp_out[layer], rtol=0, atol=1e-5)
        assert w.b_out is None and float((m < 0).float().mean()) > 0.3  # negative m: writes -v
        c = kv.contributions_of(acts, arch, layer, position=3, seq=2)
        assert torch.equal(c.bias, torch.zeros(arch.d_model))
        torch.testing.assert_close(c.updates.sum(0), acts.mlp_out[layer, 2, 3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", *GATED])
def test_coefficient_edits_are_exact_in_every_family(family, ids):
    """Setting m_i moves mlp_out by exactly (value - m_i) v_i, at the chosen positions only; nothing stays."""
    from helpers import make_family
    from reslens.arch import adapter

    model = make_family(family)
    arch = adapter(model)
    clean = capture(arch, ids, sites=("mlp_act", "mlp_out"))
    before = model_state(model)
    with kv.edit_coefficients(arch, {1: {4: -3.0, 9: None}}, positions=[2, -1]):
        edited = capture(arch, ids, sites=("mlp_act", "mlp_out"))
    v, m = kv.values(arch, 1), clean.mlp_act[1]
    delta = (-3.0 - m[..., 4])[..., None] * v[4] + (0.0 - m[..., 9])[..., None] * v[9]
    for p in (2, 10):
        torch.testing.assert_close(edited.mlp_out[1, :, p], clean.mlp_out[1, :, p] + delta[:, p],
                                   rtol=0, atol=1e-5)
    assert torch.equal(edited.mlp_out[1, :, :2], clean.mlp_out[1, :, :2])
    assert torch.equal(edited.mlp_out[0], clean.mlp_out[0])
    assert hook_counts(model) == {}
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("family", GATED)
def test_gated_deletion_neurons_use_the_up_key_with_the_gate_beside_it(family):
    from helpers import make_family
    from reslens.arch import adapter

    model = make_family(family)
    arch = adapter(model)
    w, gamma = arch.mlp_weights(2), arch.norm("mlp", 2).weight
    with torch.no_grad():
        w.W_out[9] = -3 * w.W_in[9] * gamma  # neuron 9 writes against what its up key reads
    d = kv.deletion_neurons(arch)
    cos = torch.nn.functional.cosine_similarity
    assert float(d.cos[2, 9]) == pytest.approx(-1.0, abs=1e-5)
    for layer, neuron in ((2, 9), (0, 5), (1, 17)):
        w_l, g_l = arch.mlp_weights(layer), arch.norm("mlp", layer).weight
        torch.testing.assert_close(d.cos[layer, neuron],
                                   cos(w_l.W_in[neuron] * g_l, w_l.W_out[neuron], dim=0))
        torch.testing.assert_close(d.cos_gate[layer, neuron],
                                   cos(w_l.W_gate[neuron] * g_l, w_l.W_out[neuron], dim=0))
    assert d.most_negative(1) == [(2, 9, pytest.approx(-1.0, abs=1e-5))]
    assert torch.equal(d.deleting(), d.cos < -0.5) and torch.equal(d.counts(-0.9), (d.cos < -0.9).sum(-1))
    assert int(d.counts(-0.99)[2]) >= 1
    table = d.table(3)
    assert "up key" in table and "L2N9 (-1.00, gate" in table and "their cos_gate" in table
    assert "cos_gate" in d.to_frame().columns
    with pytest.raises(ValueError, match="threshold"):
        d.counts(-2.0)


def test_a_gated_deletion_neuron_deletes_both_signs_and_a_gelu_one_only_the_positive():
    """What the DeletionNeurons docstring says: with its gate open, a gated neuron whose value is -u writes
    against the u component for either sign of u·x̂; GELU writes ~nothing for a negative reading."""
    from helpers import make_family
    from reslens.arch import adapter

    arch = adapter(make_family("llama"))
    w = arch.mlp_weights(0)
    u, g = w.W_in[0].detach().clone(), w.W_gate[0].detach().clone()
    g = g - (g @ u) / (u @ u) * u  # a gate key orthogonal to the up key: the gate reads the same for ±u
    one = MLPWeights(W_in=u[None], b_in=None, W_gate=g[None], b_gate=None, W_out=-u[None], b_out=None,
                     act=w.act)
    gelu = MLPWeights(W_in=u[None], b_in=None, W_gate=None, b_gate=None, W_out=-u[None], b_out=None,
                      act=torch.nn.functional.gelu)
    reads_u, reads_g = u / (u @ u), g / (g @ g)  # x̂ = 3 reads_u gives u·x̂ = 3
    for sign in (1.0, -1.0):
        x_hat = 3 * reads_g + sign * 3 * reads_u  # gate open (g·x̂ = 3), up reading ±3
        reading, write = float(x_hat @ u), float(one.forward(x_hat) @ u)
        assert reading == pytest.approx(3 * sign, rel=1e-4)
        assert reading * write < 0  # it pushes the u component back towards 0, both ways
        gelu_write = float(gelu.forward(sign * 3 * reads_u) @ u)
        if sign > 0:
            assert gelu_write < 0 and abs(gelu_write) > 0.3 * abs(write)
        else:
            assert abs(gelu_write) < 0.01 * abs(write)  # GELU leaves the negative side nearly alone


def test_deletion_plot_of_many_layers_is_a_heatmap_the_same_on_given_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos = torch.rand(30, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d = kv.DeletionNeurons(cos=cos, cos_gate=cos.flip(-1))
    own = d.plot()
    fig = plt.figure()
    given = d.plot(ax=fig.subplots())
    assert len(own.axes[0].images) == len(given.axes[0].images) == 1  # 30 layers: a heatmap, both ways
    assert own.axes[0].get_xlabel() == given.axes[0].get_xlabel() == d.direction
    few = kv.DeletionNeurons(cos=cos[:3]).plot()
    assert not few.axes[0].images and len(few.axes[0].patches) == 3  # one histogram per layer
    assert d.counts().tolist() == (cos < -0.5).sum(-1).tolist()
    plt.close("all")


# --- the real model (SmolLM2-135M-Instruct) -------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gated_memories_sum_to_the_mlp_output_and_trigger_with_both_signs(smollm2):
    """On SmolLM2: Σ m_i v_i == mlp_out at a position of every layer; its mined top triggers are negative
    for a large share of keys (a gated coefficient writes -v as often as +v); agreement reads them."""
    from reslens import tokenize
    from reslens.arch import adapter

    model, tokenizer = smollm2
    arch = adapter(model)
    batch = tokenize(tokenizer, ["The Eiffel Tower is located in the city of", "Mr. Holmes sat by the fire."])
    acts = capture(arch, batch, sites=("mlp_act", "mlp_out"))
    for layer in range(arch.n_layer):
        c = kv.contributions_of(acts, arch, layer, seq=1)
        torch.testing.assert_close(c.total(), acts.mlp_out[layer, 1, c.position], rtol=1e-4, atol=1e-4)
    text = ["It was a dark and stormy night; the rain fell in torrents.",
            "The cat sat on the mat and purred.",
            "Paris is the capital of France, and Rome is the capital of Italy."]
    index = kv.mine_triggers(arch, tokenizer, text, layers=[0, 29], top_k=2, progress=False)
    assert index.signed and 0.2 < float((index.scores[..., 0] < 0).float().mean()) < 0.8
    result = kv.agreement(index, arch, n_shuffles=2)
    assert torch.equal(result.negative, index.scores[..., 0] < 0)


def test_the_norm_aware_readout_is_the_cosine_and_keeps_a_hub_token_from_topping_every_value():
    from reslens.kv_memory import value_tokens
    from reslens.kv_memory.neurons import vocab_scores

    model = make_family("llama")
    arch = reslens.adapter(model)
    with torch.no_grad():  # plant a hub: one unembedding row 50 times longer than the others
        model.lm_head.weight[7] *= 50
    dot = value_tokens(model, 1, k=1)
    cos = value_tokens(model, 1, k=1, cosine=True)
    assert float((dot.top_ids[:, 0] == 7).float().mean()) > 0.3
    assert float((cos.top_ids[:, 0] == 7).float().mean()) < 0.2
    assert cos.convention == "cos(W_U, v)" and dot.convention == "W_U v"
    v = arch.mlp_weights(1).W_out[:4].detach().float()
    want = torch.nn.functional.cosine_similarity(v[:, None], arch.W_U.detach().float()[None], dim=-1)
    torch.testing.assert_close(vocab_scores(arch, v, False, cosine=True), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="cosine"):
        value_tokens(model, 1, cosine="yes")
