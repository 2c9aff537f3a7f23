"""reslens.tracing: batched causal tracing equals a per-cell loop of forwards; results save, load and show."""

import pytest
import torch
from transformers import AutoTokenizer

from helpers import assert_same_state, hook_counts, make_model, model_state
from reslens.arch import adapter
from reslens.hooks import capture, patch
from reslens.models import embedded_model_dir
from reslens.tracing import (
    BUCKETS,
    Noise,
    TraceResult,
    TraceSummary,
    causal_trace,
    causal_trace_ids,
    embedding_std,
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
    arch = adapter(model)
    n_layer, n = arch.n_layer, ids.shape[0]
    start, end = span
    std = float(arch.W_E_in[ids[start:end]].detach().std())  # as rows enter the residual: Gemma scales them
    gen = torch.Generator().manual_seed(seed)
    nu = torch.randn((samples, end - start, arch.d_model), generator=gen) * noise * std
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
    result = causal_trace_ids(
        sharp, prompt_ids, SPAN, kind=kind, window=window, noise=Noise(samples=4), batch_size=7
    )
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
    model = make_model(initializer_range=0.3)
    model.set_attn_implementation(impl)
    g = adapter(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    resid = capture(model, ids, sites="resid").resid  # [n_layer + 1, 2, 9, d]
    for layer in range(g.n_layer):
        k, v = g.attention_kv(layer, resid[layer], start=0)
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
    items = [
        ("attn_out", 2, 3),
        ("resid", 3, 4),
        ("mlp_out", 1, n - 1),
        ("resid", 2, 6),
        ("attn_out", 0, 7),
        ("attn_out", 2, n - 1),
        ("mlp_out", 2, 5),
    ]
    got = restored_prob(sharp, prompt_ids, SPAN, answer, items, noise=Noise(samples=samples))
    std = float(adapter(sharp).W_E[prompt_ids[SPAN[0] : SPAN[1]]].detach().std())
    nu = torch.randn((samples, SPAN[1] - SPAN[0], 32), generator=torch.Generator().manual_seed(0)) * 3.0 * std
    clean = capture(sharp, prompt_ids[None], sites=("resid", "attn_out", "mlp_out"))

    def corrupt(t):
        t = t.clone()
        t[:, SPAN[0] : SPAN[1]] += nu
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
    assert (
        abs(got - restored_prob(sharp, prompt_ids, SPAN, answer, [], noise=Noise(samples=samples))) > 1e-3
    )  # not a no-op


def test_batched_trace_with_eager_attention_equals_a_per_cell_loop(prompt_ids):
    model = make_model(initializer_range=0.3)
    model.set_attn_implementation("eager")
    result = causal_trace_ids(
        model, prompt_ids, SPAN, kind="attn", window=2, noise=Noise(samples=3), batch_size=9
    )
    ref, _ = per_cell_reference(model, prompt_ids, SPAN, result.answer_id, "attn", 2, 3, 3.0, 0)
    torch.testing.assert_close(result.restored_prob, ref, rtol=0, atol=1e-5)


def test_zero_noise_gives_zero_indirect_effects(sharp, prompt_ids):
    for kind in ("resid", "mlp", "attn"):
        result = causal_trace_ids(sharp, prompt_ids, SPAN, kind=kind, noise=Noise(scale=0.0, samples=3))
        assert result.corrupted_prob == pytest.approx(result.clean_prob, abs=1e-6)
        torch.testing.assert_close(
            result.indirect_effect, torch.zeros_like(result.indirect_effect), rtol=0, atol=1e-6
        )
        assert result.noise_std == 0.0


def test_restoring_every_layer_at_every_token_restores_the_clean_probability(sharp, prompt_ids):
    result = causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(samples=5))
    n = prompt_ids.shape[0]
    every = [("resid", layer, token) for layer in range(1, 4) for token in range(n)]
    every += [
        (site, layer, token) for site in ("mlp_out", "attn_out") for layer in range(3) for token in range(n)
    ]
    assert restored_prob(
        sharp, prompt_ids, SPAN, result.answer_id, every, noise=Noise(samples=5)
    ) == pytest.approx(result.clean_prob, abs=1e-6)
    assert restored_prob(
        sharp, prompt_ids, SPAN, result.answer_id, [], noise=Noise(samples=5)
    ) == pytest.approx(result.corrupted_prob, abs=1e-6)
    # the last block's output at the last token is the whole clean state there
    assert float(result.restored_prob[-1, -1]) == pytest.approx(result.clean_prob, abs=1e-6)
    # tokens before the subject: restoring them is a no-op (exactly the corrupted probability)
    assert torch.all(result.restored_prob[:, : SPAN[0]] == result.corrupted_prob)


def test_same_noise_for_every_cell_and_seed_batch_size_invariance(sharp, prompt_ids):
    a = causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, noise=Noise(samples=3), batch_size=3)
    b = causal_trace_ids(
        sharp, prompt_ids, SPAN, kind="mlp", window=2, noise=Noise(samples=3), batch_size=1000
    )
    torch.testing.assert_close(a.restored_prob, b.restored_prob, rtol=0, atol=1e-6)
    c = causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, noise=Noise(samples=3, seed=1))
    assert not torch.allclose(a.restored_prob, c.restored_prob)
    # "vocab" std and an explicit std give the documented noise scale
    v = causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(samples=2, embedding_std="vocab", scale=2.0))
    assert v.noise_std == pytest.approx(2.0 * embedding_std(sharp))
    w = causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(samples=2, embedding_std=0.5))
    assert w.noise_std == pytest.approx(1.5)


def test_result_frame_table_save_load_and_plot(sharp, prompt_ids, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = causal_trace_ids(sharp, prompt_ids, SPAN, kind="attn", window=2, noise=Noise(samples=2))
    frame = result.to_frame()
    assert len(frame) == 3 * 9 and frame["is_subject"].sum() == 3 * 3
    assert frame["indirect_effect"].max() == pytest.approx(result.peak[2])
    assert "peak: layer" in result.table() and "*" in result.table()
    result.save(tmp_path / "trace.safetensors")
    loaded = TraceResult.load(tmp_path / "trace.safetensors")
    assert torch.equal(loaded.restored_prob, result.restored_prob) and torch.equal(
        loaded.input_ids, result.input_ids
    )
    for name in (
        "kind",
        "tokens",
        "subject_span",
        "answer_id",
        "answer",
        "clean_prob",
        "corrupted_prob",
        "noise_std",
    ):
        assert getattr(loaded, name) == getattr(result, name), name
    fig = result.plot()
    assert fig.axes[0].get_title()
    with pytest.raises(ValueError, match="restored_prob has shape"):
        TraceResult(**{**result.__dict__, "restored_prob": torch.zeros(3, 4)})


@pytest.mark.filterwarnings("ignore:answer=' house' is far from the model's own prediction")  # a random model
def test_string_api_finds_the_subject_and_answer(big_vocab, tokenizer):
    prompt = "The Hound of the Baskervilles lived on the moor"
    start, end = subject_span(tokenizer, prompt, "Hound of the")
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids[start:end]).strip() == "Hound of the"
    result = causal_trace(
        big_vocab, tokenizer, prompt, "Hound of the", answer=" house", noise=Noise(samples=2)
    )
    assert result.subject_span == (start, end) and result.answer == " house"
    assert result.tokens[start] == " Hound" and "".join(result.tokens) == prompt
    with pytest.raises(ValueError, match="does not occur in prompt"):
        causal_trace(big_vocab, tokenizer, prompt, "Dracula")
    with pytest.raises(ValueError, match="n_ctx=32"):
        causal_trace(big_vocab, tokenizer, "word " * 40 + "Holmes", "Holmes")


def test_bad_inputs_are_named(sharp, prompt_ids):
    with pytest.raises(ValueError, match="window=0 is out of range"):
        causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp_out")
    with pytest.raises(ValueError, match="subject_span"):
        causal_trace_ids(sharp, prompt_ids, (4, 12))
    with pytest.raises(ValueError, match="n_ctx=40"):
        causal_trace_ids(sharp, torch.zeros(41, dtype=torch.long), (0, 2))
    with pytest.raises(ValueError, match="samples=0 is out of range"):
        causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(samples=0))
    with pytest.raises(ValueError, match="scale=-1.0 is out of range"):
        causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(scale=-1.0))
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
    summary = trace_many(big_vocab, tokenizer, facts, noise=Noise(samples=2), progress=False)
    assert isinstance(summary, TraceSummary) and summary.n_facts == 3 and summary.skipped == (3,)
    assert summary.buckets == BUCKETS and tuple(summary.mean.shape) == (6, 3)
    # counts: every fact has a first/last subject token and a last token; middle only for >2-token subjects
    assert (
        summary.count.tolist()[0] == 3 and summary.count.tolist()[2] == 3 and summary.count.tolist()[5] == 3
    )
    last = torch.stack([r.indirect_effect[:, -1] for r in summary.results])
    torch.testing.assert_close(summary.mean[5], last.mean(0))
    assert torch.all(summary.low[5] <= summary.mean[5]) and torch.all(summary.mean[5] <= summary.high[5])
    assert len(summary.to_frame()) == 6 * 3 and "last token" in summary.table()
    lines = summary.interval_table().splitlines()  # one line per layer: mean±half-width in each bucket
    half = float(summary.high[5, 1] - summary.low[5, 1]) / 2
    assert lines[4].split()[0] == "1"  # layer 1, the last token's bucket last
    assert lines[4].split()[-1] == f"{float(summary.mean[5, 1]):.3f}±{half:.3f}"
    assert lines[-1].startswith("peak of last token: layer ")
    assert len(summary.interval_table(layers=[2]).splitlines()) == 3 + 1 + int((summary.count > 0).sum())
    import matplotlib

    matplotlib.use("Agg")
    assert summary.plot().axes[0].get_title().startswith("Average indirect effect")


def test_cli_trace(tmp_path, capsys):
    from reslens.cli import main

    path = tmp_path / "model"
    make_model(vocab_size=50257, n_positions=32, initializer_range=0.3).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    out = tmp_path / "trace.png"
    assert (
        main(
            [
                "trace",
                "Mr. Sherlock Holmes",
                "--subject",
                "Sherlock",
                "--kind",
                "mlp",
                "--samples",
                "2",
                "--model",
                str(path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "causal trace (MLP)" in printed and "peak: layer" in printed and out.stat().st_size > 0
    assert main(["trace", "Mr. Sherlock Holmes", "--subject", "Watson", "--model", str(path)]) == 2
    assert "does not occur" in capsys.readouterr().err
    # a multi-token answer and a negative noise are one-line errors with exit code 2, not tracebacks
    assert (
        main(
            [
                "trace",
                "Mr. Sherlock Holmes",
                "--subject",
                "Sherlock",
                "--answer",
                " zebra",
                "--model",
                str(path),
            ]
        )
        == 2
    )
    assert "2 tokens" in capsys.readouterr().err
    assert (
        main(["trace", "Mr. Sherlock", "--subject", "Sherlock", "--noise", "-1", "--model", str(path)]) == 2
    )
    assert "scale=-1.0" in capsys.readouterr().err


def test_a_multi_token_answer_is_refused_not_cut_to_its_first_token(big_vocab, tokenizer):
    prompt = "The Hound of the Baskervilles lived on the moor"
    assert len(tokenizer(" zebra")["input_ids"]) == 2
    with pytest.raises(ValueError, match=r"answer=' zebra' is 2 tokens \['.*not one.*e.g. answer=' z'"):
        causal_trace(big_vocab, tokenizer, prompt, "Hound", answer=" zebra", noise=Noise(samples=2))
    with pytest.raises(ValueError, match="answer is an empty string"):
        causal_trace(big_vocab, tokenizer, prompt, "Hound", answer="", noise=Noise(samples=2))


def test_trace_many_counts_a_multi_token_answer_only_when_the_model_gives_all_of_it(big_vocab, tokenizer):
    prompt, subject = "Mr. Sherlock Holmes looked at", "Sherlock Holmes"
    with torch.no_grad():
        top1 = int(big_vocab(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].argmax())
    first = tokenizer.decode([top1])
    two = first + " zebra"  # starts with the top-1, then a token the model does not give
    assert tokenizer(two, add_special_tokens=False)["input_ids"][0] == top1
    facts = [(prompt, subject, first), (prompt, subject, two)]
    summary = trace_many(big_vocab, tokenizer, facts, noise=Noise(samples=2), progress=False)
    assert summary.skipped == (1,) and summary.n_facts == 1
    loose = trace_many(
        big_vocab, tokenizer, facts, noise=Noise(samples=2), require_correct=False, progress=False
    )
    assert loose.skipped == () and [r.answer_id for r in loose.results] == [
        top1,
        top1,
    ]  # the first token traced
    torch.testing.assert_close(
        loose.results[1].restored_prob, summary.results[0].restored_prob, rtol=0, atol=0
    )


def test_noise_settings_and_the_older_keywords(sharp, prompt_ids):
    new = causal_trace_ids(
        sharp,
        prompt_ids,
        SPAN,
        kind="mlp",
        window=2,
        noise=Noise(samples=3, scale=2.0, embedding_std=0.4, seed=2),
    )
    with pytest.warns(DeprecationWarning, match="noise=Noise"):
        old = causal_trace_ids(
            sharp, prompt_ids, SPAN, kind="mlp", window=2, samples=3, noise=2.0, embedding_std=0.4, seed=2
        )
    assert torch.equal(old.restored_prob, new.restored_prob) and old.noise_std == new.noise_std == 0.8
    with pytest.warns(DeprecationWarning):
        assert (
            restored_prob(
                sharp, prompt_ids, SPAN, new.answer_id, [], samples=3, noise=2.0, embedding_std=0.4, seed=2
            )
            == new.corrupted_prob
        )
    with pytest.raises(TypeError, match="give the noise settings once"):
        causal_trace_ids(sharp, prompt_ids, SPAN, noise=Noise(), samples=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sample'"):
        causal_trace_ids(sharp, prompt_ids, SPAN, sample=3)
    with pytest.raises(TypeError, match="samples must be an int"):
        Noise(samples=True)
    with pytest.raises(ValueError, match="embedding_std must be one of 'vocab'"):
        Noise(embedding_std="subject")
    with pytest.raises(ValueError, match="embedding_std=-1.0 is out of range"):
        Noise(embedding_std=-1)
    assert Noise(scale=2).scale == 2.0 and isinstance(Noise(embedding_std=1).embedding_std, float)
    with pytest.raises(AttributeError):
        Noise().samples = 3  # frozen


def test_summary_save_load_and_short_reprs(big_vocab, tokenizer, tmp_path):
    facts = [
        ("Mr. Sherlock Holmes looked at", "Sherlock Holmes", None),
        ("The old Count Dracula said", "Count", None),
    ]
    summary = trace_many(
        big_vocab, tokenizer, facts, kind="attn", window=2, noise=Noise(samples=2), progress=False
    )
    summary.save(tmp_path / "sub" / "summary.safetensors")
    loaded = TraceSummary.load(tmp_path / "sub" / "summary.safetensors")
    for name in ("mean", "low", "high", "count"):
        assert torch.equal(getattr(loaded, name).nan_to_num(7.0), getattr(summary, name).nan_to_num(7.0)), (
            name
        )
    assert (loaded.kind, loaded.buckets, loaded.skipped, loaded.clean_prob) == (
        summary.kind,
        summary.buckets,
        summary.skipped,
        summary.clean_prob,
    )
    assert len(loaded.results) == 2
    for a, b in zip(loaded.results, summary.results):
        assert torch.equal(a.restored_prob, b.restored_prob) and a.tokens == b.tokens and a.window == b.window
    for obj in (summary, summary.results[0]):
        assert "tensor" not in repr(obj) and len(repr(obj)) < 300
        assert "<table>" in obj._repr_html_()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "sub" / "summary.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        TraceSummary.load(truncated)
    with pytest.raises(ValueError, match="is not a reslens TraceSummary file"):
        summary.results[0].save(tmp_path / "one.safetensors")
        TraceSummary.load(tmp_path / "one.safetensors")


def test_public_names_of_tracing_and_rome_each_have_one_home():
    import reslens.rome
    import reslens.tracing

    tracing_names = ["KINDS", "BUCKETS", "Noise", "TraceResult", "TraceSummary", "causal_trace",
                     "causal_trace_ids", "restored_prob", "trace_many", "subject_span", "embedding_std",
                     "window_layers"]
    rome_names = ["RankOneEdit", "SecondMoment", "mlp_key_second_moment", "rank_one_edit",
                  "rank_one_edit_ids"]
    for name in tracing_names:
        assert name in reslens.tracing.__all__ and getattr(reslens.tracing, name) is not None, name
    for name in rome_names:
        assert name in reslens.rome.__all__ and getattr(reslens.rome, name) is not None, name
        assert not hasattr(reslens.tracing, name), f"reslens.tracing re-exports rome's {name}"
    with pytest.raises(AttributeError):
        reslens.tracing.no_such_name  # noqa: B018


@pytest.mark.parametrize("kind,window", [("resid", 10), ("attn", 2), ("mlp", 3)])
def test_batched_trace_equals_a_per_cell_loop_in_every_family(family_model, prompt_ids, kind, window):
    """Learned and rotary positions, grouped-query attention, a sliding window, q/k/v biases."""
    before = model_state(family_model)
    result = causal_trace_ids(
        family_model, prompt_ids, SPAN, kind=kind, window=window, noise=Noise(samples=3), batch_size=5
    )
    ref, corrupted = per_cell_reference(
        family_model, prompt_ids, SPAN, result.answer_id, kind, window, 3, 3.0, 0
    )
    torch.testing.assert_close(result.restored_prob, ref, rtol=0, atol=1e-5)
    assert result.corrupted_prob == pytest.approx(corrupted, abs=1e-6)
    assert hook_counts(family_model) == {}
    assert_same_state(before, model_state(family_model))


def bos_first(tokenizer):
    """The GPT-2 tokenizer made to put a BOS (``<|endoftext|>``) before every text, as Llama-2's does."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos = copy.deepcopy(tokenizer)
    bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 50256)]
    )
    return bos


def test_a_tokenizer_that_puts_a_bos_first_gets_it_in_the_trace_outside_the_subject(tokenizer):
    """Llama-family convention: the prompt is read as the tokenizer would give it to the model (BOS first)."""
    from helpers import make_family

    model = make_family("llama", vocab_size=50257)
    bos_tok = bos_first(tokenizer)
    prompt, subject = "The Hound of the Baskervilles lived on", "Hound of the"
    plain = tokenizer(prompt)["input_ids"]
    start, end = subject_span(tokenizer, prompt, subject)
    assert subject_span(bos_tok, prompt, subject) == (start + 1, end + 1)
    assert bos_tok(prompt)["input_ids"] == [50256] + plain

    result = causal_trace(model, bos_tok, prompt, subject, kind="mlp", window=2, noise=Noise(samples=2))
    assert result.input_ids.tolist() == [50256] + plain and result.subject_span == (start + 1, end + 1)
    assert result.tokens[0] == "<|endoftext|>" and "".join(result.tokens[1:]) == prompt
    ref = causal_trace_ids(model, torch.tensor([50256] + plain), (start + 1, end + 1), kind="mlp", window=2,
                           noise=Noise(samples=2))
    assert torch.equal(result.restored_prob, ref.restored_prob) and result.answer_id == ref.answer_id
    # the BOS is never noised: the noise std is that of the subject's own embeddings
    assert result.noise_std == pytest.approx(3 * embedding_std(model, plain[start:end]))

    summary = trace_many(model, bos_tok, [(prompt, subject, None)], kind="mlp", window=2,
                         noise=Noise(samples=2), progress=False)
    assert torch.equal(summary.results[0].restored_prob, result.restored_prob)
    torch.testing.assert_close(summary.mean[2], result.indirect_effect[:, end])  # last subject token, shifted


def test_a_negative_deprecated_noise_number_names_noise(sharp, prompt_ids):
    with pytest.raises(ValueError, match=r"^noise=-1.0 is out of range"):
        causal_trace_ids(sharp, prompt_ids, SPAN, kind="mlp", window=2, noise=-1.0)


@pytest.fixture(scope="module")
def embedded():
    import reslens

    return reslens.load_model()


def test_an_answer_the_model_hardly_expects_is_named_with_the_spaced_form(embedded):
    """``answer="the"`` (no leading space) and an answer far from the model's prediction used to run as if
    fine; the spaced form is suggested when the model gives it ten times the probability."""
    import warnings

    from reslens.rome import rank_one_edit

    model, tokenizer = embedded
    noise = Noise(samples=2)
    with pytest.warns(UserWarning, match=r"answer='the' has p=.* \(rank \d{3,}\) after the prompt, while "
                      r"' the', with the leading space a word takes after a prompt, has p=.*did you mean "
                      r"answer=' the'\?"):
        causal_trace(model, tokenizer, "The capital of France is", "France", answer="the", noise=noise)
    with pytest.warns(UserWarning, match=r"answer=' the' is far from the model's own prediction: p=.*, rank "
                      r"\d{3,} \(its top-1 is ' Fang'.*leave answer=None"):
        causal_trace(model, tokenizer, "said White", "White", answer=" the", noise=noise)
    with pytest.raises(ValueError, match=r"answer='Fang' is 2 tokens.*answer=' Fang' is one"):
        causal_trace(model, tokenizer, "said White", "White", answer="Fang", noise=noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        causal_trace(model, tokenizer, "said White", "White", answer=" Fang", noise=noise)  # its top-1
        causal_trace(model, tokenizer, "said White", "White", noise=noise)
    # ROME's new answer is improbable by design: only the missing space is named
    edit = dict(layer=1, context_templates=["{}"], second_moment="not one")
    with pytest.warns(UserWarning, match=r"new_answer='the' has p=.*did you mean new_answer=' the'\?"):
        with pytest.raises(TypeError):
            rank_one_edit(model, tokenizer, "The capital of France is", "France", "the", **edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError):
            rank_one_edit(model, tokenizer, "The capital of France is", "France", " Rome", **edit)
