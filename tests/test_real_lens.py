"""The logit lens on the real model (SmolLM2-135M-Instruct: Llama architecture, 30 layers, RMSNorm, tied
head), each row checked against a plain-HuggingFace computation: the last row is the model's logits, every
row is the final RMSNorm of that layer's own ``hidden_states`` through ``lm_head``, and the lens finds what
a real model must show: top-1 agreement with the final layer rises with depth. From the reslens cache;
skipped with a reason without it, a failure in CI. One lens of one passage (~60 tokens), ~30 s of CPU."""

import pytest
import torch

from reslens import adapter
from reslens.lens import logit_lens

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

#: The opening of Persuasion (Jane Austen, 1817; public domain), one of the corpus's held-out books.
PASSAGE = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never "
    "took up any book but the Baronetage; there he found occupation for an idle hour, and consolation in "
    "a distressed one; there his faculties were roused into admiration and respect, by contemplating the "
    "limited remnant of the earliest patents."
)
TOP_K = 5


@pytest.fixture(scope="module")
def passage(smollm2):
    """``(model, ids [1, P], lens, hf)``: the lens of the passage and HF's own forward of it."""
    model, tokenizer = smollm2
    ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    lens = logit_lens(model, ids, top_k=TOP_K)
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True)
    return model, ids, lens, hf


def test_the_lens_reads_every_residual_layer_of_the_passage(passage):
    model, ids, lens, _ = passage
    assert adapter(model).n_layer == 30 and lens.layer_of_row == tuple(range(31))
    assert 40 <= ids.shape[1] <= 80 and lens.top_ids.shape == (31, 1, ids.shape[1], TOP_K)


def test_last_row_is_the_models_logits(passage):
    _, _, lens, hf = passage
    logits = hf.logits.float()
    top = logits.topk(TOP_K, dim=-1)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], (top.values - logits.logsumexp(-1, keepdim=True)).exp(),
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(lens.final_top1, logits.argmax(-1))
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(lens.entropy[-1], -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=1e-4)
    assert (lens.kl_final_layer[-1] == 0).all()


def test_every_row_is_the_final_rmsnorm_of_that_layers_hidden_state(passage):
    model, _, lens, hf = passage
    logq = hf.logits.float().log_softmax(-1)
    q = logq.exp()
    assert len(hf.hidden_states) == 31
    with torch.no_grad():
        for layer, hidden in enumerate(hf.hidden_states[:-1]):  # HF's last hidden state is already normed
            z = model.lm_head(model.model.norm(hidden)).float()  # plain HF: RMSNorm of THIS layer, then head
            top = z.topk(TOP_K, dim=-1)
            logp = z.log_softmax(-1)
            # ids: equal unless two top-k logits tie to float rounding (allow one swapped pair)
            assert (lens.top_ids[layer] != top.indices).sum() <= 2, layer
            top_probs = (top.values - z.logsumexp(-1, keepdim=True)).exp()
            torch.testing.assert_close(lens.top_probs[layer], top_probs, atol=1e-4, rtol=1e-3,
                                       msg=f"layer {layer}")
            torch.testing.assert_close(lens.entropy[layer], -(logp.exp() * logp).sum(-1), atol=2e-3,
                                       rtol=1e-3, msg=f"layer {layer}")
            torch.testing.assert_close(lens.kl_final_layer[layer], (q * (logq - logp)).sum(-1), atol=2e-3,
                                       rtol=1e-3, msg=f"layer {layer}")


def test_top1_agreement_with_the_final_layer_rises_with_depth(passage):
    _, _, lens, _ = passage
    agreement = (lens.top_ids[:, 0, :, 0] == lens.final_top1[0]).float().mean(-1)  # [31]
    assert agreement[-1] == 1
    first, last = float(agreement[:5].mean()), float(agreement[-5:].mean())
    assert last > first + 0.3, agreement.tolist()
    assert float(agreement[-6:-1].mean()) > float(agreement[1:6].mean()) + 0.2  # not only the final row
    kl = lens.kl_final_layer[:, 0].mean(-1)
    assert float(kl[-2]) < float(kl[1:6].mean()) / 2  # and the distributions approach the final one
