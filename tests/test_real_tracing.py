"""Real-model tier of causal tracing and ROME's edit: SmolLM2-135M-Instruct (Llama architecture, 30 layers).

A fact the model knows is traced and most of its effect comes back at the subject's last token, one cell is
recomputed with plain HuggingFace forwards and hooks, and a rank-one edit changes the answer and restores
bit-exactly. Skipped with a reason without the model in the cache (a failure in CI)."""

from pathlib import Path

import pytest
import torch

from reslens import adapter
from reslens.rome import SecondMoment, rank_one_edit
from reslens.tracing import Noise, causal_trace

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

#: A fact SmolLM2 knows whose subject has two tokens, so restoring the last one alone is not trivially
#: the clean run (the first stays corrupted), and one subsequent token.
PROMPT, SUBJECT, ANSWER = "The native language of Vladimir Putin is", "Vladimir Putin", " Russian"
SAMPLES = 3


def corrupted_and_restored_by_hand(model, ids, span, answer_id, std, layer, token, samples):
    """p(answer) of the corrupted run and with block ``layer``'s output restored at ``token``, by plain hooks.

    The noise is drawn as reslens documents it: ``torch.Generator().manual_seed(0)``, ``randn`` of
    ``[samples, subject tokens, d_model]`` times ``3 x std``, added to the token embeddings' output.
    """
    body = model.model
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((samples, span[1] - span[0], model.config.hidden_size), generator=gen) * (3.0 * std)
    with torch.no_grad():
        clean = model(ids[None], output_hidden_states=True).hidden_states[layer + 1][0, token]

    def corrupt(module, args, output):
        output = output.clone()
        output[:, span[0] : span[1]] += noise
        return output

    def restore(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, token] = clean
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def prob() -> float:
        with torch.no_grad():
            logits = model(ids[None].expand(samples, -1)).logits[:, -1]
        return float(logits.float().softmax(-1)[:, answer_id].mean())

    handles = [body.embed_tokens.register_forward_hook(corrupt)]
    try:
        corrupted = prob()
        handles.append(body.layers[layer].register_forward_hook(restore))
        restored = prob()
    finally:
        for handle in handles:
            handle.remove()
    return corrupted, restored


def test_the_trace_of_a_known_fact_restores_most_of_the_effect_at_the_subjects_last_token(smollm2):
    model, tokenizer = smollm2
    result = causal_trace(model, tokenizer, PROMPT, SUBJECT, answer=ANSWER, kind="resid",
                          noise=Noise(samples=SAMPLES))
    start, end = result.subject_span
    assert result.tokens[start:end] == (" Vladimir", " Putin") and result.answer == ANSWER
    assert result.clean_prob > 0.5 and result.total_effect > 0.3  # the model knows it; the noise removes it
    last = result.indirect_effect[:, end - 1]  # the subject's last token, every layer
    layer = int(last.argmax())
    assert float(last[layer]) > 0.5 * result.total_effect, result.table()

    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    std = float(adapter(model).W_E[ids[start:end]].detach().float().std())
    corrupted, restored = corrupted_and_restored_by_hand(model, ids, (start, end), result.answer_id, std,
                                                         layer, end - 1, SAMPLES)
    assert result.corrupted_prob == pytest.approx(corrupted, abs=1e-5)
    assert float(result.restored_prob[layer, end - 1]) == pytest.approx(restored, abs=1e-5)


#: Key statistics for the test: a few thousand tokens of the repository's own text (ROME uses ~100k Wikipedia
#: samples; this is a test of the mechanics, not of generalisation).
ROOT = Path(__file__).resolve().parents[1]


def test_a_rank_one_edit_changes_the_answer_and_restores_bit_exactly(smollm2):
    model, tokenizer = smollm2
    prompt, subject, new, layer = "The capital of Japan is", "Japan", " Paris", 4
    texts = [(ROOT / "README.md").read_text(encoding="utf-8"),
             (ROOT / "src" / "reslens" / "data" / "embedded" / "MODEL_CARD.md").read_text(encoding="utf-8")]
    stats = SecondMoment.compute(model, layer, texts, tokenizer=tokenizer, max_tokens=3000, max_length=512)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])

    def top1() -> str:
        with torch.no_grad():
            return tokenizer.decode([int(model(ids).logits[0, -1].argmax())])

    assert top1() == " Tokyo"
    weight = adapter(model).mlp_out_param(layer)
    original = weight.detach().clone()
    edit = rank_one_edit(model, tokenizer, prompt, subject, new, layer, second_moment=stats,
                         context_templates=[])  # the bare prompt only (ROME adds sampled prefixes)
    with edit:
        assert not torch.equal(weight, original)
        assert top1() == new
    assert torch.equal(weight, original) and top1() == " Tokyo"
