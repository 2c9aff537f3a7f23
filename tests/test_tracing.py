"""reslens.tracing: batched causal tracing equals a per-cell loop of forwards; ROME's edit is exact and reversible."""

import pytest
import torch
from transformers import AutoTokenizer

from helpers import assert_same_state, hook_counts, make_model, model_state
from reslens.hooks import capture, patch
from reslens.models import embedded_model_dir
from reslens.tracing import (
    BUCKETS,
    RankOneEdit,
    TraceResult,
    TraceSummary,
    causal_trace,
    causal_trace_ids,
    embedding_std,
    mlp_key_second_moment,
    rank_one_edit,
    rank_one_edit_ids,
    restored_prob,
    subject_span,
    trace_many,
    window_layers,
)

SPAN = (2, 5)


@pytest.fixture(scope="module")
def sharp():
    """A tiny random GPT-2 with larger weights, so noise and restorations move probabilities."""
    return make_model(initializer_range=0.3)


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def big_vocab():
    """A tiny random model with the real GPT-2 vocabulary, for the string API."""
    return make_model(vocab_size=50257, n_positions=32, initializer_range=0.3)


def per_cell_reference(model, ids, span, answer_id, kind, window, samples, noise, seed):
    """ROME's loop: one forward of ``samples`` rows per (layer, token) cell, every cell."""
    n_layer, n = len(model.transformer.h), ids.shape[0]
    start, end = span
    std = float(model.transformer.wte.weight[ids[start:end]].detach().std())
    gen = torch.Generator().manual_seed(seed)
    nu = torch.randn((samples, end - start, model.config.n_embd), generator=gen) * noise * std
    site = {"resid": "resid", "mlp": "mlp_out", "attn": "attn_out"}[kind]
    clean = capture(model, ids[None], sites=site)
    clean = getattr(clean, site)[:, 0]

    def corrupt(t):
        t = t.clone()
        t[:, start:end] += nu
        return t

    def prob(edits):
        with torch.no_grad(), patch(model, edits):
            logits = model(ids[None].expand(samples, -1)).logits[:, -1]
        return float(torch.softmax(logits.float(), -1)[:, answer_id].mean())

    out = torch.empty(n_layer, n)
    for layer in range(n_layer):
        for token in range(n):
            layers = [layer + 1] if kind == "resid" else window_layers(layer, window, n_layer)
            edits = {("resid", 0): corrupt}
            for j in layers:
                def restore(t, j=j, token=token):
                    t = t.clone()
                    t[:, token] = clean[j, token]
                    return t

                edits[(site, j)] = restore
            out[layer, token] = prob(edits)
    return out, prob({("resid", 0): corrupt})


@pytest.mark.parametrize("kind,window", [("resid", 10), ("mlp", 2), ("attn", 3), ("mlp", 10)])
def test_batched_trace_equals_a_per_cell_loop_of_forwards(sharp, prompt_ids, kind, window):
    before = model_state(sharp)
    result = causal_trace_ids(sharp, prompt_ids, SPAN, kind=kind, window=window, samples=4, batch_size=7)
    ref, corrupted = per_cell_reference(sharp, prompt_ids, SPAN, result.answer_id, kind, window, 4, 3.0, 0)
    torch.testing.assert_close(result.restored_prob, ref, rtol=0, atol=1e-5)
    assert result.corrupted_prob == pytest.approx(corrupted, abs=1e-6)
    with torch.no_grad():
        clean = sharp(prompt_ids[None]).logits[0, -1].float().softmax(-1)
    assert result.answer_id == int(clean.argmax())  # the model's own top-1 by default
    assert result.clean_prob == pytest.approx(float(clean.max()), abs=1e-6)
    assert result.total_effect > 0.01 and result.indirect_effect.abs().max() > 0.01  # not trivially zero
    assert hook_counts(sharp) == {}
    assert_same_state(before, model_state(sharp))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_run_block_suffix_equals_the_full_forward_at_those_positions(impl):
    from reslens._gpt2 import GPT2

    model = make_model(initializer_range=0.3)
    model.set_attn_implementation(impl)
    g = GPT2(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    resid = capture(model, ids, sites="resid").resid  # [n_layer + 1, 2, 9, d]
    for layer in range(g.n_layer):
        k, v = g.attention_kv(layer, resid[layer])
        assert k.shape == v.shape == (2, g.n_head, 9, g.d_head)
        for start in (0, 1, 4, 8):
            with torch.no_grad():
                out = g.run_block_suffix(layer, resid[layer][:, start:], k[:, :, :start], v[:, :, :start])
            torch.testing.assert_close(out, resid[layer + 1][:, start:], rtol=0, atol=1e-5)
        with torch.no_grad():  # the last position alone, attending to all earlier keys/values
            out = g.run_block_suffix(layer, resid[layer][:, -1:], k[:, :, :-1], v[:, :, :-1])
        torch.testing.assert_close(out, resid[layer + 1][:, -1:], rtol=0, atol=1e-5)
    assert hook_counts(model) == {}


def test_restored_prob_of_mixed_items_equals_a_full_forward(sharp, prompt_ids):
    """Items at several tokens and sites, including ones that cannot reach the last position."""
    n, samples = prompt_ids.shape[0], 3
    with torch.no_grad():
        answer = int(sharp(prompt_ids[None]).logits[0, -1].argmax())
    items = [("attn_out", 2, 3), ("resid", 3, 4), ("mlp_out", 1, n - 1), ("resid", 2, 6), ("attn_out", 0, 7),
             ("attn_out", 2, n - 1), ("mlp_out", 2, 5)]
    got = restored_prob(sharp, prompt_ids, SPAN, answer, items, samples=samples)
    std = float(sharp.transformer.wte.weight[prompt_ids[SPAN[0]:SPAN[1]]].detach().std())
    nu = torch.randn((samples, SPAN[1] - SPAN[0], 32), generator=torch.Generator().manual_seed(0)) * 3.0 * std
    clean = capture(sharp, prompt_ids[None], sites=("resid", "attn_out", "mlp_out"))

    def corrupt(t):
        t = t.clone()
        t[:, SPAN[0]:SPAN[1]] += nu
        return t

    edits = {("resid", 0): corrupt}
    for site, layer, token in items:
        def restore(t, site=site, layer=layer, token=token, prev=edits.get((site, layer))):
            t = t.clone() if prev is None else prev(t)
            t[:, token] = getattr(clean, site)[layer, 0, token]
            return t

        edits[(site, layer)] = restore
    with torch.no_grad(), patch(sharp, edits):
        logits = sharp(prompt_ids[None].expand(samples, -1)).logits[:, -1]
    assert got == pytest.approx(float(logits.float().softmax(-1)[:, answer].mean()), abs=1e-6)
    assert abs(got - restored_prob(sharp, prompt_ids, SPAN, answer, [], samples=samples)) > 1e-3  # not a no-op


def test_batched_trace_with_eager_attention_equals_a_per_cell_loop(prompt_ids):
    model = make_model(initializer_range=0.3)
    model.set_attn_implementation("eager")
    result = causal_trace_ids(model, prompt_ids, SPAN, kind="attn", window=2, samples=3, batch_size=9)
    ref, _ = per_cell_reference(model, prompt_ids, SPAN, result.answer_id, "attn", 2, 3, 3.0, 0)
    torch.testing.assert_close(result.restored_prob, ref, rtol=0, atol=1e-5)


def test_zero_noise_gives_zero_indirect_effects(sharp, prompt_ids):
    for kind in ("resid", "mlp", "attn"):
        result = causal_trace_ids(sharp, prompt_ids, SPAN, kind=kind, noise=0.0, samples=3)
        assert result.corrupted_prob == pytest.approx(result.clean_prob, abs=1e-6)
        torch.testing.assert_close(result.indirect_effect, torch.zeros_like(result.indirect_effect), rtol=0, atol=1e-6)
        assert result.noise_std == 0.0


def test_restoring_every_layer_at_every_token_restores_the_clean_probability(sharp, prompt_ids):
    result = causal_trace_ids(sharp, prompt_ids, SPAN, samples=5)
    n = prompt_ids.shape[0]
    every = [("resid", layer, token) for layer in range(1, 4) for token in range(n)]
    every += [(site, layer, token) for site in ("mlp_out", "attn_out") for layer in range(3) for token in range(n)]
    assert restored_prob(sharp, prompt_ids, SPAN, result.answer_id, every, samples=5) == pytest.approx(result.clean_prob, abs=1e-6)
    assert restored_prob(sharp, prompt_ids, SPAN, result.answer_id, [], samples=5) == pytest.approx(result.corrupted_prob, abs=1e-6)
    # the last block's output at the last token is the whole clean state there
    assert float(result.restored_prob[-1, -1]) == pytest.approx(result.clean_prob, abs=1e-6)
    # tokens before the subject: restoring them is a no-op (exactly the corrupted probability)
    assert torch.all(result.restored_prob[:, : SPAN[0]] == result.corrupted_prob)


def test_same_noise_for_every_cell_and_seed_batch_size_invariance(sharp, prompt_ids):
    a = causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, samples=3, batch_size=3)
    b = causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, samples=3, batch_size=1000)
    torch.testing.assert_close(a.restored_prob, b.restored_prob, rtol=0, atol=1e-6)
    c = causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, samples=3, seed=1)
    assert not torch.allclose(a.restored_prob, c.restored_prob)
    # "vocab" std and an explicit std give the documented noise scale
    v = causal_trace_ids(sharp, prompt_ids, SPAN, samples=2, embedding_std="vocab", noise=2.0)
    assert v.noise_std == pytest.approx(2.0 * embedding_std(sharp))
    w = causal_trace_ids(sharp, prompt_ids, SPAN, samples=2, embedding_std=0.5)
    assert w.noise_std == pytest.approx(1.5)


def test_result_frame_table_save_load_and_plot(sharp, prompt_ids, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = causal_trace_ids(sharp, prompt_ids, SPAN, kind="attn", window=2, samples=2)
    frame = result.to_frame()
    assert len(frame) == 3 * 9 and frame["is_subject"].sum() == 3 * 3
    assert frame["indirect_effect"].max() == pytest.approx(result.peak[2])
    assert "peak: layer" in result.table() and "*" in result.table()
    result.save(tmp_path / "trace.safetensors")
    loaded = TraceResult.load(tmp_path / "trace.safetensors")
    assert torch.equal(loaded.restored_prob, result.restored_prob) and torch.equal(loaded.input_ids, result.input_ids)
    for name in ("kind", "tokens", "subject_span", "answer_id", "answer", "clean_prob", "corrupted_prob", "noise_std"):
        assert getattr(loaded, name) == getattr(result, name), name
    fig = result.plot()
    assert fig.axes[0].get_title()
    with pytest.raises(ValueError, match="restored_prob has shape"):
        TraceResult(**{**result.__dict__, "restored_prob": torch.zeros(3, 4)})


def test_string_api_finds_the_subject_and_answer(big_vocab, tokenizer):
    prompt = "The Hound of the Baskervilles lived on the moor"
    start, end = subject_span(tokenizer, prompt, "Hound of the")
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids[start:end]).strip() == "Hound of the"
    result = causal_trace(big_vocab, tokenizer, prompt, "Hound of the", answer=" house", samples=2)
    assert result.subject_span == (start, end) and result.answer == " house"
    assert result.tokens[start] == " Hound" and "".join(result.tokens) == prompt
    with pytest.raises(ValueError, match="does not occur in prompt"):
        causal_trace(big_vocab, tokenizer, prompt, "Dracula")
    with pytest.raises(ValueError, match="n_positions=32"):
        causal_trace(big_vocab, tokenizer, "word " * 40 + "Holmes", "Holmes")


def test_bad_inputs_are_named(sharp, prompt_ids):
    with pytest.raises(ValueError, match="window must be >= 1"):
        causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp_out")
    with pytest.raises(ValueError, match="subject_span"):
        causal_trace_ids(sharp, prompt_ids, (4, 12))
    with pytest.raises(ValueError, match="n_positions=40"):
        causal_trace_ids(sharp, torch.zeros(41, dtype=torch.long), (0, 2))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        causal_trace_ids(sharp, prompt_ids, SPAN, samples=0)
    with pytest.raises(ValueError, match="noise must be"):
        causal_trace_ids(sharp, prompt_ids, SPAN, noise=-1.0)
    with pytest.raises(TypeError, match="window must be an int"):
        causal_trace_ids(sharp, prompt_ids, SPAN, window=2.5)
    with pytest.raises(ValueError, match="one prompt"):
        causal_trace_ids(sharp, prompt_ids[None].expand(2, -1), SPAN)
    assert hook_counts(sharp) == {}


def test_trace_many_averages_in_rome_buckets(big_vocab, tokenizer):
    facts = [
        ("Mr. Sherlock Holmes looked at", "Sherlock Holmes", None),
        ("The old Count Dracula said", "Count Dracula", None),
        ("Alice ran after the White Rabbit", "Alice", None),
        ("Alice ran after the", "Alice", " nonsense"),  # not the top-1: skipped
    ]
    summary = trace_many(big_vocab, tokenizer, facts, samples=2, progress=False)
    assert isinstance(summary, TraceSummary) and summary.n_facts == 3 and summary.skipped == (3,)
    assert summary.buckets == BUCKETS and tuple(summary.mean.shape) == (6, 3)
    # counts: every fact has a first/last subject token and a last token; middle only for >2-token subjects
    assert summary.count.tolist()[0] == 3 and summary.count.tolist()[2] == 3 and summary.count.tolist()[5] == 3
    last = torch.stack([r.indirect_effect[:, -1] for r in summary.results])
    torch.testing.assert_close(summary.mean[5], last.mean(0))
    assert torch.all(summary.low[5] <= summary.mean[5]) and torch.all(summary.mean[5] <= summary.high[5])
    assert len(summary.to_frame()) == 6 * 3 and "last token" in summary.table()
    import matplotlib

    matplotlib.use("Agg")
    assert summary.plot().axes[0].get_title().startswith("Average indirect effect")


@pytest.fixture(scope="module")
def second_moment(sharp):
    corpus = torch.randint(0, 97, (40, 30), generator=torch.Generator().manual_seed(4))
    return mlp_key_second_moment(sharp, 1, corpus)


def test_second_moment_is_cached_and_exact(sharp, second_moment, tmp_path):
    corpus = torch.randint(0, 97, (40, 30), generator=torch.Generator().manual_seed(4))
    keys = capture(sharp, corpus, sites="mlp_act").mlp_act[1].reshape(-1, 128).double()
    torch.testing.assert_close(second_moment, (keys.T @ keys / keys.shape[0]).float(), rtol=1e-5, atol=1e-6)
    assert mlp_key_second_moment(sharp, 1, corpus) is not None
    on_disk = mlp_key_second_moment(sharp, 1, corpus[:10], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mom2-*.safetensors"))) == 1
    assert torch.equal(mlp_key_second_moment(sharp, 1, corpus[:10], cache_dir=tmp_path), on_disk)


def test_rank_one_edit_changes_the_top1_and_restores_bit_exactly(sharp, second_moment):
    ids = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = sharp(ids[None]).logits[0, -1]
    old, new = int(logits.argmax()), int(logits.argmin())
    before = model_state(sharp)
    edit = rank_one_edit_ids(sharp, ids, (5, 8), [new], 1, second_moment=second_moment,
                             prefixes=[[1, 2, 3], [4, 5]], kl_ids=ids[5:8].tolist() + [7, 8])
    assert isinstance(edit, RankOneEdit) and not edit.applied
    assert_same_state(before, model_state(sharp))  # computing the edit changes nothing
    assert all(p.grad is None for p in sharp.parameters())
    with edit:
        with torch.no_grad():
            edited = sharp(ids[None]).logits[0, -1]
            res = capture(sharp, ids[None], sites="mlp_out", layers=1)
        assert int(edited.argmax()) == new
        # the bare prompt's MLP output becomes exactly v*
        torch.testing.assert_close(res.mlp_out[0, 0, 7], edit.value, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="already applied"):
            edit.apply()
    assert_same_state(before, model_state(sharp))  # bit-exact restore
    with torch.no_grad():
        assert int(sharp(ids[None]).logits[0, -1].argmax()) == old
    assert hook_counts(sharp) == {}
    with pytest.raises(RuntimeError, match="not applied"):
        edit.restore()
    with pytest.raises(ValueError, match="second_moment must be"):
        rank_one_edit_ids(sharp, ids, (5, 8), [new], 1, second_moment=torch.eye(3))
    with pytest.raises(ValueError, match="out of range"):
        rank_one_edit_ids(sharp, ids, (5, 8), [new], 7, second_moment=second_moment)


def test_rank_one_edit_from_strings(big_vocab, tokenizer, tmp_path):
    prompt, subject = "The capital city of Dracula", "Dracula"
    corpus = ["The count lived in a castle far away. " * 3, "Mr. Holmes looked at the letter and smiled. " * 3]
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        old = int(big_vocab(ids).logits[0, -1].argmax())
    before = model_state(big_vocab)
    edit = rank_one_edit(big_vocab, tokenizer, prompt, subject, " London", 1, stats_corpus=corpus,
                         template_shapes=((3, 2),), steps=25, cache_dir=tmp_path)
    assert edit.info["templates"] == 3
    with edit:
        with torch.no_grad():
            new = int(big_vocab(ids).logits[0, -1].argmax())
    assert tokenizer.decode([new]) == " London" and new != old
    assert_same_state(before, model_state(big_vocab))
    with pytest.raises(ValueError, match="does not occur"):
        rank_one_edit(big_vocab, tokenizer, prompt, "Holmes", " London", 1, stats_corpus=corpus)
    with pytest.raises(FileNotFoundError):
        rank_one_edit(big_vocab, tokenizer, prompt, subject, " London", 1, stats_corpus=tmp_path / "missing.txt")


def test_cli_trace(tmp_path, capsys):
    from reslens.cli import main

    path = tmp_path / "model"
    make_model(vocab_size=50257, n_positions=32, initializer_range=0.3).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    out = tmp_path / "trace.png"
    assert main(["trace", "Mr. Sherlock Holmes", "--subject", "Sherlock", "--kind", "mlp", "--samples", "2",
                 "--model", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "causal trace (MLP)" in printed and "peak: layer" in printed and out.stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["trace", "Mr. Sherlock Holmes", "--subject", "Watson", "--model", str(path)])
