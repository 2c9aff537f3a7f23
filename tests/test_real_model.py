"""The real-model tier: what a real pretrained model must show, found by reslens, each checked against a
plain-HuggingFace computation where one exists. SmolLM2-135M-Instruct (Llama architecture, 30 layers,
GQA 9/3), from the reslens cache; skipped with a reason without it, a failure in CI."""

import copy

import pytest
import torch

from reslens import adapter, capture, tokenize

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEXT = "The Eiffel Tower is located in the city of"


def test_it_is_the_llama_shaped_smollm2(smollm2):
    model, tokenizer = smollm2
    a = adapter(model)
    assert (a.family, a.n_layer, a.d_model, a.n_head, a.n_kv_head, a.d_vocab) == (
        "llama",
        30,
        576,
        9,
        3,
        49152,
    )
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()) == " Paris"


def test_capture_equals_huggingface_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    batch = tokenize(
        tokenizer, [TEXT, "Mr and Mrs Dursley, of number four, Privet Drive"], padding_side="left"
    )
    res = capture(model, batch, sites=("resid", "mlp_act", "mlp_out", "attn_out", "logits"))
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            position_ids=batch.position_ids,
            output_hidden_states=True,
        )
    for layer in range(30):
        assert torch.equal(res.resid[layer], out.hidden_states[layer])
    assert torch.equal(res.logits, out.logits)
    a = adapter(model)
    for layer in (0, 14, 29):
        torch.testing.assert_close(
            res.mlp_act[layer] @ a.mlp_weights(layer).W_out, res.mlp_out[layer], atol=1e-4, rtol=1e-4
        )
    torch.testing.assert_close(
        res.resid[-1], res.resid[0] + res.attn_out.sum(0) + res.mlp_out.sum(0), atol=2e-3, rtol=1e-4
    )


def test_attention_patterns_equal_eager_attention_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    res = capture(model, ids, sites=("attn_pattern",), layers=range(0, 8))
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager(ids, output_attentions=True).attentions
    for layer in range(8):
        torch.testing.assert_close(res.attn_pattern[layer], expected[layer], atol=1e-5, rtol=1e-4)
