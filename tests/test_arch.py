"""The family adapters (reslens.arch) against their own HuggingFace forward: sizes, weight orientation,
norms as data, MLP weights, per-head weights, attention patterns, partial forwards, rank-one deltas."""

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Model

from helpers import make_family, make_model
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


# --- the abstract base: what a family must say, and what it gets written once ----------------------


def test_a_partial_adapter_fails_when_built_naming_what_it_misses(model):
    class Partial(Arch):  # only the family's data
        family = "partial"
        positional = "learned"
        layout = GPT2.layout

        def __init__(self, model):
            self.model = model

    with pytest.raises(TypeError, match="abstract.*W_O.*block_kwargs"):
        Partial(model)

    class NoNorm(GPT2):  # one method short of a family
        norm_of = Arch.norm_of

    with pytest.raises(TypeError, match="abstract.*norm_of"):
        NoNorm(model)


def test_every_abstract_member_says_what_it_returns():
    assert len(Arch.__abstractmethods__) >= 15
    for name in Arch.__abstractmethods__:
        member = getattr(Arch, name)
        function = member.fget if isinstance(member, property) else member
        assert function.__annotations__.get("return"), f"Arch.{name} declares no return type"
        doc = (function.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"Arch.{name} needs a one-line docstring; got {doc!r}"


def test_roles_follow_the_layout(family_model):
    a = adapter(family_model)
    for role in ("attn", "attn_norm", "attn_key_proj", "attn_out_proj", "mlp", "mlp_norm", "mlp_in_proj",
                 "mlp_out_proj", "attn_out_norm", "mlp_out_norm"):
        path = getattr(a.layout, role)
        module = getattr(a, role)(1)
        assert module is (None if path is None else a.blocks[1].get_submodule(path)), role
    separate_gate = a.layout.mlp_gate_up_proj is None and a.layout.experts is None
    assert a.gated_mlp == (a.family not in ("gpt2", "gpt_neox"))
    assert (a.mlp_gate_proj(0) is not None) == (a.gated_mlp and separate_gate)
    assert (a.W_pos is not None) == (a.positional == "learned")


def test_logits_are_the_final_norm_then_the_unembedding_and_the_models_own(family_model, ids):
    a = adapter(family_model)
    res = capture(family_model, ids, sites=("resid", "logits"))
    with torch.no_grad():
        h = res.resid[a.n_layer]
        logits = a.logits(h)  # [batch, pos, d_vocab]
        assert logits.shape == (*ids.shape, a.d_vocab)
        assert torch.equal(logits, a.unembed(a.norm("final")(h)))
        torch.testing.assert_close(logits, res.logits, atol=1e-5, rtol=1e-5)


def test_logits_differentiate_the_residual_never_the_weights(family_model):
    a = adapter(family_model)
    h = torch.randn(2, a.d_model, requires_grad=True)
    a.logits(h).logsumexp(-1).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is None for p in family_model.parameters())


def _old_mining_fingerprint(arch, layer):  # kv_memory.mining.model_fingerprint before weights_digest
    import hashlib

    digest = hashlib.sha256()
    for p in arch.key_parameters(layer):
        t = p.detach()
        digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_digest_keeps_the_mining_fingerprint_saved_indexes_hold(family_model, dtype):
    from reslens.kv_memory import model_fingerprint

    a = adapter(family_model.to(dtype))
    for layer in range(a.n_layer):
        assert a.weights_digest(layer) == _old_mining_fingerprint(a, layer)
    assert model_fingerprint(family_model, [0, 2]) == _old_mining_fingerprint(a, 2)


def test_weights_digest_is_cached_and_sees_in_place_edits(monkeypatch):
    from reslens.arch import _digest

    model = make_model()
    a = adapter(model)
    calls = []
    real_digest = _digest.digest
    monkeypatch.setattr(_digest, "digest", lambda ts, **kw: calls.append(1) or real_digest(ts, **kw))
    first, whole = a.weights_digest(1), a.weights_digest()
    assert adapter(model).weights_digest(1) == first and a.weights_digest() == whole and len(calls) == 2
    with torch.no_grad():
        a.mlp_out_param(1).add_(1.0)  # not a key parameter of layer 1 ...
    assert a.weights_digest(1) == first and len(calls) == 2
    assert a.weights_digest() != whole  # ... but a weight of the model
    before = a.mlp_out_param(0)[0, 0].item()
    with torch.no_grad():
        a.mlp_out_param(0)[0, 0] += 1.0  # shapes layer 1's keys
    assert a.weights_digest(1) != first
    with torch.no_grad():
        a.mlp_out_param(0)[0, 0] = before
    assert a.weights_digest(1) == first  # the content, not the history
    assert make_model(seed=1).lm_head is not None and adapter(make_model(seed=1)).weights_digest(1) != first


def test_the_fingerprint_names_the_weights_any_dtype_and_sees_edits(family_model, monkeypatch):
    import copy

    from reslens.arch import _digest

    a = adapter(family_model)
    calls = []
    real_digest = _digest.digest
    monkeypatch.setattr(_digest, "digest", lambda ts, **kw: calls.append(1) or real_digest(ts, **kw))
    first = a.fingerprint
    assert len(first) == 64 and adapter(family_model).fingerprint == first and len(calls) == 1  # cached
    assert adapter(copy.deepcopy(family_model).to(torch.bfloat16)).fingerprint == first  # one checkpoint
    other = make_family(a.config.model_type, seed=1)  # the same shape, other weights
    assert adapter(other).fingerprint != first
    with torch.no_grad():
        a.W_U[0, 0] += 1.0  # the unembedding, changed in place
    assert a.fingerprint != first and len(calls) >= 3


@pytest.mark.parametrize("bad", [-1, 3, 1.0, True, "1"])
def test_weights_digest_rejects_a_bad_layer(model, bad):
    with pytest.raises(ValueError, match=f"layer must be an int in 0..2 or None; got {bad!r}"):
        adapter(model).weights_digest(bad)
