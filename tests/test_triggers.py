"""kv_memory triggers: brute-force mining, the typed and checked index, atomic resumable
snapshots with corpus and model fingerprints, agreement, and the memories command."""

import json

import pytest
import torch

from helpers import VOCAB, hook_counts, make_model, shared_corpus
from reslens import kv_memory as kv
from reslens._corpus import sentences
from reslens._saving import read_safetensors, write_safetensors
from reslens.hooks import capture
from reslens.kv_memory.mining import _order_key
from reslens.kv_memory.triggers import _split_last


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
WINDOWS = dict(unit="window", window=7, top_k=3, batch_size=2, progress=False)


def brute_force_index(model, units, top_k):
    """Every unit alone through the model; per key the top_k (max coefficient, earliest example)."""
    per_unit = [capture(model, torch.tensor([u]), sites="mlp_act").mlp_act[:, 0] for u in units]  # [L, P, D]
    best = torch.stack([a.max(dim=1).values for a in per_unit], dim=-1)  # [L, D, E]
    where = torch.stack([a.max(dim=1).indices for a in per_unit], dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return best.gather(-1, order), order, where.gather(-1, order)


def assert_brute_force(index, model, units, atol=1e-5):
    """The index equals :func:`brute_force_index` up to exact ties that batching's rounding may order
    otherwise (a parallel block's first MLP reads the token alone, so a repeated token ties at layer 0):
    every slot's score is the brute-force one, and a differing example holds, at its position, a
    coefficient of that value, the largest in that example."""
    scores, example, position = brute_force_index(model, units, index.top_k)
    torch.testing.assert_close(index.scores, scores, rtol=0, atol=atol)
    assert bool((index.example.sort(-1).values.diff(dim=-1) != 0).all())  # an example once per key
    for layer, key, slot in ((index.example != example) | (index.position != position)).nonzero().tolist():
        act = capture(model, torch.tensor([units[int(index.example[layer, key, slot])]]), sites="mlp_act")
        act = act.mlp_act[layer, 0, :, key]  # [pos]
        m = float(act[int(index.position[layer, key, slot])])
        assert m == pytest.approx(float(scores[layer, key, slot]), abs=atol)
        assert m == pytest.approx(float(act.max()), abs=atol)


def window_units(texts, window):
    units = []
    for text in texts:
        ids = [ord(c) % VOCAB for c in text]
        units += [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
    return units


def assert_same_index(a, b):
    for name in ("scores", "example", "position", "example_ids", "example_offsets", "example_tokens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("n_examples", "n_tokens", "corpus_fingerprint"):
        assert getattr(a, name) == getattr(b, name), name


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
    assert isinstance(t, kv.Trigger) and t.rank == 0
    assert list(t.prefix) == units[t.example][: t.position + 1]
    unit = units[t.example]
    assert t.next_token == (unit[t.position + 1] if t.position + 1 < len(unit) else None)
    # only examples some slot refers to are kept
    assert set(index.example_ids.tolist()) == set(index.example.unique().tolist())


def test_order_key_sorts_by_score_then_earlier_example():
    scores = torch.tensor([[float("-inf"), -2.5, -0.0, 0.0, 1e-30, 3.0, 3.0, -1e-30, float("inf")]])
    example = torch.tensor([[-1, 4, 6, 5, 7, 9, 8, 3, 10]])
    order = _order_key(scores, example).topk(9).indices[0].tolist()
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
    full = kv.mine_triggers(model, tok, TEXTS, **WINDOWS)
    path = tmp_path / "idx.safetensors"
    half = kv.mine_triggers(model, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    loaded = kv.TriggerIndex.load(path)
    assert loaded.n_tokens == 56 and torch.equal(loaded.scores, half.scores)
    assert loaded.model_fingerprint == kv.model_fingerprint(model, (0, 1, 2))
    assert len(loaded.corpus_fingerprint) == 64
    resumed = kv.mine_triggers(model, tok, TEXTS, resume=path, **WINDOWS)
    assert_same_index(resumed, full)
    text = resumed.format(1, 3, n=2, tokenizer=tok)
    assert text.count("[[") == 2 and "L1N3" in text
    assert "[[" in resumed.format(1, 3, n=1)  # ids as numbers without a tokenizer
    with pytest.raises(ValueError, match="top_k"):
        kv.mine_triggers(model, tok, TEXTS, **{**WINDOWS, "top_k": 5}, resume=loaded)
    assert "TriggerIndex(" in repr(loaded) and len(repr(loaded)) < 200 and "<table>" in loaded._repr_html_()
    assert not hasattr(loaded, "_tokenizer")


def test_an_interrupted_snapshot_leaves_the_last_good_one(model, tmp_path, monkeypatch):
    """Issue 18 item 3 (a): a write that dies half-way (here: garbage written, then an interrupt)
    leaves the previous snapshot intact, and resuming from it gives the one-pass index."""
    import safetensors.torch

    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    full = kv.mine_triggers(model, tok, TEXTS, **WINDOWS)
    kv.mine_triggers(model, tok, TEXTS, max_tokens=30, out=path, **WINDOWS)
    good = path.read_bytes()
    real_save = safetensors.torch.save_file

    def dies_while_writing(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)  # half a file
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        kv.mine_triggers(model, tok, TEXTS, resume=path, out=path, save_every=10, **WINDOWS)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["idx.safetensors"]
    resumed = kv.mine_triggers(model, tok, TEXTS, resume=path, out=path, save_every=10, **WINDOWS)
    assert_same_index(resumed, full)
    assert_same_index(kv.TriggerIndex.load(path), full)


def test_resume_refuses_another_corpus(model, tmp_path):
    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    kv.mine_triggers(model, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    other = [TEXTS[1], TEXTS[0], *TEXTS[2:]]  # same texts, another order: another corpus
    with pytest.raises(ValueError, match="are not the ones the index read"):
        kv.mine_triggers(model, tok, other, resume=path, **WINDOWS)
    with pytest.raises(ValueError, match="this corpus holds 2 windows"):
        kv.mine_triggers(model, tok, ["abcdefghij"], resume=path, **WINDOWS)
    edited = [TEXTS[0].replace("cat", "rat"), *TEXTS[1:]]
    with pytest.raises(ValueError, match="corpus fingerprint"):
        kv.mine_triggers(model, tok, edited, resume=path, **WINDOWS)
    longer = [*TEXTS, "more text appended at the end"]
    kv.mine_triggers(model, tok, longer, resume=path, **WINDOWS)  # a longer corpus is fine


def test_resume_refuses_other_reading_options(model, tmp_path):
    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    kv.mine_triggers(model, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    with pytest.raises(ValueError, match="unit, window"):
        kv.mine_triggers(model, tok, TEXTS, resume=path, **{**WINDOWS, "window": 8})
    with pytest.raises(ValueError, match="unit, window"):
        kv.mine_triggers(model, tok, TEXTS, resume=path, **{**WINDOWS, "unit": "sentence"})


def test_resume_refuses_another_model_of_the_same_shape(model, tmp_path):
    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    kv.mine_triggers(model, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    other = make_model(seed=1)
    with pytest.raises(ValueError, match="other weights"):
        kv.mine_triggers(other, tok, TEXTS, resume=path, **WINDOWS)
    weight = model.transformer.h[1].mlp.c_fc.weight
    kept = weight.detach().clone()
    with torch.no_grad():  # one weight behind the keys nudged
        weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="other weights"):
        kv.mine_triggers(model, tok, TEXTS, resume=path, **WINDOWS)
    with pytest.raises(ValueError, match="other weights"):
        kv.agreement(kv.TriggerIndex.load(path), other)
    with torch.no_grad():  # the last block's values do not shape the keys: still the same index
        weight.copy_(kept)
        model.transformer.h[2].mlp.c_proj.weight[0, 0] += 1.0
    kv.mine_triggers(model, tok, TEXTS, resume=path, **WINDOWS)


def _tamper(path, out, *, meta=None, tensors=None):
    t, m = read_safetensors(path)
    m = {**m, **{k: json.dumps(v) for k, v in (meta or {}).items()}}
    write_safetensors(out, {**t, **(tensors or {})}, m)
    return out


def test_tampered_counts_are_refused(model, tmp_path):
    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    index = kv.mine_triggers(model, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    last = int(index.example_ids.max())
    cases = {
        "n_examples": dict(meta={"n_examples": last}),
        "n_tokens": dict(meta={"n_tokens": len(index.example_tokens) - 1}),
        "top_k": dict(meta={"top_k": 2}),
        "offsets": dict(tensors={"example_offsets": index.example_offsets + 1}),
        "twice": dict(tensors={"example": index.example.clone().index_fill_(-1, torch.tensor([1]), int(
            index.example[0, 0, 0]))}),
        "position": dict(tensors={"position": index.position.clone().fill_(8)}),
        "unsorted": dict(tensors={"scores": index.scores.flip(-1).contiguous()}),
    }
    for name, change in cases.items():
        bad = _tamper(path, tmp_path / f"{name}.safetensors", **change)
        with pytest.raises(ValueError, match="inconsistent TriggerIndex"):
            kv.TriggerIndex.load(bad)
    # a count that still fits the tensors is caught when resuming: the corpus re-read disagrees
    more = _tamper(path, tmp_path / "more.safetensors", meta={"n_tokens": index.n_tokens + 5})
    with pytest.raises(ValueError, match="cannot resume"):
        kv.mine_triggers(model, tok, TEXTS, resume=more, **WINDOWS)


def test_an_old_two_file_index_folder_is_refused_with_a_reason(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "index.json").write_text('{"format": "reslens.TriggerIndex/1"}')
    with pytest.raises(ValueError, match="old two-file format"):
        kv.TriggerIndex.load(folder)
    with pytest.raises(ValueError, match="cannot load"):
        kv.TriggerIndex.load(tmp_path / "missing.safetensors")


def test_mining_reads_files_and_folders(model, tmp_path):
    for i, text in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    options = dict(unit="window", window=9, top_k=2, progress=False)
    from_folder = kv.mine_triggers(model, CharTokenizer(), tmp_path, **options)
    from_list = kv.mine_triggers(model, CharTokenizer(), TEXTS, **options)
    assert torch.equal(from_folder.example, from_list.example)
    assert from_folder.corpus_fingerprint == from_list.corpus_fingerprint  # what was read, from wherever
    one = kv.mine_triggers(model, CharTokenizer(), tmp_path / "0.txt", **options)
    assert one.n_tokens == sum(map(len, window_units(TEXTS[:1], 9)))


@pytest.mark.parametrize(
    "corpus, kwargs, error, match",
    [
        ("/no/such/corpus", {}, FileNotFoundError, "neither a file nor a folder"),
        ("", {}, ValueError, "empty path"),
        (123, {}, TypeError, "corpus must be"),
        ([b"bytes"], {}, TypeError, "corpus item 0"),
        (["x"], {}, ValueError, "no unit of at least 2 tokens"),
        (TEXTS, {"unit": "paragraph"}, ValueError, "unit must be"),
        (TEXTS, {"top_k": 0}, ValueError, "top_k=0"),
        (TEXTS, {"top_k": True}, TypeError, "top_k must be an int"),
        (TEXTS, {"window": 41}, ValueError, "window=41"),
        (TEXTS, {"window": 0}, ValueError, "window=0"),
        (TEXTS, {"layers": [3]}, ValueError, "out of range"),
        (TEXTS, {"max_tokens": 0}, ValueError, "max_tokens=0"),
        (TEXTS, {"max_tokens": -5}, ValueError, "max_tokens=-5"),
        (TEXTS, {"max_tokens": 10.0}, TypeError, "max_tokens must be an int"),
        (TEXTS, {"batch_size": 0}, ValueError, "batch_size=0"),
        (TEXTS, {"save_every": 0}, ValueError, "save_every=0"),
        (TEXTS, {"progress": "no"}, TypeError, "progress"),
        (TEXTS, {"out": ""}, TypeError, "out must be a file path"),
    ],
)
def test_mining_bad_input(model, corpus, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.mine_triggers(model, CharTokenizer(), corpus, **{"progress": False, **kwargs})
    assert hook_counts(model) == {}


def test_mining_refuses_a_folder_as_out_before_the_work(model, tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        kv.mine_triggers(model, CharTokenizer(), TEXTS, out=tmp_path, **WINDOWS)


def test_empty_corpus_path_does_not_mine_the_current_folder(model, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty path"):
        kv.mine_triggers(model, CharTokenizer(), "", **WINDOWS)
    kv.mine_triggers(model, CharTokenizer(), ".", **WINDOWS)  # the current folder, said explicitly


# --- agreement ------------------------------------------------------------------------------------


def hand_index(model):
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
    return kv.TriggerIndex(
        layers=(1,), top_k=top_k, scores=torch.where(example >= 0, 0.0, float("-inf")), example=example,
        position=position, example_ids=torch.tensor(order), example_offsets=lengths,
        example_tokens=torch.tensor([t for e in order for t in examples[e]]), n_examples=21, n_tokens=62,
        unit="window", window=8, n_layer=3, d_model=32, d_vocab=VOCAB,
    )


def test_agreement_hand_computed(model):
    result = kv.agreement(hand_index(model), model)
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
    hits = [float((tops == nexts[torch.randperm(20, generator=gen)]).float().mean()) for _ in range(100)]
    expected = sum(hits) / 100
    assert float(result.shuffled[0]) == pytest.approx(expected, abs=1e-6)
    assert list(result.to_frame()["agreement"]) == [0.5]


def test_a_hand_built_index_is_checked(model):
    index = hand_index(model)
    with pytest.raises(ValueError, match="empty slots"):
        kv.TriggerIndex(**{**index.__dict__, "scores": torch.zeros(1, 128, 2)})
    with pytest.raises(ValueError, match="more than n_tokens"):
        kv.TriggerIndex(**{**index.__dict__, "n_tokens": 10})
    twice = {name: getattr(index, name).clone() for name in ("scores", "example", "position")}
    for name, t in twice.items():
        t[0, 0, 1] = t[0, 0, 0]  # key 0 lists example 0 twice (the symptom of a re-merged resume)
    with pytest.raises(ValueError, match="same example twice"):
        kv.TriggerIndex(**{**index.__dict__, **twice})


def test_agreement_on_a_mined_index(model, tmp_path):
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=2, progress=False)
    result = kv.agreement(index, model)
    assert result.agreement.shape == (3,) and result.rank.shape == (3, 128)
    assert "layer" in result.table() and "<table>" in result._repr_html_() and len(repr(result)) < 200
    result.save(tmp_path / "a.safetensors")
    back = kv.KeyValueAgreement.load(tmp_path / "a.safetensors")
    assert back.layers == result.layers and torch.equal(back.rank, result.rank)
    other = make_model(n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="mined on a model"):
        kv.agreement(index, other)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_shuffles": -1}, ValueError, "n_shuffles=-1"),
        ({"n_shuffles": 0}, ValueError, "n_shuffles=0"),
        ({"chunk_size": 0}, ValueError, "chunk_size=0"),
        ({"through_final_norm": 1}, TypeError, "through_final_norm"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_agreement_bad_input(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        kv.agreement(hand_index(model), model, **kwargs)


def test_agreement_plot_draws_the_same_panels_on_given_axes(model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = kv.agreement(hand_index(model), model)
    own = result.plot()
    fig = plt.figure()
    given = result.plot(ax=fig.subplots(1, 2))
    assert given is fig and len(own.axes) == len(given.axes) == 2
    assert [a.get_title() for a in own.axes] == [a.get_title() for a in given.axes]
    with pytest.raises(TypeError, match="pair of matplotlib axes"):
        result.plot(ax=plt.figure().subplots())
    plt.close("all")


# --- the command and the embedded model ------------------------------------------------------------

def test_memories_command(tmp_path, capsys):
    from reslens.cli import main

    assert main(["memories", "Mr. Holmes sat by the fire with his", "--layer", "3", "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert "block 3, last token ' his'" in printed and printed.count("L3N") == 4
    assert main(["memories", "Mr. Holmes sat by the fire with his", "--layer", "1", "--token", " pipe"]) == 0
    assert "Δlogit ' pipe'" in capsys.readouterr().out

    corpus = tmp_path / "c.txt"
    corpus.write_text("The old man walked to the sea. He sat down. " * 40, encoding="utf-8")
    out, figure = tmp_path / "index.safetensors", tmp_path / "agree.png"
    mine = ["memories", "--mine", str(corpus), "--out", str(out), "--top-k", "5"]
    assert main([*mine, "--max-tokens", "150"]) == 0
    captured = capsys.readouterr()
    assert "TriggerIndex(" in captured.out and "resuming" not in captured.err and out.is_file()
    assert main([*mine, "--max-tokens", "300", "--figure", str(figure)]) == 0
    captured = capsys.readouterr()
    assert f"resuming {out}:" in captured.err and "tokens) of 1 file(s)" in captured.err
    assert "agreement" in captured.out and figure.read_bytes()[:4] == b"\x89PNG"
    assert main(["memories", "--index", str(out), "--show", "2.7", "--n", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model: embedded GPT-2 (4 layers") and printed.count("[[") == 3
    assert printed.splitlines()[1].startswith("L2N7: top 3")

    other = tmp_path / "other.txt"
    other.write_text("A different book entirely, with other words. " * 40, encoding="utf-8")
    assert main(["memories", "--mine", str(other), "--out", str(out), "--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and err.count("\n") == 2  # the resume line, then the refusal


MINE_C = ["memories", "--mine", "{tmp}/c.txt"]


@pytest.mark.parametrize("argv, message", [
    (["memories"], "exactly one of"),
    (["memories", "--index", "{tmp}/index.safetensors"], "--show LAYER.KEY"),
    (["memories", "--index", "{tmp}/index.safetensors", "--show", "7"], "LAYER.KEY"),
    (["memories", "--index", "{tmp}/missing.safetensors", "--show", "1.2"], "no such file"),
    (["memories", "--index", "{tmp}/index.safetensors", "--show", "9.2"], "was not mined"),
    (["memories", "--mine", "{tmp}/missing", "--out", "{tmp}/i.safetensors"], "neither a file nor a folder"),
    (["memories", "--mine", "{tmp}/c.txt"], "--out FILE"),
    ([*MINE_C, "--out", "{tmp}/i.safetensors", "--max-tokens", "0"], "--max-tokens"),
    ([*MINE_C, "--out", "{tmp}/i.safetensors", "--max-tokens", "-5"], "--max-tokens"),
    (["memories", "--mine", "{tmp}/c.txt", "--out", "{tmp}/broken.safetensors"], "cannot load"),
    (["memories", "text", "--show", "1.2"], "--show goes with --index"),
])
def test_memories_arguments_are_checked_before_the_model_loads(argv, message, model, tmp_path, capsys,
                                                                monkeypatch):
    import reslens
    import reslens.models
    from reslens.cli import main

    (tmp_path / "c.txt").write_text("Some text. " * 20)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    kv.mine_triggers(model, CharTokenizer(), TEXTS, out=tmp_path / "index.safetensors", **WINDOWS)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(reslens.models, "load_model", no_loading)
    monkeypatch.setattr(reslens, "load_model", no_loading, raising=False)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_embedded_values_agree_with_triggers_above_chance():
    """Real structure: some layer's values predict the token after their keys' top triggers far
    more often than a random token would (1/|V|)."""
    import reslens

    book = shared_corpus() / "46-a-christmas-carol.txt"
    model, tokenizer = reslens.load_model()
    index = kv.mine_triggers(model, tokenizer, book, max_tokens=20_000, progress=False)
    result = kv.agreement(index, model)
    assert float(result.agreement.max()) > 20 * result.baseline


def test_split_last_shows_whole_characters():
    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    quote = list("“".encode())  # three bytes
    assert _split_last(Bytes().decode, [*b"said, ", *quote]) == ("said, ", "“")
    assert _split_last(Bytes().decode, [*b"ab"]) == ("a", "b")


def test_mining_and_resuming_in_every_family(family_model, tmp_path):
    """The mined top-k equals running every unit alone (signed by default for a gated MLP, as GPT-2's
    max-m ranking otherwise), and an interrupted run resumes to it."""
    from reslens.arch import adapter

    arch = adapter(family_model)
    tok, path = CharTokenizer(), tmp_path / "idx.safetensors"
    full = kv.mine_triggers(arch, tok, TEXTS, **WINDOWS)
    assert full.signed == arch.gated_mlp
    units = window_units(TEXTS, 7)
    if arch.gated_mlp:
        assert_signed_brute_force(full, family_model, units)
    else:
        assert_brute_force(full, family_model, units)
    kv.mine_triggers(arch, tok, TEXTS, max_tokens=60, out=path, **WINDOWS)
    assert_same_index(kv.mine_triggers(arch, tok, TEXTS, resume=path, **WINDOWS), full)
    result = kv.agreement(full, arch)
    assert result.rank.shape == (arch.n_layer, arch.d_mlp)


# --- gated MLPs: signed triggers, the bottom token, start tokens ------------------------------------


def signed_brute_force_index(model, units, top_k, start=()):
    """Every unit alone (after the ``start`` ids, left out); per example the coefficient of largest |m|
    (the positive one on a tie) at its first position; per key the top_k by |m|, ties to the earlier
    example. Returns ``(scores, example, position)`` of the top_k and every unit's ``[L, P, D]`` m."""
    best, where, acts = [], [], []
    for u in units:
        act = capture(model, torch.tensor([[*start, *u]]), sites="mlp_act").mlp_act[:, 0, len(start):]
        high, low = act.max(dim=1).values, act.min(dim=1).values
        signed = torch.where(high >= -low, high, low)  # [L, D]
        best.append(signed)
        where.append((act == signed[:, None, :]).int().argmax(dim=1))
        acts.append(act)
    best, where = torch.stack(best, dim=-1), torch.stack(where, dim=-1)  # [L, D, E]
    order = torch.sort(best.abs(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    return best.gather(-1, order), order, where.gather(-1, order), acts


def assert_signed_brute_force(index, model, units, start=(), atol=1e-5):
    """The index equals the signed brute force, up to exact ties that batching's rounding may order
    otherwise: every slot's score is the brute-force one, and its example and position hold a
    coefficient of that value, of largest |m| in that example."""
    scores, example, position, acts = signed_brute_force_index(model, units, index.top_k, start)
    torch.testing.assert_close(index.scores, scores, rtol=0, atol=atol)
    differ = (index.example != example) | (index.position != position)
    assert float(differ.float().mean()) < 0.02  # ties are rare
    for layer, key, slot in differ.nonzero().tolist():
        act = acts[int(index.example[layer, key, slot])][layer, :, key]
        m = float(act[int(index.position[layer, key, slot])])
        assert m == pytest.approx(float(scores[layer, key, slot]), abs=atol)
        assert abs(m) == pytest.approx(float(act.abs().max()), abs=atol)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [2, 64])
def test_signed_top_k_equals_a_brute_force_sort_of_abs_m(family, batch_size):
    """Signed mining (the default for gated MLPs; an opt-in for GPT-2) equals sorting |m| over all units,
    with the sign kept; a gated MLP's top triggers are negative about half the time."""
    from helpers import make_family

    model = make_family(family)
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=4,
                             batch_size=batch_size, signed=True, progress=False)
    assert_signed_brute_force(index, model, window_units(TEXTS, 9))
    scores = signed_brute_force_index(model, window_units(TEXTS, 9), 4)[0]
    assert index.signed and bool((index.scores.abs().diff(dim=-1) <= 0).all())
    negative = float((index.scores[..., 0] < 0).float().mean())
    if family != "gpt2":
        assert 0.3 < negative < 0.7
    t = index.triggers(1, 2)[0]
    assert t.score == pytest.approx(float(scores[1, 2, 0]), abs=1e-5)


def test_unsigned_mining_of_a_gated_mlp_is_an_explicit_opt_out():
    from helpers import make_family

    model = make_family("llama")
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, unit="window", window=9, top_k=4, signed=False,
                             progress=False)
    scores, example, _ = brute_force_index(model, window_units(TEXTS, 9), 4)
    assert not index.signed and torch.equal(index.example, example)
    torch.testing.assert_close(index.scores, scores, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="signed"):
        kv.mine_triggers(model, CharTokenizer(), TEXTS, signed="yes", progress=False)


def test_resume_refuses_another_sign_convention(tmp_path):
    from helpers import make_family

    model, path = make_family("llama"), tmp_path / "idx.safetensors"
    kv.mine_triggers(model, CharTokenizer(), TEXTS, max_tokens=60, out=path, **WINDOWS)
    with pytest.raises(ValueError, match="signed"):
        kv.mine_triggers(model, CharTokenizer(), TEXTS, resume=path, signed=False, **WINDOWS)


def test_a_signed_index_must_descend_in_magnitude():
    from helpers import make_family

    index = kv.mine_triggers(make_family("llama"), CharTokenizer(), TEXTS, **WINDOWS)
    scores = index.scores.clone()
    scores[0, 0] = torch.tensor([0.1, -0.5, 0.05])
    with pytest.raises(ValueError, match=r"\|scores\| must descend"):
        kv.TriggerIndex(**{**index.__dict__, "scores": scores})
    scores[0, 0] = torch.tensor([-0.5, 0.4, -0.1])  # descending in |m|, not in m: fine when signed
    kv.TriggerIndex(**{**index.__dict__, "scores": scores})
    with pytest.raises(ValueError, match="scores must descend"):
        kv.TriggerIndex(**{**index.__dict__, "scores": scores, "signed": False})


def signed_hand_index(model, signed=True):
    """A tiny Llama's layer 1, where the answer is known: keys 0-9 have a negative top trigger followed by
    the value's bottom token, keys 10-19 a negative one followed by its top token, keys 20-29 a positive
    one followed by its top token; the rest are empty."""
    values = model.model.layers[1].mlp.down_proj.weight.T  # [d_mlp, d_model]: the values
    scores_v = (values @ model.lm_head.weight.T).detach()  # [d_mlp, vocab] = W_U v
    top, bottom = scores_v.argmax(-1), scores_v.argmin(-1)
    d_mlp, top_k = values.shape[0], 2
    example = torch.full((1, d_mlp, top_k), -1)
    position = torch.full((1, d_mlp, top_k), -1)
    scores = torch.full((1, d_mlp, top_k), float("-inf"))
    tokens = []
    for key in range(30):
        nxt = int(bottom[key]) if key < 10 else int(top[key])
        tokens.append([5, 6, nxt])  # the trigger is the token at position 1
        example[0, key, 0], position[0, key, 0] = key, 1
        scores[0, key, 0] = -2.0 if key < 20 else 2.0
    lengths = torch.tensor([0] + [len(t) for t in tokens]).cumsum(0)
    return kv.TriggerIndex(
        layers=(1,), top_k=top_k, scores=scores, example=example, position=position,
        example_ids=torch.arange(30), example_offsets=lengths,
        example_tokens=torch.tensor([t for u in tokens for t in u]), n_examples=30, n_tokens=90,
        unit="window", window=8, n_layer=3, d_model=32, d_vocab=VOCAB, signed=signed,
    )


def test_agreement_reads_the_bottom_token_where_the_top_trigger_is_negative(tmp_path):
    from helpers import make_family

    model = make_family("llama")
    result = kv.agreement(signed_hand_index(model), model)
    values = model.model.layers[1].mlp.down_proj.weight.T
    scores_v = (values @ model.lm_head.weight.T).detach()
    assert result.negative[0, :20].all() and not result.negative[0, 20:].any()
    assert result.n_keys.tolist() == [30] and result.n_negative().tolist() == [20]
    assert result.agreement.tolist() == [pytest.approx(20 / 30)]  # keys 0-9 and 20-29 agree
    assert torch.equal(result.value_top[0, :20], scores_v[:20].argmin(-1))
    assert torch.equal(result.value_top[0, 20:30], scores_v[20:30].argmax(-1))
    assert result.rank[0, :10].tolist() == [0] * 10  # the bottom token, counted from the bottom
    assert result.rank[0, 10:20].tolist() == [VOCAB - 1] * 10  # the top token is last from the bottom
    assert result.rank[0, 20:30].tolist() == [0] * 10
    assert "m < 0" in result.table() and list(result.to_frame()["negative_keys"]) == [20]
    # the other side: keys 10-19 (m < 0, followed by the value's top token) push the next token down
    assert torch.equal(result.value_other[0, :20], scores_v[:20].argmax(-1))
    assert torch.equal(result.value_other[0, 20:30], scores_v[20:30].argmin(-1))
    assert result.opposite().tolist() == [pytest.approx(10 / 30)]
    path = tmp_path / "agreement.safetensors"
    result.save(path)
    assert torch.equal(kv.KeyValueAgreement.load(path).negative, result.negative)
    signed_hand_index(model).save(tmp_path / "index.safetensors")
    back = kv.TriggerIndex.load(tmp_path / "index.safetensors")
    assert back.signed and back.start_ids == () and torch.equal(back.scores, signed_hand_index(model).scores)
    # the same triggers in an unsigned index: every key reads its top token, as Geva et al. (and GPT-2)
    unsigned = kv.agreement(signed_hand_index(model, signed=False), model)
    assert not unsigned.negative.any() and unsigned.agreement.tolist() == [pytest.approx(20 / 30)]
    assert unsigned.rank[0, :10].tolist() == [VOCAB - 1] * 10 and unsigned.rank[0, 10:30].eq(0).all()
    assert unsigned.opposite().tolist() == [pytest.approx(10 / 30)]  # keys 0-9: the bottom token follows


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_agreement_on_a_signed_mined_index_equals_brute_force(family):
    """value_top is each value's argmax of W_U v, or its argmin where the top trigger's m < 0 (raw, and
    through the final RMSNorm, where final_norm(-v) = -final_norm(v))."""
    from helpers import make_family
    from reslens.arch import adapter

    model = make_family(family)
    arch = adapter(model)
    index = kv.mine_triggers(model, CharTokenizer(), TEXTS, **WINDOWS)
    units = window_units(TEXTS, 7)
    for through in (False, True):
        result = kv.agreement(index, model, through_final_norm=through)
        for r, layer in enumerate(index.layers):
            v = arch.mlp_weights(layer).W_out.float()
            scores = (arch.norm("final")(v) if through else v) @ arch.W_U.float().T
            neg = index.scores[r, :, 0] < 0
            assert torch.equal(result.negative[r], neg)
            expected = torch.where(neg, scores.argmin(-1), scores.argmax(-1))
            assert torch.equal(result.value_top[r], expected)
            tops = zip(index.example[r, :, 0].tolist(), index.position[r, :, 0].tolist())
            nxt = torch.tensor([units[e][p + 1] if p + 1 < len(units[e]) else -1 for e, p in tops])
            assert torch.equal(result.next_token[r], nxt)
            assert float(result.agreement[r]) == pytest.approx(float(((expected == nxt) & (nxt >= 0)).sum())
                                                               / int((nxt >= 0).sum()))


class BosTokenizer(CharTokenizer):
    """Adds a BOS (id 1) in front of a text when asked for special tokens, as Llama tokenizers do."""

    def __call__(self, texts, add_special_tokens=False):
        out = super().__call__(texts)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [1, *ids] if isinstance(texts, str) else [[1, *i] for i in ids]
        return out


def test_the_tokenizers_start_token_goes_first_and_is_left_out():
    """A tokenizer that adds a BOS: every unit runs after it (as the model expects), and the BOS position
    is never a trigger: the index equals running [BOS] + unit alone and dropping position 0."""
    from helpers import make_family

    model = make_family("llama")
    index = kv.mine_triggers(model, BosTokenizer(), TEXTS, **WINDOWS)
    assert index.start_ids == (1,)
    units = window_units(TEXTS, 7)
    assert_signed_brute_force(index, model, units, start=(1,))  # [BOS] + unit alone, BOS dropped
    assert index.n_tokens == sum(map(len, units))  # the BOS is not counted
    t = index.triggers(0, 0)[0]
    assert list(t.prefix) == units[t.example][: t.position + 1]  # no BOS inside the stored examples
    plain = kv.mine_triggers(model, CharTokenizer(), TEXTS, **WINDOWS)
    assert plain.start_ids == () and not torch.equal(plain.scores, index.scores)
    with pytest.raises(ValueError, match="start_ids"):  # a resume must use the same start tokens
        kv.mine_triggers(model, CharTokenizer(), TEXTS, resume=index, **WINDOWS)


def test_a_list_of_files_is_a_corpus(model, tmp_path):
    a, b = tmp_path / "b.txt", tmp_path / "a.txt"
    a.write_text(TEXTS[0], encoding="utf-8")
    b.write_text(TEXTS[1], encoding="utf-8")
    index = kv.mine_triggers(model, CharTokenizer(), [a, b], **WINDOWS)  # in the order given, not by name
    strings = kv.mine_triggers(model, CharTokenizer(), TEXTS[:2], **WINDOWS)
    assert_same_index(index, strings)
    assert "2 file(s)" in index.corpus and "b.txt, a.txt" in index.corpus
    with pytest.raises(FileNotFoundError, match=r"corpus\[1\]"):
        kv.mine_triggers(model, CharTokenizer(), [a, tmp_path / "missing.txt"], **WINDOWS)
