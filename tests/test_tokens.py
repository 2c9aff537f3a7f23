"""One token vocabulary: wherever reslens asks for a token it takes an id or one token's text, by one rule."""

import numpy as np
import pytest
import torch

import reslens
from reslens import attribution, lens, tracing
from reslens import kv_memory as kv
from reslens._tokens import token_id, token_ids

TEXT = "When Mr Holmes came back to the inn, he said"


@pytest.fixture(scope="module")
def embedded():
    return reslens.load_model()


def test_token_id_takes_an_id_or_the_text_of_one_token(embedded):
    _, tok = embedded
    the = tok(" the", add_special_tokens=False)["input_ids"][0]
    for given in (" the", the, np.int64(the), torch.tensor(the)):
        assert token_id(given, d_vocab=50257, tokenizer=tok, name="target") == the
    assert token_id("the", d_vocab=50257, tokenizer=tok) != the  # the leading space is part of the token
    assert token_ids(" the", 3, d_vocab=50257, tokenizer=tok).tolist() == [the] * 3
    assert token_ids([" the", 5, " the"], 3, d_vocab=50257, tokenizer=tok).tolist() == [the, 5, the]


@pytest.mark.parametrize("given, error, match", [
    (" Baskervilles", ValueError, r"answer=' Baskervilles' is \d tokens \[' B.*not one.*e\.g\. answer=' B"),
    ("", ValueError, "answer is an empty string"),
    (50257, ValueError, r"answer=50257 is out of range for the vocabulary \(expected 0..50256\)"),
    (-1, ValueError, "answer=-1 is out of range"),
    (True, TypeError, r"answer must be a token id \(an int\) or one token's text"),
    (3.0, TypeError, "answer must be a token id"),
    (torch.tensor(3.0), TypeError, "answer must be a token id"),
])
def test_token_id_refusals_name_the_parameter(embedded, given, error, match):
    with pytest.raises(error, match=match):
        token_id(given, d_vocab=50257, tokenizer=embedded[1], name="answer")


def test_text_needs_a_tokenizer():
    with pytest.raises(TypeError, match=r"token=' the' is text, so tokenizer= is required \(or pass its id"):
        token_id(" the", d_vocab=50257)


def test_every_place_that_asks_for_a_token_takes_its_text_or_its_id(embedded):
    """The lens's targets, attribution's target, a memory contribution's token and a traced answer: the
    text ``" the"`` and its id give the same numbers; text of several tokens is refused, naming the
    parameter."""
    model, tok = embedded
    the = tok(" the", add_special_tokens=False)["input_ids"][0]
    by_text = lens.logit_lens(model, [TEXT], tokenizer=tok, targets=" the")
    by_id = lens.logit_lens(model, [TEXT], tokenizer=tok, targets=the)
    assert (by_text.targets == the).all() and torch.equal(by_text.target_rank, by_id.target_rank)
    assert torch.equal(by_text.target_logprob, by_id.target_logprob)

    by_text = attribution.logit_attribution(model, [TEXT], " the", tokenizer=tok)
    by_id = attribution.logit_attribution(model, [TEXT], the, tokenizer=tok)
    assert torch.equal(by_text.contributions, by_id.contributions)

    by_text = kv.contributions(model, [TEXT], 2, token=" the", tokenizer=tok, through_final_norm=True)
    by_id = kv.contributions(model, [TEXT], 2, token=the, tokenizer=tok, through_final_norm=True)
    assert by_text.token == the and torch.equal(by_text.token_effect, by_id.token_effect)

    noise = tracing.Noise(samples=2)
    by_text = tracing.causal_trace(model, tok, TEXT, "Mr Holmes", answer=" the", noise=noise)
    by_id = tracing.causal_trace(model, tok, TEXT, "Mr Holmes", answer=the, noise=noise)
    assert by_text.answer_id == the and torch.equal(by_text.restored_prob, by_id.restored_prob)

    for call, name in [
        (lambda t: lens.logit_lens(model, [TEXT], tokenizer=tok, targets=t), "targets"),
        (lambda t: attribution.logit_attribution(model, [TEXT], t, tokenizer=tok), "target"),
        (lambda t: kv.contributions(model, [TEXT], 2, token=t, tokenizer=tok), "token"),
        (lambda t: tracing.causal_trace(model, tok, TEXT, "Mr Holmes", answer=t, noise=noise), "answer"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}=' Baskervilles' is \d tokens"):
            call(" Baskervilles")
