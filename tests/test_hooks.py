"""Parity of captured activations with HuggingFace's own outputs, on tiny random models."""

import pytest
import torch

import reslens
from reslens import Batch, Residuals, capture, trace
from reslens.hooks import SITES
from helpers import VOCAB, make_model

ALL = tuple(s for s in SITES if s != "mlp_gate")  # GPT-2 has no gate


def test_resid_equals_hf_hidden_states_bit_exactly(model, ids):
    res = capture(model, ids, sites=("resid",))
    hf = model(ids, output_hidden_states=True).hidden_states
    n_layer = model.config.n_layer
    assert res.resid.shape == (n_layer + 1, *ids.shape, 32)
    for layer in range(n_layer):
        assert torch.equal(res.resid[layer], hf[layer]), layer
    # HF's last hidden state already has ln_f applied; ours is the raw residual before it.
    assert torch.equal(model.transformer.ln_f(res.resid[n_layer]), hf[-1])
    assert not torch.allclose(res.resid[n_layer], hf[-1])


def test_final_and_logits_equal_the_model(model, ids):
    res = capture(model, ids, sites=("final", "logits"))
    out = model(ids, output_hidden_states=True)
    assert torch.equal(res.logits, out.logits)
    assert torch.equal(res.final, out.hidden_states[-1])


def test_bare_gpt2model_logits_come_from_the_tied_unembedding(base_model, ids):
    res = capture(base_model, ids, sites=("final", "logits"))
    final = base_model(ids).last_hidden_state
    torch.testing.assert_close(res.final, final)
    torch.testing.assert_close(res.logits, final @ base_model.wte.weight.T)


def test_block_decomposition_is_exact(model, ids):
    res = capture(model, ids, sites=("resid", "resid_mid", "attn_out", "mlp_out", "mlp_act"))
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(
            res.resid[layer + 1],
            res.resid[layer] + res.attn_out[layer] + res.mlp_out[layer],
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            res.resid_mid[layer], res.resid[layer] + res.attn_out[layer], atol=1e-5, rtol=0
        )
        c_proj = model.transformer.h[layer].mlp.c_proj
        torch.testing.assert_close(
            res.mlp_act[layer] @ c_proj.weight + c_proj.bias, res.mlp_out[layer], atol=1e-5, rtol=0
        )


def test_mlp_act_is_post_gelu(model, ids):
    res = capture(model, ids, sites=("resid_mid", "mlp_act"))
    mlp = model.transformer.h[1].mlp
    expected = mlp.act(mlp.c_fc(model.transformer.h[1].ln_2(res.resid_mid[1])))
    torch.testing.assert_close(res.mlp_act[1], expected)


def test_attn_pattern_equals_eager_weights_without_forcing_eager(model, ids):
    assert model.config._attn_implementation == "sdpa"
    res = capture(model, ids, sites=("attn_pattern",))
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    eager = model(ids, output_attentions=True).attentions
    assert res.attn_pattern.shape == (3, 3, 4, 11, 11)
    for layer, weights in enumerate(eager):
        torch.testing.assert_close(res.attn_pattern[layer], weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.attn_pattern.sum(-1), torch.ones(3, 3, 4, 11))
    upper = torch.ones(11, 11, dtype=torch.bool).triu(1)
    assert (res.attn_pattern[..., upper] == 0).all()


def test_attn_pattern_with_padding_matches_eager(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 8:] = 0
    batch = Batch(ids, mask)
    res = capture(model, batch, sites=("attn_pattern",))
    model.set_attn_implementation("eager")
    eager = model(
        ids, attention_mask=mask, position_ids=batch.position_ids, output_attentions=True
    ).attentions
    real = mask.bool()
    for layer, weights in enumerate(eager):
        for b in range(3):
            rows = real[b].nonzero().flatten()
            torch.testing.assert_close(
                res.attn_pattern[layer, b][:, rows], weights[b][:, rows], atol=1e-6, rtol=1e-5
            )
            assert (res.attn_pattern[layer, b][:, rows][..., ~real[b]] == 0).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs(model, side):
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 11, 8]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(11 - len(seq), 11) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    sites = ("resid", "resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_pattern", "final", "logits")
    padded = capture(model, Batch(ids, mask), sites=sites)
    assert torch.equal(padded.attention_mask, mask.bool())
    for row, seq in enumerate(seqs):
        alone = capture(model, seq[None], sites=sites)
        real = mask[row].bool()
        for site in sites:
            got, want = getattr(padded, site), getattr(alone, site)
            if site == "attn_pattern":
                got = got[:, row][..., real, :][..., real]
                want = want[:, 0]
            elif site in ("final", "logits"):
                got, want = got[row, real], want[0]
            else:
                got, want = got[:, row, real], want[:, 0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{side} {site} row {row}")


def test_layers_limit_what_is_kept(model, ids):
    res = capture(model, ids, sites=("resid", "mlp_out"), layers=[1, 3])
    full = capture(model, ids, sites=("resid", "mlp_out"))
    assert res.layers == (1, 3) and res.blocks == (1,)
    assert res.resid.shape[0] == 2 and res.mlp_out.shape[0] == 1
    assert torch.equal(res.get("resid", 3), full.resid[3])
    assert torch.equal(res.get("mlp_out", 1), full.mlp_out[1])
    assert capture(model, ids, layers=-1).layers == (3,)
    with pytest.raises(ValueError, match="not captured"):
        res.get("resid", 2)


def test_only_requested_sites_are_stored(model, ids):
    res = capture(model, ids, sites=("mlp_out",))
    assert res.sites == ("mlp_out",)
    assert all(getattr(res, s) is None for s in SITES if s != "mlp_out")


def test_trace_records_a_forward_the_user_runs(model, ids):
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    with trace(model, sites=ALL) as tr:
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    res = tr.residuals
    assert torch.equal(res.logits, out.logits)
    assert torch.equal(res.resid[1], out.hidden_states[1])
    assert torch.equal(res.attention_mask, mask.bool())
    assert torch.equal(res.input_ids, ids)


def test_a_forward_with_logits_to_keep_inside_a_trace_says_so(family_model):
    """``logits_to_keep=1`` keeps one position of logits: named, with what to do (it was a shape error)."""
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    refused = r"logits for 1 of the 6 positions.*logits_to_keep.*leave 'logits' out"
    with pytest.raises(ValueError, match=refused):
        with trace(family_model, sites=("resid", "logits")):
            family_model(ids, logits_to_keep=1)
    with trace(family_model, sites=("resid", "logits")) as tr:  # every position: recorded as before
        out = family_model(ids, logits_to_keep=0)
    assert torch.equal(tr.residuals.logits, out.logits)
    with trace(family_model, sites="resid") as tr:  # no logits asked for: nothing to refuse
        family_model(ids, logits_to_keep=1)
    assert tr.residuals.resid.shape[2] == 6


def test_trace_before_any_forward_says_so(model):
    with trace(model) as tr:
        pass
    with pytest.raises(RuntimeError, match="no forward pass"):
        tr.residuals


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, ids):
    model = make_model().to(dtype)
    res = capture(model, ids, sites=("resid", "mlp_act", "attn_pattern", "logits"))
    assert res.resid.dtype == dtype and res.logits.dtype == dtype
    assert res.attn_pattern.dtype == torch.float32
    hf = model(ids, output_hidden_states=True)
    assert torch.equal(res.resid[1], hf.hidden_states[1])
    assert torch.equal(res.logits, hf.logits)
    up = capture(model, ids, sites=("resid", "logits"), dtype=torch.float32)
    assert up.resid.dtype == torch.float32 and up.logits.dtype == torch.float32
    assert torch.equal(up.resid, res.resid.float())


def test_detach_false_keeps_gradients(model, ids):
    with torch.enable_grad():
        res = capture(model, ids, sites=("resid", "mlp_act", "logits"), detach=False)
        assert res.resid.requires_grad and res.mlp_act.requires_grad and res.logits.requires_grad
        res.logits[0, -1, 5].backward()
    assert model.transformer.wte.weight.grad is not None
    detached = capture(model, ids, sites=("resid",))
    assert not detached.resid.requires_grad


def test_device_and_dtype_of_storage(model, ids):
    res = capture(model, ids, sites=("resid",), device="cpu", dtype=torch.float64)
    assert res.resid.dtype == torch.float64 and res.resid.device.type == "cpu"
    moved = res.to(dtype=torch.float16)
    assert moved.resid.dtype == torch.float16 and moved.attention_mask.dtype == torch.bool


def test_save_and_load_round_trip(model, ids, tmp_path):
    res = capture(model, ids, sites=("resid", "attn_pattern", "logits"), layers=[0, 2])
    path = tmp_path / "res.safetensors"
    res.save(path)
    back = Residuals.load(path)
    assert back.layers == res.layers and back.blocks == res.blocks and back.sites == res.sites
    for name in ("resid", "attn_pattern", "logits", "attention_mask", "input_ids", "position_ids"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    assert open(path, "rb").read(8) != b"\x80\x04\x95"  # not a pickle


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a reslens Residuals"):
        Residuals.load(tmp_path / "x.safetensors")


def test_residuals_checks_shapes():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="resid has shape"):
        Residuals(attention_mask=mask, layers=(0, 1), resid=torch.zeros(3, 2, 5, 8))
    with pytest.raises(ValueError, match="attn_pattern"):
        Residuals(attention_mask=mask, blocks=(0,), attn_pattern=torch.zeros(1, 2, 4, 5, 4))


def test_text_inputs_with_a_tokenizer(model):
    class CharTokenizer:
        pad_token_id, eos_token_id = None, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    res = capture(model, ["abc", "hello"], tokenizer=CharTokenizer(), sites=("resid",))
    assert res.resid.shape[1:3] == (2, 5)
    assert res.attention_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_tokenize_follows_the_tokenizers_special_token_convention(model):
    class BosTokenizer:  # adds BOS = 1 by default, like Llama-3's tokenizer
        pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

        def __call__(self, text, add_special_tokens=True):
            ids = [3 + ord(c) % (VOCAB - 3) for c in text]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    tok = BosTokenizer()
    batch = reslens.tokenize(tok, ["ab", "hello"], padding_side="left")
    assert batch.input_ids[0, 3].item() == 1 and batch.input_ids[1, 0].item() == 1
    assert batch.special_mask.tolist() == [
        [False, False, False, True, False, False],
        [True, False, False, False, False, False],
    ]
    assert batch.stat_mask.sum().item() == 7
    plain = reslens.tokenize(tok, ["ab", "hello"], special_tokens=False)
    assert not plain.special_mask.any() and plain.input_ids.shape == (2, 5)
    res = reslens.capture(model, batch, sites=("resid",))
    assert torch.equal(res.special_mask, batch.special_mask) and res.stat_mask.sum().item() == 7
    # GPT-2's tokenizer adds nothing: no special positions
    _, gpt2_tok = reslens.load_model()
    assert not reslens.tokenize(gpt2_tok, ["The cat sat"]).special_mask.any()
