"""Every capture site and guarantee of reslens.hooks, and the adapter contract, on every supported family
(helpers.FAMILIES: GPT-2, Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo 2, GPT-NeoX parallel and sequential,
Phi-3, Mixtral, OLMoE, Qwen3-MoE), each a tiny random model with its family's traps switched on."""

import copy

import pytest
import torch

from helpers import VOCAB, assert_same_state, hook_counts, make_family, model_state
from reslens import Batch, adapter, capture
from reslens.hooks import patch, trace

ATOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def test_resid_is_hidden_states_bit_for_bit_and_logits_match(family_model, ids):
    a = adapter(family_model)
    with torch.no_grad():
        out = family_model(ids, output_hidden_states=True)
    res = capture(family_model, ids, sites=("resid", "final", "logits"))
    for layer in range(a.n_layer):
        assert torch.equal(res.resid[layer], out.hidden_states[layer]), layer
    assert torch.equal(res.final, out.hidden_states[-1])
    with torch.no_grad():
        assert torch.equal(a.final_norm_module(res.resid[-1]), out.hidden_states[-1])
        assert torch.equal(a.norm("final")(res.resid[-1]), out.hidden_states[-1])
    assert torch.equal(res.logits, out.logits)


def test_decomposition_identities(family_model, ids):
    res = capture(family_model, ids, sites=("resid", "resid_mid", "attn_out", "mlp_out"))
    for layer in range(res.attn_out.shape[0]):
        torch.testing.assert_close(res.resid_mid[layer], res.resid[layer] + res.attn_out[layer], **ATOL)
        torch.testing.assert_close(res.resid[layer + 1], res.resid_mid[layer] + res.mlp_out[layer], **ATOL)


def test_mlp_sites_and_weights_rebuild_the_mlp(family_model, ids):
    a = adapter(family_model)
    moe = a.layout.experts is not None
    keys = () if moe else ("mlp_up",) + (("mlp_gate",) if a.gated_mlp else ())
    res = capture(family_model, ids, sites=("resid", "resid_mid", "mlp_act", "mlp_out") + keys)
    with torch.no_grad():
        for layer in range(a.n_layer):
            w = a.mlp_weights(layer)
            assert w.W_in.shape == w.W_out.shape == (a.d_mlp, a.d_model) and w.gated == (a.gated_mlp or moe)
            torch.testing.assert_close(a.mlp_output(layer, res.mlp_act[layer]), res.mlp_out[layer], **ATOL)
            # the MLP reads the block's input in a parallel block, the residual after attention otherwise
            source = res.resid[layer] if a.layout.parallel else res.resid_mid[layer]
            x_hat = a.norm("mlp", layer)(source)
            torch.testing.assert_close(w.coefficients(x_hat), res.mlp_act[layer], **ATOL)
            out_norm = a.out_norm("mlp", layer)
            rebuilt = w.forward(x_hat) if out_norm is None else out_norm(w.forward(x_hat))
            torch.testing.assert_close(rebuilt, res.mlp_out[layer], **ATOL)
            if moe:  # every token's coefficients are zero outside the experts the router chose for it
                used = res.mlp_act[layer].view(*ids.shape, w.n_expert, -1).abs().amax(-1) > 0
                assert int(used.sum(-1).max()) <= family_model.config.num_experts_per_tok
            elif a.gated_mlp:
                torch.testing.assert_close(
                    w.act(res.mlp_gate[layer]) * res.mlp_up[layer], res.mlp_act[layer], **ATOL
                )
            else:
                torch.testing.assert_close(w.act(res.mlp_up[layer]), res.mlp_act[layer], **ATOL)
    if moe:
        for site in ("mlp_up", "mlp_gate"):
            with pytest.raises(ValueError, match="per expert"):
                capture(family_model, ids, sites=(site,))
        with pytest.raises(ValueError, match="patch mlp act is refused"):
            patch(family_model, {("mlp_act", 0): torch.zeros_like})
        assert hook_counts(family_model) == {}


def test_mlp_gate_on_an_ungated_model_is_refused(ids):
    model = make_family("gpt2")
    with pytest.raises(ValueError, match="no gate"):
        capture(model, ids, sites=("mlp_gate",))
    assert hook_counts(model) == {}


def test_attn_pattern_equals_eager_attention_while_the_model_stays_on_sdpa(family_model, ids):
    impl = family_model.config._attn_implementation
    assert impl == ("eager" if family_model.config.model_type == "gemma2" else "sdpa")  # Gemma 2: soft-caps
    eager = copy.deepcopy(family_model)
    eager.set_attn_implementation("eager")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second sequence
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # reslens counts positions from the mask
        expected = eager(ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    res = capture(family_model, {"input_ids": ids, "attention_mask": mask}, sites=("attn_pattern",))
    assert family_model.config._attn_implementation == impl
    for layer, att in enumerate(expected):
        real = mask.bool()
        # compare the rows of real queries (HF leaves the rows of padded queries arbitrary)
        got, want = res.attn_pattern[layer].permute(0, 2, 1, 3)[real], att.permute(0, 2, 1, 3)[real]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_each_sequence_its_solo_numbers(family_model, side):
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (9, 5)]
    n = 9
    input_ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for row, s in enumerate(seqs):
        span = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        input_ids[row, span], mask[row, span] = s, True
    sites = ("resid", "attn_out", "mlp_out", "attn_pattern", "logits")
    batch = capture(family_model, Batch(input_ids, mask), sites=sites)
    for row, s in enumerate(seqs):
        solo = capture(family_model, s[None], sites=sites)
        span = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        for site in ("resid", "attn_out", "mlp_out"):
            torch.testing.assert_close(getattr(batch, site)[:, row, span], getattr(solo, site)[:, 0], **ATOL)
        torch.testing.assert_close(batch.logits[row, span], solo.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batch.attn_pattern[:, row, :, span, span], solo.attn_pattern[:, 0], **ATOL)


def test_nothing_is_left_changed(family_model, ids):
    before = model_state(family_model)
    capture(family_model, ids, sites=("resid", "attn_pattern", "mlp_act", "logits"))
    site = "mlp_out" if adapter(family_model).layout.experts is not None else "mlp_act"  # MoE: refused
    with patch(family_model, {(site, 1): torch.zeros_like}), trace(family_model, sites=("resid",)):
        with torch.no_grad():
            family_model(ids)
    with pytest.raises(RuntimeError, match="boom"):
        with trace(family_model, sites=("resid",)):
            raise RuntimeError("boom")
    assert hook_counts(family_model) == {}
    assert_same_state(before, model_state(family_model))


# --- the adapter contract --------------------------------------------------------------------------


def test_per_head_weights_rebuild_attn_out_and_values(family_model, ids):
    a = adapter(family_model)
    res = capture(family_model, ids, sites=("resid", "attn_z", "attn_out", "attn_pattern"))
    with torch.no_grad():
        for layer in range(a.n_layer):
            z = a.split_heads(res.attn_z[layer])  # [batch, pos, head, d_head]
            b_o = 0 if a.b_O(layer) is None else a.b_O(layer)
            out = torch.einsum("bphe,hed->bpd", z, a.W_O(layer)) + b_o
            norm = a.out_norm("attn", layer)  # Gemma 2/3, OLMo 2: the heads' sum passes a norm
            torch.testing.assert_close(out if norm is None else norm(out), res.attn_out[layer], **ATOL)
            torch.testing.assert_close(a.attn_output(layer, res.attn_z[layer]), res.attn_out[layer], **ATOL)
            h = a.norm("attn", layer)(res.resid[layer])
            v = torch.einsum("bpd,hde->bhpe", h, a.W_V(layer))
            if a.b_V(layer) is not None:
                v = v + a.b_V(layer)[None, :, None]
            # z_h = pattern_h @ v_h: the pattern and the expanded value weights give the head outputs
            torch.testing.assert_close(res.attn_pattern[layer] @ v, z.transpose(1, 2), **ATOL)
            for head in range(a.n_head):
                assert torch.equal(
                    a.W_K(layer)[head], a.W_K(layer)[a.kv_head(head) * (a.n_head // a.n_kv_head)]
                )


def test_rotation_gives_the_attention_scores(family_model, ids):
    a = adapter(family_model)
    if "qk_circuit" in a.limits:  # QK-norm or soft-capped scores: no fixed bilinear form to test
        with pytest.raises(ValueError, match="qk circuit is refused on this .* model: .*(norm|soft-capped)"):
            a.require("qk_circuit")
        return
    res = capture(family_model, ids, sites=("resid", "attn_pattern"))
    layer, batch, query = 1, 0, 7
    with torch.no_grad():
        h = a.norm("attn", layer)(res.resid[layer][batch])  # [pos, d_model]
        q = torch.einsum("pd,hde->hpe", h, a.W_Q(layer)) + (
            0 if a.b_Q(layer) is None else a.b_Q(layer)[:, None]
        )
        k = torch.einsum("pd,hde->hpe", h, a.W_K(layer)) + (
            0 if a.b_K(layer) is None else a.b_K(layer)[:, None]
        )
        scores = torch.stack(
            [
                torch.einsum("he,ef,hf->h", q[:, query], a.rotation(layer, query - key), k[:, key])
                for key in range(query + 1)
            ],
            dim=-1,
        ) * a.attn_scale(layer)  # [head, key]
    window = getattr(a, "window", lambda _: None)(layer)
    if window is not None:
        scores[:, : query + 1 - window] = float("-inf")
    torch.testing.assert_close(
        scores.softmax(-1), res.attn_pattern[layer][batch, :, query, : query + 1], **ATOL
    )


@pytest.mark.parametrize("start", [1, 5, 9])
def test_partial_forwards_equal_the_full_forward(family_model, ids, start):
    a = adapter(family_model)
    res = capture(family_model, ids, sites=("resid",))
    with torch.no_grad():
        for layer in range(a.n_layer):
            k, v = a.attention_kv(layer, res.resid[layer][:, :start], start=0)
            assert k.shape[1] == a.n_kv_head
            out = a.run_block_suffix(layer, res.resid[layer][:, start:], k, v)
            torch.testing.assert_close(out, res.resid[layer + 1][:, start:], **ATOL)
            # keys of a later stretch, rotated at their absolute positions, equal the full run's keys there
            k_all, _ = a.attention_kv(layer, res.resid[layer])
            k_tail, _ = a.attention_kv(layer, res.resid[layer][:, start:], start=start)
            torch.testing.assert_close(k_tail, k_all[:, :, start:], **ATOL)


def test_norm_is_the_module_and_rank_one_delta_has_the_stored_orientation(family_model):
    a = adapter(family_model)
    x = torch.randn(3, a.d_model) * 2
    with torch.no_grad():
        for which, module in (
            ("attn", a.attn_norm(1)),
            ("mlp", a.mlp_norm(1)),
            ("final", a.final_norm_module),
        ):
            norm = a.norm(which, 1)
            layer_norm = a.family in ("gpt2", "gpt_neox")
            assert norm.centred == layer_norm and (norm.bias is None) == (not layer_norm)
            assert torch.equal(norm(x), x if module is None else module(x))  # OLMo 2: no norm before
        for which in ("attn", "mlp"):
            module = a.attn_out_norm(1) if which == "attn" else a.mlp_out_norm(1)
            if module is not None:
                assert torch.equal(a.out_norm(which, 1)(x), module(x))
    if a.layout.experts is not None:
        with pytest.raises(ValueError, match="rank one edit is refused .* one per expert"):
            a.mlp_out_param(1)
        return
    u, v = torch.randn(a.d_mlp), torch.randn(a.d_model)
    delta = a.rank_one_delta(u, v)
    assert delta.shape == a.mlp_out_param(1).shape
    m = torch.randn(4, a.d_mlp)
    proj = a.mlp_out_proj(1)
    with torch.no_grad():
        before = proj(m)
        a.mlp_out_param(1).add_(delta)
        after = proj(m)
        a.mlp_out_param(1).sub_(delta)
    torch.testing.assert_close(after - before, (m @ u)[:, None] * v, atol=1e-4, rtol=1e-4)
    assert id(a.mlp_out_param(1)) not in {id(p) for p in a.key_parameters(1)}


def test_bare_bodies_are_supported(ids):
    for family in ("llama", "mistral", "qwen2"):
        body = make_family(family, bare=True)
        a = adapter(body)
        assert a.lm_head is None and a.body is body
        res = capture(body, ids, sites=("resid", "final"))
        with torch.no_grad():
            out = body(ids, output_hidden_states=True)
        assert torch.equal(res.resid[1], out.hidden_states[1]) and torch.equal(
            res.final, out.last_hidden_state
        )
        if body.config.tie_word_embeddings:  # Qwen2 here: the embedding is the unembedding
            res = capture(body, ids, sites=("logits",))
            torch.testing.assert_close(res.logits, out.last_hidden_state @ a.W_E.T, **ATOL)
        else:  # Llama, Mistral here: the unembedding is in the LM head the body lacks
            with pytest.raises(ValueError, match="not tied to its embedding"):
                capture(body, ids, sites=("logits",))


def test_the_bare_body_of_an_untied_checkpoint_never_unembeds_with_its_embedding(ids):
    from reslens.lens import logit_lens

    full = make_family("llama")
    body = full.model  # the same weights, without the (untied) LM head
    assert not full.config.tie_word_embeddings
    for call in (lambda: logit_lens(body, ids), lambda: adapter(body).W_U):
        with pytest.raises(ValueError, match=r"bare LlamaModel body .*\(tie_word_embeddings=False\)"):
            call()
    assert logit_lens(full, ids).top_ids.shape[0] == full.config.num_hidden_layers + 1


def test_rope_scaling_comes_from_the_model(ids):
    scaled = make_family(
        "llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    )
    plain = make_family("llama")
    res_s = capture(scaled, ids, sites=("attn_pattern",))
    res_p = capture(plain, ids, sites=("attn_pattern",))
    eager = copy.deepcopy(scaled)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager(ids, output_attentions=True).attentions[1]
    torch.testing.assert_close(res_s.attn_pattern[1], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(res_s.attn_pattern[1], res_p.attn_pattern[1])
