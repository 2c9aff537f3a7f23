"""reslens.generate on the real models: what generation records equals plain HF's forward over the result."""

import pytest
import torch

from reslens.generation import generate

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = ["The Eiffel Tower is in the city of", "Once upon a time, a sailor"]


def _plain_hidden_states(model, sequences, mask):
    """Plain HF: the hidden states and logits of one forward over the final sequences (no reslens)."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=sequences, attention_mask=mask.long(), position_ids=positions,
                    output_hidden_states=True, use_cache=False)
    return out.hidden_states, out.logits


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_generation_on_a_real_model_equals_one_plain_forward(name, request):
    model, tokenizer = request.getfixturevalue(name)
    out = generate(model, PROMPTS, tokenizer=tokenizer, max_new_tokens=8, sites=("resid", "logits"),
                   lens="logit")
    res, mask = out.residuals, out.residuals.attention_mask
    hidden, logits = _plain_hidden_states(model, res.input_ids, mask)
    n_layer = len(hidden) - 1
    for layer in range(n_layer):  # hidden_states[n_layer] is after the final norm
        want, got = hidden[layer][mask], res.resid[layer][mask]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-4, layer
    want = logits[mask]
    assert (res.logits[mask] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-4
    assert torch.equal(out.lens.final_top1[mask], logits.argmax(-1)[mask])
    assert out.texts[0] == tokenizer.decode(out.new_ids(0))
