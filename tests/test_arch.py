"""The family adapters (reslens.arch) against their own HuggingFace forward: sizes, weight orientation,
norms as data, MLP weights, per-head weights, attention patterns, partial forwards, rank-one deltas."""

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Model

from helpers import make_model
from reslens.arch import GPT2, Arch, Norm, adapter
from reslens.hooks import capture


def test_sizes_and_tied_unembedding(model):
    a = adapter(model)
    assert isinstance(a, GPT2) and a.family == "gpt2" and a.positional == "learned" and not a.gated_mlp
    assert (a.n_layer, a.d_model, a.d_mlp, a.n_head, a.n_kv_head, a.d_head, a.d_vocab, a.n_ctx) == (
        3,
        32,
        128,
        4,
        4,
        8,
        97,
        40,
    )
    assert a.W_U.data_ptr() == a.W_E.data_ptr()
    assert a.lm_head is model.lm_head and a.body is model.transformer
    assert adapter(a) is a


def test_bare_body_is_supported():
    a = adapter(make_model(cls=GPT2Model))
    assert a.lm_head is None and a.W_U is a.W_E and a.n_layer == 3 and a.b_U is None


@pytest.mark.parametrize(
    "bad",
    [
        BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        ),
        torch.nn.Linear(2, 2),
        "gpt2",
    ],
)
def test_unsupported_family_is_a_type_error_listing_the_families(bad):
    with pytest.raises(TypeError, match=f"supported family.*gpt2.*{type(bad).__name__}"):
        adapter(bad)


@pytest.mark.parametrize("which,layer", [("attn", 1), ("mlp", 2), ("final", None)])
def test_norm_equals_the_module(model, which, layer):
    a = adapter(model)
    module = {"attn": a.attn_norm, "mlp": a.mlp_norm}.get(which, lambda _: a.final_norm_module)(layer)
    norm = a.norm(which, layer)
    assert isinstance(norm, Norm) and norm.centred and norm.bias is not None
    x = torch.randn(2, 5, a.d_model) * 3
    with torch.no_grad():
        assert torch.equal(norm(x), module(x))
        # the linearised norm of pieces summing to x sums to norm(x) - bias
        pieces = torch.stack([x * 0.25, x * 0.75])
        torch.testing.assert_close(
            norm.linearised(x)(pieces).sum(0) + norm.bias, module(x), atol=1e-5, rtol=1e-5
        )
        # read_direction: w . norm(x) = read_direction(w) . x / sigma(x) + w . beta
        w = torch.randn(a.d_model)
        lhs = module(x) @ w
        rhs = (x @ norm.read_direction(w)) / norm.scale(x) + norm.bias @ w
        torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)


def test_norm_rejects_unknown_roles(model):
    with pytest.raises(ValueError, match="which must be"):
        adapter(model).norm("ln_x")
    with pytest.raises(ValueError, match="needs a layer"):
        adapter(model).norm("mlp")


def test_mlp_weights_rebuild_mlp_act_and_mlp_out(model, ids):
    a = adapter(model)
    res = capture(model, ids, sites=("resid_mid", "mlp_act", "mlp_out"))
    with torch.no_grad():
        for layer in range(a.n_layer):
            w = a.mlp_weights(layer)
            assert w.W_in.shape == w.W_out.shape == (a.d_mlp, a.d_model) and w.W_gate is None and not w.gated
            x_hat = a.norm("mlp", layer)(res.resid_mid[layer])
            torch.testing.assert_close(w.coefficients(x_hat), res.mlp_act[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w.forward(x_hat), res.mlp_out[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                res.mlp_act[layer] @ w.W_out + w.b_out, res.mlp_out[layer], atol=1e-5, rtol=1e-5
            )


def test_per_head_weights_rebuild_attn_out(model, ids):
    a = adapter(model)
    res = capture(model, ids, sites=("resid", "attn_z", "attn_out"))
    with torch.no_grad():
        for layer in range(a.n_layer):
            z = a.split_heads(res.attn_z[layer])  # [batch, pos, head, d_head]
            out = torch.einsum("bphe,hed->bpd", z, a.W_O(layer)) + a.b_O(layer)
            torch.testing.assert_close(out, res.attn_out[layer], atol=1e-5, rtol=1e-5)
            h = a.norm("attn", layer)(res.resid[layer])
            v = torch.einsum("bpd,hde->bhpe", h, a.W_V(layer)) + a.b_V(layer)[None, :, None]
            _, v_model = a.attention_kv(layer, res.resid[layer])
            torch.testing.assert_close(v, v_model, atol=1e-5, rtol=1e-5)


def test_attention_pattern_matches_eager(model, ids):
    model.set_attn_implementation("eager")
    a = adapter(model)
    spec = a.pattern_hook(0)
    with torch.no_grad():
        qkv = spec.module(a.attn_norm(0)(a.W_E[ids] + a.W_pos[torch.arange(ids.shape[1])]))
        expected = model(ids, output_attentions=True).attentions[0]
    torch.testing.assert_close(spec.pattern(qkv, None), expected, atol=1e-6, rtol=1e-5)


def test_run_block_suffix_equals_the_full_forward(model, ids):
    a = adapter(model)
    res = capture(model, ids, sites=("resid",))
    start = 4
    with torch.no_grad():
        for layer in range(a.n_layer):
            k, v = a.attention_kv(layer, res.resid[layer][:, :start])
            out = a.run_block_suffix(layer, res.resid[layer][:, start:], k, v)
            torch.testing.assert_close(out, res.resid[layer + 1][:, start:], atol=1e-5, rtol=1e-5)


def test_rank_one_delta_has_the_stored_orientation(model):
    a = adapter(model)
    u, v = torch.randn(a.d_mlp), torch.randn(a.d_model)
    delta = a.rank_one_delta(u, v)
    assert delta.shape == a.mlp_out_param(1).shape
    # adding the delta changes mlp_out by (m . u) v for coefficients m
    m = torch.randn(3, a.d_mlp)
    w = a.mlp_weights(1)
    torch.testing.assert_close(
        m @ (w.W_out + delta) - m @ w.W_out, (m @ u)[:, None] * v, atol=1e-4, rtol=1e-4
    )


def test_key_parameters_exclude_the_mlp_output_projection(model):
    a = adapter(model)
    ids = {id(p) for p in a.key_parameters(1)}
    assert id(a.mlp_out_param(1)) not in ids and id(a.mlp_out_param(0)) in ids and id(a.W_E) in ids


def test_embedding_components_sum_to_resid0(model, ids):
    a = adapter(model)
    res = capture(model, ids, sites=("resid",))
    pieces = a.embedding_components(ids, res.position_ids)
    assert [kind for kind, _ in pieces] == ["embed", "pos_embed"]
    torch.testing.assert_close(sum(t for _, t in pieces), res.resid[0], atol=1e-6, rtol=1e-6)


def test_arch_is_the_base_of_every_adapter(model):
    assert isinstance(adapter(model), Arch) and "GPT2LMHeadModel" in repr(adapter(model))


def test_checkpoint_name_is_what_the_config_records_and_empty_for_a_model_built_in_memory(model):
    import reslens
    from reslens.models import embedded_model_dir

    assert adapter(model).checkpoint_name == ""  # built from a config, never saved
    loaded, _ = reslens.load_model()
    assert adapter(loaded).checkpoint_name == str(embedded_model_dir())
    from reslens.lens._data import model_name

    assert model_name(adapter(model)) == type(model).__name__  # a learned lens then records the class
