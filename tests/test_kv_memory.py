"""kv_memory: exact decompositions against HuggingFace, brute-force mining, agreement, edits."""

from pathlib import Path

import pytest
import torch

from helpers import VOCAB, assert_same_state, hook_counts, make_model, model_state
from reslens import kv_memory as kv
from reslens._corpus import sentences
from reslens.hooks import capture, pad_ids


class CharTokenizer:
    """One token per character (ids mod the tiny vocabulary); enough for mining tests."""

    pad_token_id, eos_token_id = None, 0

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [[ord(c) % VOCAB for c in t] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


TEXTS = [
    "The cat sat on the mat. It was warm! Was it? Mr. Smith said yes.",
    "A dog ran far away from home and never came back to the old farm again",
    "short",
    "Another text. With two sentences of different lengths, to pad.",
]


@pytest.fixture
def acts(model, ids):
    return capture(model, ids, sites=("resid", "resid_mid", "mlp_act", "mlp_out", "logits"))


def test_keys_and_values_are_the_conv1d_columns_and_rows(model):
    for layer in range(3):
        mlp = model.transformer.h[layer].mlp
        assert torch.equal(kv.keys(model, layer)[7], mlp.c_fc.weight[:, 7])
        assert torch.equal(kv.values(model, layer)[7], mlp.c_proj.weight[7])
        assert kv.keys(model, layer).shape == kv.values(model, layer).shape == (128, 32)


def test_coefficients_come_from_the_keys(model, acts):
    """m = gelu(ln_2(resid_mid) @ keys.T + b): the accessor's orientation reproduces HF's activation."""
    from transformers.activations import ACT2FN

    for layer in range(3):
        block = model.transformer.h[layer]
        pre = block.ln_2(acts.resid_mid[layer]) @ kv.keys(model, layer).T + block.mlp.c_fc.bias
        torch.testing.assert_close(ACT2FN["gelu_new"](pre), kv.coefficients(acts, layer), rtol=0, atol=1e-5)


def test_memories_sum_to_mlp_out(model, acts):
    for layer in range(3):
        out = kv.coefficients(acts, layer) @ kv.values(model, layer) + model.transformer.h[layer].mlp.c_proj.bias
        torch.testing.assert_close(out, acts.mlp_out[layer], rtol=0, atol=1e-5)
        c = kv.contributions(model, acts, layer, position=4, seq=1)
        torch.testing.assert_close(c.updates.sum(0) + c.bias, acts.mlp_out[layer, 1, 4], rtol=0, atol=1e-5)
        torch.testing.assert_close(c.total(), acts.mlp_out[layer, 1, 4], rtol=0, atol=1e-5)


def test_magnitude_ranking_equals_brute_force(model, acts):
    c = kv.contributions(model, acts, 2, position=-1, seq=2)
    m = acts.mlp_act[2, 2, -1]
    v = model.transformer.h[2].mlp.c_proj.weight.detach()
    brute = [(abs(float(m[i])) * float(v[i].norm()), i) for i in range(128)]
    expected = [i for _, i in sorted(brute, key=lambda t: -t[0])]
    assert c.order.tolist()[:20] == expected[:20]
    assert c.top(3)[0][0] == expected[0]
    assert c.rank_by == "magnitude" and c.token_effect is None


def test_token_ranking_raw_and_through_ln_f(model, acts):
    token = 17
    c = kv.contributions(model, acts, 1, position=-1, seq=0, token=token)
    m, v, e = acts.mlp_act[1, 0, -1], model.transformer.h[1].mlp.c_proj.weight, model.lm_head.weight[token]
    brute = torch.stack([m[i] * (v[i] @ e) for i in range(128)])
    torch.testing.assert_close(c.token_effect, brute, rtol=0, atol=1e-6)
    assert c.order.tolist() == torch.sort(brute, descending=True, stable=True).indices.tolist()

    lin = kv.contributions(model, acts, 1, position=-1, seq=0, token=token, through_ln_f=True)
    x = acts.resid[3, 0, -1]  # the final raw residual at that position
    ln = model.transformer.ln_f
    sigma = torch.sqrt(x.var(unbiased=False) + ln.eps)
    update = acts.mlp_out[1, 0, -1] - model.transformer.h[1].mlp.c_proj.bias
    expected = (ln.weight * (update - update.mean()) / sigma) @ e  # ln_f with its scale frozen here
    torch.testing.assert_close(lin.token_effect.sum(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(lin.token_effect, c.token_effect)


def test_positions_count_real_tokens_in_padded_batches(model):
    batch = pad_ids([[5, 6, 7, 8, 9], [10, 11]], padding_side="left")
    acts = capture(model, batch, sites=("mlp_act", "mlp_out"))
    alone = capture(model, torch.tensor([[10, 11]]), sites=("mlp_act", "mlp_out"))
    c = kv.contributions(model, acts, 0, position=-1, seq=1)
    assert c.position == 4
    torch.testing.assert_close(c.total(), alone.mlp_out[0, 0, -1], rtol=0, atol=1e-5)
    assert kv.contributions(model, acts, 0, position=0, seq=1).position == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layer=3), ValueError, "out of range"),
        (dict(layer=1, position=11), ValueError, "position=11 is out of range"),
        (dict(layer=1, seq=3), ValueError, "seq=3"),
        (dict(layer=1, token=97), ValueError, "vocabulary id"),
        (dict(layer=1, rank_by="token"), ValueError, "needs token="),
        (dict(layer=1, rank_by="size"), ValueError, "rank_by"),
        (dict(layer="1"), TypeError, "layer"),
    ],
)
def test_contributions_bad_input(model, acts, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.contributions(model, acts, **kwargs)


def test_through_ln_f_needs_the_final_residual(model, ids):
    acts = capture(model, ids, sites=("mlp_act",))
    with pytest.raises(ValueError, match="final raw residual"):
        kv.contributions(model, acts, 0, token=3, through_ln_f=True)
    with pytest.raises(ValueError, match="no 'mlp_act'"):
        kv.coefficients(capture(model, ids, sites="resid"), 0)


@pytest.mark.parametrize("through_ln_f", [False, True])
def test_value_tokens_equal_brute_force(model, through_ln_f):
    vt = kv.value_tokens(model, 2, [3, 0, 127], k=5, through_ln_f=through_ln_f, chunk_size=2)
    v = model.transformer.h[2].mlp.c_proj.weight[[3, 0, 127]]
    if through_ln_f:
        v = model.transformer.ln_f(v)
    scores = v @ model.lm_head.weight.T
    assert torch.equal(vt.top_ids, scores.topk(5).indices)
    assert torch.equal(vt.bottom_ids, scores.topk(5, largest=False).indices)
    torch.testing.assert_close(vt.top_scores, scores.topk(5).values)
    assert vt.convention == ("W_U ln_f(v)" if through_ln_f else "W_U v")
    assert len(vt.to_frame()) == 3 * 2 * 5
    with pytest.raises(ValueError, match="outside 0..127"):
        kv.value_tokens(model, 2, [128])


# --- mining ---------------------------------------------------------------------------------------


def brute_force_index(model, units, top_k):
    """Every unit alone through the model; per key the top_k (max coefficient, earliest example)."""
    per_unit = [capture(model, torch.tensor([u]), sites="mlp_act").mlp_act[:, 0] for u in units]  # [L, P, D]
    best = torch.stack([a.max(dim=1).values for a in per_unit], dim=-1)  # [L, D, E]
    where = torch.stack([a.max(dim=1).indices for a in per_unit], dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return best.gather(-1, order), order, where.gather(-1, order)


def window_units(texts, window):
    units = []
    for text in texts:
        ids = [ord(c) % VOCAB for c in text]
        units += [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
    return units


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_mined_top_k_equals_brute_force(model, batch_size):
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=4,
                             batch_size=batch_size, progress=False)
    units = window_units(TEXTS, 9)
    scores, example, position = brute_force_index(model, units, 4)
    assert index.n_examples == len(units) and index.n_tokens == sum(map(len, units))
    torch.testing.assert_close(index.scores, scores, rtol=0, atol=1e-5)
    assert torch.equal(index.example, example)
    assert torch.equal(index.position, position)
    t = index.triggers(2, 5)[0]
    assert t["prefix"] == units[t["example"]][: t["position"] + 1]
    # only examples some slot refers to are kept
    assert set(index.example_ids.tolist()) == set(index.example.unique().tolist())


def test_order_key_sorts_by_score_then_earlier_example():
    scores = torch.tensor([[float("-inf"), -2.5, -0.0, 0.0, 1e-30, 3.0, 3.0, -1e-30, float("inf")]])
    example = torch.tensor([[-1, 4, 6, 5, 7, 9, 8, 3, 10]])
    order = kv._order_key(scores, example).topk(9).indices[0].tolist()
    expected = sorted(range(9), key=lambda i: (-float(scores[0, i]), int(example[0, i])))
    assert order == expected


def test_sentences_are_split_and_mined(model):
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="sentence", top_k=3, progress=False)
    found = [s for t in TEXTS for s in sentences(t)]
    assert "Mr. Smith said yes." in found and "Was it?" in found
    units = [[ord(c) % VOCAB for c in s][:40] for s in found]  # cut to the context (40)
    _, example, _ = brute_force_index(model, units, 3)
    assert torch.equal(index.example, example)


def test_layers_and_max_tokens(model):
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, layers=[2], top_k=2,
                             max_tokens=40, progress=False)
    assert index.layers == (2,) and index.scores.shape == (1, 128, 2)
    assert index.n_tokens == 36  # four whole windows of 9; units are never cut
    with pytest.raises(ValueError, match="was not mined"):
        index.triggers(0, 1)


def test_save_load_and_resume_equal_one_pass(model, tmp_path):
    tok = CharTokenizer()
    full = kv.mine_triggers(model, tok, TEXTS, unit="window", window=7, top_k=3, batch_size=2, progress=False)
    half = kv.mine_triggers(model, tok, TEXTS, unit="window", window=7, top_k=3, batch_size=2, max_tokens=60,
                            out=tmp_path / "idx", progress=False)
    loaded = kv.TriggerIndex.load(tmp_path / "idx", tokenizer=tok)
    assert loaded.n_tokens == 56 and torch.equal(loaded.scores, half.scores)
    resumed = kv.mine_triggers(model, tok, TEXTS, unit="window", window=7, top_k=3, batch_size=2,
                               resume=tmp_path / "idx", progress=False)
    assert resumed.n_examples == full.n_examples and resumed.n_tokens == full.n_tokens
    assert torch.equal(resumed.example, full.example)
    torch.testing.assert_close(resumed.scores, full.scores, rtol=0, atol=1e-6)
    text = resumed.format(1, 3, n=2)
    assert text.count("[[") == 2 and "L1N3" in text
    with pytest.raises(ValueError, match="top_k"):
        kv.mine_triggers(model, tok, TEXTS, unit="window", window=7, top_k=5, resume=loaded, progress=False)


def test_mining_reads_files_and_folders(model, tmp_path):
    for i, text in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    from_folder = kv.mine_triggers(model, CharTokenizer(), tmp_path, unit="window", window=9, top_k=2, progress=False)
    from_list = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=2, progress=False)
    assert torch.equal(from_folder.example, from_list.example)
    one = kv.mine_triggers(model, CharTokenizer(), tmp_path / "0.txt", unit="window", window=9, top_k=2, progress=False)
    assert one.n_tokens == sum(map(len, window_units(TEXTS[:1], 9)))


@pytest.mark.parametrize(
    "corpus, kwargs, error, match",
    [
        ("/no/such/corpus", {}, FileNotFoundError, "neither a file nor a folder"),
        (123, {}, TypeError, "corpus must be"),
        ([b"bytes"], {}, TypeError, "corpus item 0"),
        (["x"], {}, ValueError, "no unit of at least 2 tokens"),
        (TEXTS, {"unit": "paragraph"}, ValueError, "unit must be"),
        (TEXTS, {"top_k": 0}, ValueError, "top_k must be"),
        (TEXTS, {"window": 41}, ValueError, "window must be"),
        (TEXTS, {"layers": [3]}, ValueError, "out of range"),
        (TEXTS, {"max_tokens": 0}, ValueError, "max_tokens"),
    ],
)
def test_mining_bad_input(model, corpus, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.mine_triggers(model, CharTokenizer(), corpus, progress=False, **kwargs)
    assert hook_counts(model) == {}


# --- agreement, deletion neurons ------------------------------------------------------------------


def test_agreement_hand_computed(model):
    """Layer 1: keys 0-9 are followed by their value's top token, keys 10-19 by its bottom token,
    key 20's trigger ends its example; the rest are empty."""
    d_mlp, top_k = 128, 2
    scores = (model.transformer.h[1].mlp.c_proj.weight @ model.lm_head.weight.T).detach()  # [d_mlp, vocab]
    top, bottom = scores.argmax(-1), scores.argmin(-1)
    examples = {}
    example = torch.full((1, d_mlp, top_k), -1)
    position = torch.full((1, d_mlp, top_k), -1)
    for key in range(21):
        nxt = [int(top[key])] if key < 10 else ([int(bottom[key])] if key < 20 else [])
        examples[key] = [1, 2] + nxt  # the trigger is the token at position 1
        example[0, key, 0], position[0, key, 0] = key, 1
    order = sorted(examples)
    lengths = torch.tensor([0] + [len(examples[e]) for e in order]).cumsum(0)
    index = kv.TriggerIndex(
        layers=(1,), top_k=top_k, scores=torch.zeros(1, d_mlp, top_k), example=example, position=position,
        example_ids=torch.tensor(order), example_offsets=lengths,
        example_tokens=torch.tensor([t for e in order for t in examples[e]]), n_examples=21, n_tokens=62,
        unit="window", window=8, model_info=kv._model_info(kv.GPT2(model)),
    )
    result = kv.agreement(index, model)
    assert result.n_keys.tolist() == [20]
    assert result.agreement.tolist() == [0.5]
    assert result.rank[0, :10].tolist() == [0] * 10
    assert result.rank[0, 10:20].tolist() == [VOCAB - 1] * 10
    assert result.rank[0, 20:].eq(-1).all()
    assert result.baseline == 1 / VOCAB
    # shuffled baseline: value tops paired with other keys' next tokens; equals a direct count
    valid = result.next_token[0] >= 0
    tops, nexts = result.value_top[0, valid], result.next_token[0, valid]
    gen = torch.Generator().manual_seed(0)
    expected = sum(float((tops == nexts[torch.randperm(20, generator=gen)]).float().mean()) for _ in range(100)) / 100
    assert float(result.shuffled[0]) == pytest.approx(expected, abs=1e-6)
    assert list(result.to_frame()["agreement"]) == [0.5]


def test_agreement_on_a_mined_index(model):
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=2, progress=False)
    result = kv.agreement(index, model)
    assert result.agreement.shape == (3,) and result.rank.shape == (3, 128)
    assert "layer" in result.table()
    other = make_model(n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="mined on a model"):
        kv.agreement(index, other)


def test_deletion_neurons(model):
    before = kv.deletion_neurons(model)
    k, g = model.transformer.h[0].mlp.c_fc.weight[:, 5], model.transformer.h[0].ln_2.weight
    v = model.transformer.h[0].mlp.c_proj.weight[5]
    torch.testing.assert_close(before.cos[0, 5], torch.nn.functional.cosine_similarity(k * g, v, dim=0))
    edited = make_model()
    with torch.no_grad():
        edited.transformer.h[2].mlp.c_proj.weight[9] = -3 * k * g
        edited.transformer.h[2].mlp.c_fc.weight[:, 9] = k
    result = kv.deletion_neurons(edited)
    assert result.most_negative(1) == [(2, 9, pytest.approx(-1.0, abs=1e-5))]
    assert result.most_negative(1, layer=0)[0][0] == 0
    assert result.cos.shape == (3, 128) and len(result.to_frame()) == 3 * 128
    assert "L2N9" in result.table()


# --- coefficient edits ----------------------------------------------------------------------------


def test_edit_moves_mlp_out_by_delta_times_value(model, ids):
    clean = capture(model, ids, sites=("mlp_act", "mlp_out"))
    before = model_state(model)
    with kv.edit_coefficients(model, {1: {4: 2.0, 9: None}}):
        edited = capture(model, ids, sites=("mlp_act", "mlp_out"))
    v = model.transformer.h[1].mlp.c_proj.weight
    delta = (2.0 - clean.mlp_act[1, ..., 4])[..., None] * v[4] + (0.0 - clean.mlp_act[1, ..., 9])[..., None] * v[9]
    torch.testing.assert_close(edited.mlp_out[1], clean.mlp_out[1] + delta, rtol=0, atol=1e-5)
    assert torch.equal(edited.mlp_out[0], clean.mlp_out[0])
    assert hook_counts(model) == {}
    assert_same_state(before, model_state(model))


def test_edit_at_chosen_positions(model, ids):
    clean = capture(model, ids, sites="mlp_act")
    with kv.edit_coefficients(model, {0: {3: 7.0}}, positions=[2, -1]):
        edited = capture(model, ids, sites="mlp_act", layers=[0])
    assert edited.mlp_act[0, :, [2, 10], 3].eq(7.0).all()
    assert torch.equal(edited.mlp_act[0, :, :2], clean.mlp_act[0, :, :2])


@pytest.mark.parametrize(
    "edits, error, match",
    [
        ({}, TypeError, "non-empty mapping"),
        ({3: {0: 1.0}}, ValueError, "out of range"),
        ({0: {128: 1.0}}, ValueError, "outside 0..127"),
        ({0: {1: "big"}}, TypeError, "number or None"),
        ({0: [1]}, TypeError, "mapping"),
    ],
)
def test_edit_bad_input(model, edits, error, match):
    with pytest.raises(error, match=match):
        kv.edit_coefficients(model, edits)
    assert hook_counts(model) == {}


def test_edit_removes_hooks_on_exceptions(model, ids):
    with pytest.raises(RuntimeError, match="inside"):
        with kv.edit_coefficients(model, {0: {1: None}}):
            raise RuntimeError("inside")
    assert hook_counts(model) == {}


# --- the command and the embedded model ------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"  # ../shared/corpus, as in CI


def test_memories_command(tmp_path, capsys):
    from reslens.cli import main

    assert main(["memories", "Mr. Holmes sat by the fire with his", "--layer", "3", "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert "block 3, last token ' his'" in printed and printed.count("L3N") == 4
    assert main(["memories", "Mr. Holmes sat by the fire with his", "--layer", "1", "--token", " pipe"]) == 0
    assert "Δlogit ' pipe'" in capsys.readouterr().out

    corpus = tmp_path / "c.txt"
    corpus.write_text("The old man walked to the sea. He sat down. " * 40, encoding="utf-8")
    out, figure = tmp_path / "index", tmp_path / "agree.png"
    assert main(["memories", "--mine", str(corpus), "--out", str(out), "--max-tokens", "300", "--top-k", "5",
                 "--figure", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "TriggerIndex(" in printed and "agreement" in printed
    assert (out / "index.json").is_file() and figure.read_bytes()[:4] == b"\x89PNG"
    assert main(["memories", "--index", str(out), "--show", "2.7", "--n", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("L2N7: top 3") and printed.count("[[") == 3
    with pytest.raises(SystemExit, match="exactly one of"):
        main(["memories"])
    with pytest.raises(SystemExit, match="LAYER.KEY"):
        main(["memories", "--index", str(out), "--show", "7"])


def test_embedded_values_agree_with_triggers_above_chance():
    """Real structure: some layer's values predict the token after their keys' top triggers far
    more often than a random token would (1/|V|)."""
    import reslens

    model, tokenizer = reslens.load_model()
    index = kv.mine_triggers(model, tokenizer, CORPUS / "46-a-christmas-carol.txt", max_tokens=20_000, progress=False)
    result = kv.agreement(index, model)
    assert float(result.agreement.max()) > 20 * result.baseline


def test_split_last_shows_whole_characters():
    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    quote = list("“".encode())  # three bytes
    assert kv._split_last(Bytes().decode, [*b"said, ", *quote]) == ("said, ", "“")
    assert kv._split_last(Bytes().decode, [*b"ab"]) == ("a", "b")
