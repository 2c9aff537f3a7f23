"""The GPT-2 adapter: sizes, weight orientation and class checks."""

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Model

from reslens._gpt2 import GPT2
from helpers import make_model


def test_sizes_and_tied_unembedding(model):
    g = GPT2(model)
    assert (g.n_layer, g.d_model, g.d_mlp, g.n_head, g.d_head, g.d_vocab, g.n_positions) == (3, 32, 128, 4, 8, 97, 40)
    assert g.W_U.data_ptr() == g.wte.weight.data_ptr()
    assert g.lm_head is model.lm_head and g.transformer is model.transformer


def test_bare_gpt2model_is_supported():
    g = GPT2(make_model(cls=GPT2Model))
    assert g.lm_head is None and g.W_U is g.wte.weight and g.n_layer == 3


def test_conv1d_orientation_matches_the_forward(model):
    g = GPT2(model)
    x = torch.randn(5, g.d_model)
    assert g.c_fc(1).weight.shape == (g.d_model, g.d_mlp)
    assert g.c_proj(1).weight.shape == (g.d_mlp, g.d_model)
    assert g.c_attn(1).weight.shape == (g.d_model, 3 * g.d_model)
    torch.testing.assert_close(g.c_fc(1)(x), x @ g.c_fc(1).weight + g.c_fc(1).bias)


def test_attention_pattern_matches_eager(model, ids):
    model.set_attn_implementation("eager")
    g = GPT2(model)
    qkv = g.c_attn(0)(g.ln_1(0)(model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))))
    expected = model(ids, output_attentions=True).attentions[0]
    torch.testing.assert_close(g.attention_pattern(0, qkv, None), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), torch.nn.Linear(2, 2), "gpt2"])
def test_non_gpt2_is_a_type_error(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        GPT2(bad)
