"""Why the lens changed, on the real model (SmolLM2-135M-Instruct): the pieces of every step sum to the change
of the lens's " Paris" - " London" logit difference that plain HuggingFace computes (each layer's own
``hidden_states`` through the model's final RMSNorm and ``lm_head``), and the README's finding holds: " Paris"
overtakes at row 24, put there by block 23's heads. From the reslens cache; skipped with a reason without it,
a failure in CI. One forward and one capture of a 9-token prompt, a few seconds of CPU."""

import pytest
import torch

from reslens.lens import lens_changes

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"


def test_every_step_sums_to_the_change_hf_computes_and_paris_overtakes_at_24(smollm2):
    model, tokenizer = smollm2
    paris, london = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" Paris", " London"))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[:-1])[:, 0, -1]  # raw residuals; the last one is normed
        logits = torch.cat([model.lm_head(model.model.norm(hidden)), out.logits[0, -1][None]]).float()
    hf = logits[:, paris] - logits[:, london]  # [31]
    changes = lens_changes(model, PROMPT, " Paris", against=" London", tokenizer=tokenizer, memories=5)
    assert len(changes) == 30
    torch.testing.assert_close(changes[0].logit, hf, atol=5e-5, rtol=1e-6)
    for layer, change in enumerate(changes):
        assert change.total == pytest.approx(float(hf[layer + 1] - hf[layer]), abs=5e-5), change.table()
    assert changes[0].overtake_layer == 24 and float(hf[23]) < -3 and float(hf[24]) > 1
    step = changes[23]
    assert step.top(1)[0][0] == "23.4"
    heads = sum(v for k, v in zip(step.kind, step.contributions.tolist()) if k == "head")
    assert heads > step.change / 2  # block 23's heads write most of the step
