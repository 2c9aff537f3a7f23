"""The one corpus stream (reslens._stream): its edge rule, its batches, its sharding, and one capture for
every lens in compare_lenses."""

from __future__ import annotations

import pytest
import torch

from helpers import make_family
from reslens._distributed import Shard
from reslens._stream import batch_of, batches, limit, stream, units, window_size
from reslens.arch import adapter


class Chars:
    """One id per character (mod 97); a string or a list of them, as HuggingFace tokenizers take."""

    pad_token_id, eos_token_id = None, 0

    def __call__(self, texts, add_special_tokens=False, **_):
        one = isinstance(texts, str)
        ids = [[3 + ord(c) % 90 for c in t] for t in ([texts] if one else texts)]
        if add_special_tokens:
            ids = [[1, *i] for i in ids]
        return {"input_ids": ids[0] if one else ids}


class NoStart(Chars):
    def __call__(self, texts, add_special_tokens=False, **_):
        return super().__call__(texts)


def test_windows_never_cross_texts_and_a_last_window_under_two_tokens_is_dropped():
    got = list(units(NoStart(), ["abcdefg", "hi", "j", "klmno"], max_length=3))
    assert [len(w) for w in got] == [3, 3, 2, 3, 2]  # "g" (1 token) dropped; "j" alone dropped
    assert got[2] == NoStart()("hi")["input_ids"]


def test_max_tokens_cuts_the_last_unit_and_drops_it_under_min_length():
    windows = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(limit(windows, 7)) == [[1, 2, 3], [4, 5, 6]]  # 1 token left: not a unit
    assert list(limit(windows, 8)) == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert list(limit(windows, 7, min_length=1)) == [[1, 2, 3], [4, 5, 6], [7]]
    assert list(limit(windows, None)) == windows
    with pytest.raises(ValueError, match="max_tokens"):
        list(limit(windows, 0))


def test_min_length_one_keeps_every_window_as_cut():
    assert [len(w) for w in units(NoStart(), ["abcdefg", "j"], max_length=3, min_length=1)] == [3, 3, 1, 1]


def test_sentences_are_cut_to_max_length():
    got = list(units(NoStart(), ["A cat sat. It ran away quickly. Ok."], unit="sentence", max_length=6))
    assert [len(s) for s in got] == [6, 6, 3]


def test_one_reading_of_a_text_as_its_tokenizer_gives_it():
    """A text is encoded whole, for an analysis and a corpus pass alike: runs of blank lines are kept
    (the GPT-2 tokenizer reads "\n\n\n" otherwise than "\n\n") and no piece boundary splits it."""
    import reslens

    _, tokenizer = reslens.load_model()
    text = "\n\n\n".join(f"Paragraph {i} says something.\n\nAnd more." for i in range(80))
    whole = [i for w in units(tokenizer, [text], max_length=50, min_length=1) for i in w]
    assert whole == tokenizer(text)["input_ids"]
    squeezed = tokenizer(text.replace("\n\n\n", "\n\n"))["input_ids"]
    assert whole != squeezed


def test_batches_put_the_start_tokens_first_and_mark_them():
    rows = [[5, 6, 7], [8]]
    batch = next(batches(Chars(), rows, 8))
    assert batch.input_ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch.special_mask.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert batch.stat_mask.sum() == 4 and batch.position_ids[1, :2].tolist() == [0, 1]
    plain = next(batches(None, rows, 8))  # ids already: no start token, padded with 0
    assert plain.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and not plain.special_mask.any()
    assert torch.equal(batch_of(rows).input_ids, plain.input_ids)


def test_the_start_tokens_take_room_in_the_context():
    arch = adapter(make_family("llama"))
    assert window_size(arch, (), 1000) == arch.n_ctx and window_size(arch, (1,), 1000) == arch.n_ctx - 1
    assert window_size(arch, (1,), 16) == 16
    with pytest.raises(ValueError, match="no room"):
        window_size(arch, tuple(range(arch.n_ctx)), 16)


def test_shards_take_their_batches_by_number():
    assert list(Shard(None, 1, 3).take("abcdefg")) == [(1, "b"), (4, "e")]
    assert list(Shard(None, 1, 3).take("abcd", first=5)) == [(7, "c")]  # numbers continue a run
    model = make_family("gpt2")
    rows = [[1, 2, 3]] * 5
    seen = [n for n, _, _ in stream(model, batches(None, rows, 1), sites=("resid",), shard=Shard(None, 0, 2))]
    assert seen == [0, 2, 4]


def test_compare_lenses_captures_the_corpus_once_for_every_lens():
    from reslens.lens import lens_stats
    from reslens.lenses import LinearShortcut, TunedLens, compare_lenses

    model = make_family("llama")
    arch = adapter(model)
    gen = torch.Generator().manual_seed(0)
    shape = (arch.n_layer, arch.d_model, arch.d_model)
    shortcut = LinearShortcut(torch.randn(shape, generator=gen) / 6, torch.zeros(shape[:2]))
    tuned = TunedLens(torch.randn(shape, generator=gen) / 20, torch.zeros(shape[:2]))
    lenses = [None, shortcut, tuned]
    text = "the quick brown fox jumps over the lazy dog " * 12
    forwards = []
    handle = arch.body.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        scores = compare_lenses(model, [text], lenses, tokenizer=Chars(), max_tokens=200, max_length=30,
                                batch_size=2, progress=False)
    finally:
        handle.remove()
    windows = list(units(Chars(), [text], max_length=30, max_tokens=200))
    assert len(forwards) == -(-len(windows) // 2)  # one forward per batch, not one per batch and lens
    for k, lens in enumerate(lenses):  # each lens scores what lens_stats alone gives it
        alone = lens_stats(model, list(batches(Chars(), windows, 2)), lens=lens, progress=False)
        assert torch.equal(scores.kl_final_layer[k], alone.mean.kl_final_layer)
        assert torch.equal(scores.cross_entropy[k], -alone.mean.target_logprob)
        assert torch.equal(scores.top1_agreement[k], alone.top1_agreement)
    assert scores.n_tokens == sum(map(len, windows))
