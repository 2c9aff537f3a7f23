"""One start-token rule: a text is read as its tokenizer gives it to the model, in every analysis alike.

A tiny word-level tokenizer that puts ``<s>`` (id 1) before every text, as Llama-2/3, Mistral and Gemma
tokenizers do, on a tiny random Llama: the same text must reach the model as the same tokens at the same
positions (hence the same residuals at its real tokens) in ``capture`` (via ``reslens.tokenize``),
``logit_lens``, ``lens_stats`` on text, the PCA experiment, trigger mining, the linear shortcut's corpus
pass, ROME's key statistics and the command line, and the start token must never be scored. A spy on the
model's forward records every row each pass runs; numeric checks compare each pass's result with the same
quantity computed from ``capture(model, tokenize(tokenizer, texts))``.

At 8a9cf64 (before the one corpus stream) ``capture``, ``logit_lens`` and mining already followed the
tokenizer; ``lens_stats`` on text, the PCA experiment, the learned lenses' corpus pass, ROME's statistics
and the command line encoded texts without special tokens, and their tests here fail there.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import reslens
from helpers import N_POSITIONS, make_family
from reslens.arch import adapter
from reslens.lens import lens_of, lens_stats, logit_lens

WORDS = ("the a cat dog bird sat ran flew on under over mat house tree and but then old young red blue green "
         "king queen man woman child saw heard found kept gave took small big . ,").split()


def word_tokenizer(bos: bool = True):
    """A word-level fast tokenizer (ids < 97, the tiny models' vocabulary), ``<s>`` first when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_texts(n: int, low: int, high: int, seed: int = 0) -> list[str]:
    """``n`` texts of ``low..high`` words and full stops."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS[:-2]) for _ in range(rng.randint(low, high))]
        texts.append(" ".join(w + (" ." if i % 6 == 5 else "") for i, w in enumerate(words)))
    return texts


TEXTS = make_texts(5, 12, 24)  # each shorter than a window: one row per text


@pytest.fixture(scope="module")
def model():
    return make_family("llama")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@contextlib.contextmanager
def rows_read(model):
    """Every row the model runs while inside: ``(real token ids, their positions)``."""
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(module, args, kwargs):
        ids, mask, pos = kwargs["input_ids"], kwargs["attention_mask"].bool(), kwargs["position_ids"]
        for r in range(ids.shape[0]):
            rows.append((tuple(ids[r][mask[r]].tolist()), tuple(pos[r][mask[r]].tolist())))

    handle = adapter(model).body.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def expected_rows(tok, texts) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The rows ``reslens.tokenize`` gives the model for ``texts``: start token first, positions from 0."""
    out = set()
    for text in texts:
        ids = reslens.tokenize(tok, text).input_ids[0].tolist()
        out.add((tuple(ids), tuple(range(len(ids)))))
    return out


def reference(model, tok, texts, sites=("resid",)):
    """``(batch, residuals)`` of ``texts`` through ``reslens.tokenize`` and ``capture``."""
    batch = reslens.tokenize(tok, texts)
    return batch, reslens.capture(model, batch, sites=sites)


def test_the_tokenizer_adds_a_start_token_that_tokenize_marks(tok):
    batch = reslens.tokenize(tok, TEXTS[:2])
    assert batch.input_ids[:, 0].tolist() == [1, 1]
    assert batch.special_mask[:, 0].all() and not batch.special_mask[:, 1:].any()
    plain = word_tokenizer(bos=False)
    assert batch.input_ids[0, 1 : int(batch.lengths[0])].tolist() == plain(TEXTS[0])["input_ids"]


def test_capture_and_logit_lens_read_the_start_token(model, tok):
    batch, res = reference(model, tok, TEXTS)
    with rows_read(model) as rows:
        lens = logit_lens(model, TEXTS, tokenizer=tok)
    assert set(rows) == expected_rows(tok, TEXTS)
    assert torch.equal(lens.input_ids.cpu(), batch.input_ids)
    again = lens_of(res, model)
    real = res.stat_mask
    assert torch.allclose(lens.entropy[:, real], again.entropy[:, real], atol=1e-5)


def test_lens_stats_on_text_reads_the_start_token_and_never_scores_it(model, tok):
    batch, _ = reference(model, tok, TEXTS)
    lens = logit_lens(model, batch)
    with rows_read(model) as rows:
        stats = lens_stats(model, TEXTS, tokenizer=tok, batch_size=2, progress=False)
    assert set(rows) == expected_rows(tok, TEXTS)
    real = batch.stat_mask
    assert stats.n_tokens == int(real.sum())  # the start tokens are not scored
    expected = lens.entropy[:, real].double().mean(1).float()
    assert torch.allclose(stats.mean.entropy, expected, rtol=1e-5, atol=1e-6)


def test_a_window_counts_the_start_token_inside_the_models_context(model, tok):
    (text,) = make_texts(1, 90, 90, seed=3)
    ids = word_tokenizer(bos=False)(text)["input_ids"]
    with rows_read(model) as rows:
        lens_stats(model, text, tokenizer=tok, max_length=1000, progress=False)
    assert all(len(r) <= N_POSITIONS and r[0] == 1 for r, _ in rows)
    assert [len(r) for r, _ in rows][:-1] == [N_POSITIONS] * (len(rows) - 1)
    assert [i for r, _ in rows for i in r[1:]] == ids  # windows of the text, in order, none crossed
    assert all(p == tuple(range(len(p))) for _, p in rows)


def test_the_pca_experiment_reads_the_start_token(model, tok):
    from reslens.pca import _stack_pca, pca_experiment

    arch = adapter(model)
    with rows_read(model) as rows:
        exp = pca_experiment(model, tok, TEXTS, n=12, seed=0, min_context=2, batch_size=2, progress=False)
    assert rows and set(rows) <= expected_rows(tok, TEXTS)
    _, res = reference(model, tok, TEXTS)
    seq, pos = exp.examples[:, 0], exp.examples[:, 1] + 1  # one window per text; the start token before
    stacks = res.resid[:, seq, pos].transpose(0, 1)  # [n, n_layer + 1, d_model]
    final = arch.unembed(arch.norm("final")(stacks[:, -1])).argmax(-1)
    assert torch.equal(exp.final_prediction, final)
    ratio = _stack_pca(arch, stacks, final, center=True, normalize=None)["explained_variance_ratio"]
    assert torch.allclose(exp.condition("baseline").explained_variance_ratio, ratio, atol=1e-5)


def test_mining_reads_the_start_token_and_never_ranks_it(model, tok):
    from reslens import kv_memory as kv

    with rows_read(model) as rows:
        index = kv.mine_triggers(model, tok, TEXTS, unit="window", top_k=1, batch_size=2, progress=False)
    assert set(rows) == expected_rows(tok, TEXTS) and index.start_ids == (1,)
    batch, res = reference(model, tok, TEXTS, sites=("mlp_act",))
    act = res.mlp_act[:, batch.stat_mask]  # [n_layer, tokens, d_mlp]: the start tokens left out
    assert torch.allclose(index.scores[:, :, 0].abs(), act.abs().amax(1), atol=1e-6)


def test_the_shortcut_is_fitted_on_the_texts_as_the_tokenizer_gives_them(model, tok):
    from reslens.lenses import fit_shortcut

    with rows_read(model) as rows:
        shortcut = fit_shortcut(model, TEXTS, tokenizer=tok, max_tokens=10_000, batch_size=2, progress=False)
    assert set(rows) == expected_rows(tok, TEXTS)
    batch, _ = reference(model, tok, TEXTS)
    assert shortcut.config["n_tokens"] == int(batch.stat_mask.sum())


def test_rome_key_statistics_read_the_start_token_and_leave_it_out(model, tok):
    from reslens.rome import SecondMoment

    with rows_read(model) as rows:
        stats = SecondMoment.compute(model, 1, TEXTS, tokenizer=tok, batch_size=2)
    assert set(rows) == expected_rows(tok, TEXTS)
    batch, res = reference(model, tok, TEXTS, sites=("mlp_act",))
    k = res.mlp_act[1][batch.stat_mask].double()  # [tokens, d_mlp]
    assert stats.n_tokens == k.shape[0]
    assert torch.allclose(stats.mom2, (k.T @ k / k.shape[0]).float(), atol=1e-6)


@pytest.fixture(scope="module")
def folder(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("bos_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_command_line_reads_the_start_token(model, tok, folder, capsys, tmp_path):
    from reslens.cli import main

    assert main(["lens", TEXTS[0], "--model", str(folder)]) == 0
    named, shown = capsys.readouterr().out.split("\n", 1)  # the first line names the model
    assert named.startswith(f"model: {folder}")
    result = logit_lens(model, TEXTS[0], tokenizer=tok)
    assert shown.strip().startswith(result.table(width=100).strip())  # then what to read from it
    assert result.summary().strip() in shown
    (long,) = make_texts(1, 60, 60, seed=5)
    (tmp_path / "book.txt").write_text(long)
    assert main(["lens", "--file", str(tmp_path / "book.txt"), "--stats", "--max-length", "16",
                 "--model", str(folder)]) == 0
    shown = capsys.readouterr().out.split("\n", 1)[1]
    stats = lens_stats(model, long, tokenizer=tok, max_length=16, progress=False)
    assert shown.strip() == stats.table().strip()


def test_a_tokenizer_that_adds_nothing_reads_the_text_alone(model):
    plain = word_tokenizer(bos=False)
    with rows_read(model) as rows:
        stats = lens_stats(model, TEXTS, tokenizer=plain, progress=False)
    ids = [tuple(plain(t)["input_ids"]) for t in TEXTS]
    assert set(rows) == {(i, tuple(range(len(i)))) for i in ids}
    assert stats.n_tokens == sum(map(len, ids))
