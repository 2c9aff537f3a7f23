"""Edits under a KV cache: positions mean positions of the whole sequence, as without a cache.

``model.generate()`` with a cache runs each new token alone (its ``pos`` axis has one entry); an edit
meant for token 0 must not land on every generated token. Checked by generating with and without a
cache under the same edit, on tiny random GPT-2 and Llama models.
"""

import pytest
import torch

from helpers import hook_counts, make_family
from reslens import kv_memory as kv
from reslens.hooks import patch

PROMPT = torch.tensor([[5, 17, 33, 8, 61], [9, 2, 40, 71, 3]])


def _generate(model, use_cache: bool, steps: int = 6) -> torch.Tensor:
    """Greedy continuation's logits ``[steps, batch, vocab]``."""
    out = model.generate(
        PROMPT,
        attention_mask=torch.ones_like(PROMPT),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return torch.stack(out.logits)


def _strong_edit(model):
    """Every neuron of every block set to 4.0: a large change wherever it lands."""
    from reslens.arch import adapter

    arch = adapter(model)
    return {layer: dict.fromkeys(range(arch.d_mlp), 4.0) for layer in range(arch.n_layer)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", [[0], [1, 3]])
def test_edit_coefficients_under_a_cache_equals_no_cache(family, positions):
    model = make_family(family)
    edits = _strong_edit(model)
    with kv.edit_coefficients(model, edits, positions=positions):
        cached = _generate(model, use_cache=True)
        uncached = _generate(model, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    # and the edit did something: without it the continuation differs
    assert not torch.allclose(cached, _generate(model, use_cache=True), atol=1e-2)
    assert hook_counts(model) == {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patch_function_with_start_sees_whole_sequence_positions(family):
    model = make_family(family)
    d_model = model.config.hidden_size
    delta = 3 * torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    seen = []

    def at_token_2(t, start):  # t: [batch, pos, d_model], t[:, i] is token start + i
        seen.append((start, t.shape[1]))
        if start <= 2 < start + t.shape[1]:
            t = t.clone()
            t[:, 2 - start] += delta
        return t

    with patch(model, {("resid", 1): at_token_2}):
        cached = _generate(model, use_cache=True)
        uncached = _generate(model, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    assert seen[:3] == [(0, 5), (5, 1), (6, 1)]


def test_patch_function_without_start_refuses_a_continued_cache():
    model = make_family("gpt2")
    with patch(model, {("mlp_out", 1): lambda t: t}):
        with pytest.raises(ValueError, match=r"KV cache.*start"):
            _generate(model, use_cache=True)
        _generate(model, use_cache=False)  # whole sequences: fine
    assert hook_counts(model) == {}


def test_negative_positions_are_refused_under_a_continued_cache():
    model = make_family("llama")
    with kv.edit_coefficients(model, {0: {1: 2.0}}, positions=[-1]):
        _generate(model, use_cache=False)  # each step reruns the whole sequence: -1 is its last token
        with pytest.raises(ValueError, match=r"positions \[-1\].*KV cache"):
            _generate(model, use_cache=True)
    assert hook_counts(model) == {}


def test_positions_past_the_sequence_are_refused_under_a_cache():
    model = make_family("gpt2")
    for use_cache in (False, True):
        with kv.edit_coefficients(model, {0: {1: 2.0}}, positions=[40]):
            with pytest.raises(ValueError, match=r"positions \[40\] fall outside"):
                _generate(model, use_cache=use_cache)
