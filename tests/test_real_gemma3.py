"""The second real model, Gemma 3 270M: every capture and decomposition against a plain HF computation.

Gemma 3's traps on a real checkpoint: embeddings scaled by √640 in float32, ``1 + w`` RMSNorms, four
norms a block (``attn_out`` / ``mlp_out`` are what the post-sublayer norms give the residual), QK-norm,
five sliding layers (window 512) to each global one with their own rotary bases, one KV head, a
262,144-token tied vocabulary, and a tokenizer that puts ``<bos>`` first.
"""

import copy

import pytest
import torch

from reslens import adapter, capture
from reslens.attribution import logit_attribution
from reslens.kv_memory import contributions
from reslens.lens import logit_lens

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEXTS = ["The Eiffel Tower is in the city of", "When the old sailor came back to the inn, he asked for"]


@pytest.fixture(scope="module")
def batch(gemma3):
    model, tokenizer = gemma3
    return tokenizer(TEXTS[0], return_tensors="pt")


def test_the_tokenizer_puts_bos_first_and_reslens_marks_it(gemma3):
    model, tokenizer = gemma3
    ids = tokenizer(TEXTS[0]).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2
    assert adapter(model).start_token(tokenizer) == 2


def test_capture_is_the_models_hidden_states_and_logits_bit_for_bit(gemma3, batch):
    model, _ = gemma3
    a = adapter(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    res = capture(model, batch, sites=("resid", "logits"))
    for layer in range(a.n_layer):
        assert torch.equal(res.resid[layer], out.hidden_states[layer]), layer
    assert torch.equal(res.logits, out.logits)
    # resid[0] is the scaled embedding, as the model's embedding module gives it
    scaled = model.model.embed_tokens.weight[batch["input_ids"]] * torch.tensor(640**0.5, dtype=model.dtype)
    torch.testing.assert_close(res.resid[0], scaled, atol=0, rtol=0)


def test_sandwich_sites_add_up_and_rebuild_from_heads_and_memories(gemma3, batch):
    model, _ = gemma3
    a = adapter(model)
    res = capture(model, batch, sites=("resid", "resid_mid", "attn_out", "mlp_out", "attn_z", "mlp_act"))
    for layer in range(a.n_layer):
        scale = float(res.resid[layer + 1].abs().max())  # Gemma's residual reaches ~1e5: relative checks
        tol = dict(atol=2e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(res.resid_mid[layer], res.resid[layer] + res.attn_out[layer], **tol)
        torch.testing.assert_close(res.resid[layer + 1], res.resid_mid[layer] + res.mlp_out[layer], **tol)
        torch.testing.assert_close(a.attn_output(layer, res.attn_z[layer]), res.attn_out[layer],
                                   atol=1e-3 * float(res.attn_out[layer].abs().max()), rtol=1e-4)
        torch.testing.assert_close(a.mlp_output(layer, res.mlp_act[layer]), res.mlp_out[layer],
                                   atol=1e-3 * float(res.mlp_out[layer].abs().max()), rtol=1e-4)


def test_patterns_equal_eager_attention_in_sliding_and_global_layers(gemma3, batch):
    model, _ = gemma3
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager(**batch, output_attentions=True).attentions
    res = capture(model, batch, sites=("attn_pattern",), layers=[4, 5, 6])
    for i, layer in enumerate((4, 5)):  # layer 4 slides, layer 5 is global
        torch.testing.assert_close(res.attn_pattern[i], expected[layer], atol=1e-5, rtol=1e-4)


def test_the_lens_ends_in_the_logits_and_reads_the_fact(gemma3):
    model, tokenizer = gemma3
    lens = logit_lens(model, TEXTS[0], tokenizer=tokenizer)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS[0], return_tensors="pt")).logits[0]
    probs = logits.float().softmax(-1)
    top = probs.topk(lens.top_ids.shape[-1], dim=-1)
    assert torch.equal(lens.top_ids[-1, 0], top.indices)  # the last lens row is the model's own output
    torch.testing.assert_close(lens.top_probs[-1, 0], top.values, atol=1e-5, rtol=1e-4)
    assert tokenizer.decode(int(lens.top_ids[-1, 0, -1, 0])) == " Paris"


def test_attribution_and_memories_sum_exactly(gemma3):
    model, tokenizer = gemma3
    dla = logit_attribution(model, TEXTS[0], target=" Paris", against=" London", tokenizer=tokenizer)
    torch.testing.assert_close(dla.contributions.sum(1), dla.logit, atol=2e-3, rtol=1e-4)
    c = contributions(model, TEXTS[0], layer=9, tokenizer=tokenizer)
    res = capture(model, tokenizer(TEXTS[0], return_tensors="pt"), sites=("mlp_out",), layers=[9])
    torch.testing.assert_close(c.total(), res.mlp_out[0, 0, -1], atol=1e-3 * float(res.mlp_out.abs().max()),
                               rtol=1e-4)
