"""reslens.generate: generation with the KV cache, recorded at every position, equals one full forward.

Every family: greedy and sampled (seeded), a batch of two prompts of different lengths (padded on the
right as given, left-padded for generation), with and without a patch at every step; the recorded sites
equal :func:`reslens.capture` over the final sequence (patched the same way), the tokens equal plain
``model.generate``'s, and a stop token ends its row.
"""

import pytest
import torch

import reslens
from reslens.generation import GENERATE_SITES, generate
from tests.helpers import FAMILIES, make_family

SITES = ("resid", "attn_out", "mlp_out", "mlp_act", "final", "logits")
PROMPTS = reslens.Batch(torch.tensor([[5, 9, 14, 3, 7, 0], [11, 4, 8, 0, 0, 0]]),
                        torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool))
LEFT = torch.tensor([[0, 5, 9, 14, 3, 7], [0, 0, 0, 11, 4, 8]]), torch.tensor([[0, 1, 1, 1, 1, 1],
                                                                              [0, 0, 0, 1, 1, 1]])


def _assert_full_forward(model, out, *, patches=None):
    """The generation's residuals equal capture over its final sequence (patched as it was)."""
    res = out.residuals
    batch = reslens.Batch(res.input_ids, res.attention_mask)
    with reslens.patch(model, patches or {}):
        full = reslens.capture(model, batch, sites=res.sites)
    mask = res.attention_mask
    for site in res.sites:
        got, want = getattr(res, site), getattr(full, site)
        sel = (slice(None), mask) if got.ndim == 4 else (mask,)
        scale = want[sel].abs().max().item() + 1e-6
        err = (got[sel] - want[sel]).abs().max().item()
        assert err <= 2e-5 * scale + 1e-5, (site, err, scale)


def _plain_generate(model, n, **kwargs):
    ids, mask = LEFT
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0,
                              eos_token_id=None, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_one_full_forward_and_plain_generate(family):
    model = make_family(family)
    out = generate(model, PROMPTS, max_new_tokens=6, sites=SITES, stop=[])
    assert out.prompt_length == 6 and out.new_tokens == (6, 6) and out.stopped == (False, False)
    assert torch.equal(out.sequences, _plain_generate(model, 6))
    assert out.residuals.attention_mask.sum(-1).tolist() == [11, 9]
    _assert_full_forward(model, out)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_generation_with_a_seed(family):
    model = make_family(family)
    a = generate(model, PROMPTS, max_new_tokens=5, stop=[], do_sample=True, seed=3, temperature=2.0)
    b = generate(model, PROMPTS, max_new_tokens=5, stop=[], do_sample=True, seed=3, temperature=2.0)
    assert torch.equal(a.sequences, b.sequences)
    torch.manual_seed(3)
    assert torch.equal(a.sequences, _plain_generate(model, 5, do_sample=True, temperature=2.0))
    state = torch.random.get_rng_state()
    generate(model, PROMPTS, max_new_tokens=2, stop=[], do_sample=True, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    _assert_full_forward(model, a)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_patch_at_every_step_equals_the_patched_full_forward(family):
    model = make_family(family)
    d = reslens.adapter(model).d_model
    direction = torch.linspace(-1, 1, d) * 3

    def steer(t):  # position-wise: no `start` needed
        return t + direction.to(t.dtype)

    def ablate_from_5(t, start):  # positions 5.. of the whole sequence: needs `start`
        t = t.clone()
        first = max(0, 5 - start)
        t[:, first:] = 0
        return t

    patches = {("resid", 1): steer, ("mlp_out", 0): ablate_from_5}
    out = generate(model, PROMPTS, max_new_tokens=4, sites=("resid", "mlp_out", "logits"), stop=[],
                   patches=patches)
    _assert_full_forward(model, out, patches=patches)
    assert float(out.residuals.mlp_out[0][:, 5:].abs().max()) == 0.0
    plain = generate(model, PROMPTS, max_new_tokens=4, stop=[])
    assert not torch.allclose(plain.residuals.resid[-1][:, :6], out.residuals.resid[-1][:, :6])


def test_a_stop_token_ends_its_row_and_the_rest_is_padding():
    model = make_family("llama")
    free = generate(model, PROMPTS, max_new_tokens=6, stop=[])
    stop = free.sequences[0, 6 + 2].item()  # row 0's third new token
    if stop in free.sequences[1, 6:].tolist():
        pytest.skip("the stop token also occurs in row 1 here")  # pragma: no cover - fixed seed
    out = generate(model, PROMPTS, max_new_tokens=6, stop=[stop])
    assert out.new_tokens[0] == 3 and out.stopped[0]
    assert out.new_tokens[1] == out.sequences.shape[1] - 6 and not out.stopped[1]
    mask = out.residuals.attention_mask
    assert mask[0, 6:9].all() and not mask[0, 9:].any()
    assert out.new_ids(0)[-1] == stop
    _assert_full_forward(model, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lens_of_a_generation_is_the_lens_of_its_full_forward(family):
    model = make_family(family)
    out = generate(model, PROMPTS, max_new_tokens=5, stop=[], lens="logit", top_k=3)
    batch = reslens.Batch(out.sequences, out.residuals.attention_mask)
    want = reslens.lens.logit_lens(model, batch, top_k=3)
    assert out.lens.row_labels == want.row_labels
    real = batch.attention_mask
    assert torch.equal(out.lens.top_ids[:, real][..., 0], want.top_ids[:, real][..., 0])
    got, want = out.lens.kl_final_layer[:, real], want.kl_final_layer[:, real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_text_in_text_out_with_a_tokenizer():
    model, tokenizer = reslens.load_model()  # the embedded model
    out = generate(model, ["The cat sat on the", "Once upon a time"], tokenizer=tokenizer, max_new_tokens=4,
                   lens="logit")
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.texts[0] == tokenizer.decode(out.new_ids(0))
    assert "Generation" in out._repr_html_() and "logit lens" in out._repr_html_()


def test_save_and_load_keep_everything(tmp_path):
    model = make_family("gpt2")
    out = generate(model, PROMPTS, max_new_tokens=3, stop=[], lens="logit")
    out.save(tmp_path / "gen.safetensors")
    back = type(out).load(tmp_path / "gen.safetensors")
    assert torch.equal(back.residuals.resid, out.residuals.resid)
    assert back.new_tokens == out.new_tokens and back.prompt_length == out.prompt_length
    assert torch.equal(back.lens.top_ids, out.lens.top_ids)


def test_bad_input_is_refused_and_leaves_no_hook():
    model = make_family("llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="attn_pattern"):
        generate(model, PROMPTS, max_new_tokens=2, sites="attn_pattern")
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, PROMPTS, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="context"):
        generate(model, PROMPTS, max_new_tokens=10_000)
    with pytest.raises(TypeError, match="patches"):
        generate(model, PROMPTS, max_new_tokens=2, patches={("resid", 1): 3})
    with pytest.raises(ValueError, match="stop"):
        generate(model, PROMPTS, max_new_tokens=2, stop=[10**9])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert "attn_pattern" not in GENERATE_SITES


def test_the_cli_prints_the_text_and_the_lens_of_the_whole_sequence(capsys, tmp_path):
    from reslens.cli import main

    model, tokenizer = reslens.load_model()
    want = generate(model, ["The cat sat on the"], tokenizer=tokenizer, max_new_tokens=5)
    assert main(["generate", "The cat sat on the", "--max-new-tokens", "5", "--out",
                 str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "The cat sat on the" + want.texts[0] in out
    assert f"columns [{want.prompt_length}]..[{want.prompt_length + 4}] are what the model wrote" in out
    assert "logit lens" in out and (tmp_path / "g.png").is_file()
    assert main(["generate", "The cat", "--max-new-tokens", "0"]) == 2
    assert main(["generate", "The cat", "--lens", str(tmp_path / "missing")]) == 2
    assert main(["generate", "The cat", "--sample", "--temperature", "0"]) == 2
    assert "error" in capsys.readouterr().err
