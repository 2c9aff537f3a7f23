"""reslens.rome: ROME's key statistics (SecondMoment) and rank-one edit are exact, explicit and reversible."""

import copy
import logging

import pytest
import torch
from transformers import AutoTokenizer

from helpers import assert_same_state, hook_counts, make_model, model_state
from reslens.arch import adapter
from reslens.hooks import capture, patch
from reslens.models import embedded_model_dir
from reslens.rome import RankOneEdit, SecondMoment, mlp_key_second_moment, rank_one_edit, rank_one_edit_ids


@pytest.fixture(scope="module")
def sharp():
    """A tiny random GPT-2 with larger weights, so edits move probabilities."""
    return make_model(initializer_range=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def big_vocab():
    """A tiny random model with the real GPT-2 vocabulary, for the string API."""
    return make_model(vocab_size=50257, n_positions=32, initializer_range=0.3)


CORPUS = torch.randint(0, 97, (40, 30), generator=torch.Generator().manual_seed(4))
IDS = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(3))


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
    ids = IDS
    with torch.no_grad():
        logits = sharp(ids[None]).logits[0, -1]
    old, new = int(logits.argmax()), int(logits.argmin())
    before = model_state(sharp)
    edit = rank_one_edit_ids(
        sharp,
        ids,
        (5, 8),
        [new],
        1,
        second_moment=second_moment,
        prefixes=[[1, 2, 3], [4, 5]],
        kl_ids=ids[5:8].tolist() + [7, 8],
    )
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
    with pytest.raises(ValueError, match="ridge=-1.0 is out of range"):
        rank_one_edit_ids(sharp, ids, (5, 8), [new], 1, second_moment=second_moment, ridge=-1)


def test_rank_one_edit_from_strings(big_vocab, tokenizer, tmp_path):
    prompt, subject = "The capital city of Dracula", "Dracula"
    corpus = [
        "The count lived in a castle far away. " * 3,
        "Mr. Holmes looked at the letter and smiled. " * 3,
    ]
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        old = int(big_vocab(ids).logits[0, -1].argmax())
    before = model_state(big_vocab)
    edit = rank_one_edit(
        big_vocab,
        tokenizer,
        prompt,
        subject,
        " London",
        1,
        stats_corpus=corpus,
        template_shapes=((3, 2),),
        steps=25,
        cache_dir=tmp_path,
    )
    assert edit.info["templates"] == 3
    with edit:
        with torch.no_grad():
            new = int(big_vocab(ids).logits[0, -1].argmax())
    assert tokenizer.decode([new]) == " London" and new != old
    assert_same_state(before, model_state(big_vocab))
    with pytest.raises(ValueError, match="does not occur"):
        rank_one_edit(big_vocab, tokenizer, prompt, "Holmes", " London", 1, stats_corpus=corpus)
    with pytest.raises(FileNotFoundError):
        rank_one_edit(
            big_vocab, tokenizer, prompt, subject, " London", 1, stats_corpus=tmp_path / "missing.txt"
        )


# --- SecondMoment: explicit, saved, loaded, never shared -----------------------------------


@pytest.fixture(scope="module")
def stats(sharp):
    return SecondMoment.compute(sharp, 1, CORPUS)


def test_second_moment_object_equals_the_function_and_saves(sharp, stats, second_moment, tmp_path):
    assert (stats.layer, stats.n_tokens, stats.d_mlp) == (1, 40 * 30, 128) and len(stats.weights) == 40
    assert torch.equal(stats.mom2, second_moment)
    assert stats.matches(sharp) and not stats.matches(make_model(seed=1, initializer_range=0.3))
    stats.save(tmp_path / "new" / "mom2.safetensors")  # the folder is created
    loaded = SecondMoment.load(tmp_path / "new" / "mom2.safetensors")
    assert torch.equal(loaded.mom2, stats.mom2) and (loaded.layer, loaded.n_tokens, loaded.weights) == (
        stats.layer,
        stats.n_tokens,
        stats.weights,
    )
    assert loaded.key is None and loaded.matches(sharp)  # identity across processes: the content hash
    assert "tensor" not in repr(stats) and "<table>" in stats._repr_html_()


def test_no_cache_hands_out_a_shared_tensor(sharp):
    a = mlp_key_second_moment(sharp, 1, CORPUS[:5])
    a.zero_()
    b = mlp_key_second_moment(sharp, 1, CORPUS[:5])
    assert float(b.abs().sum()) > 0  # the caller's change did not reach the next call
    s = SecondMoment.compute(sharp, 1, CORPUS[:5])
    assert s.mom2 is not SecondMoment.compute(sharp, 1, CORPUS[:5]).mom2


def test_an_edit_with_given_statistics_hashes_no_weights(sharp, stats, monkeypatch):
    import reslens.rome.second_moment as sm

    def refuse(*args):
        raise AssertionError("rank_one_edit hashed the weights")

    monkeypatch.setattr(sm, "_weights_hash", refuse)
    edit = rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=stats, steps=2)
    assert edit.layer == 1 and not edit.applied


def test_a_truncated_or_foreign_statistics_file_is_rebuilt_or_refused(sharp, tmp_path, caplog):
    first = SecondMoment.compute(sharp, 1, CORPUS[:10], cache_dir=tmp_path)
    (file,) = tmp_path.glob("mom2-*.safetensors")
    file.write_bytes(file.read_bytes()[:200])  # an interrupted copy
    with pytest.raises(ValueError, match=f"cannot load {str(file)!r}"):
        SecondMoment.load(file)
    with caplog.at_level(logging.WARNING, logger="reslens.rome.second_moment"):
        again = SecondMoment.compute(sharp, 1, CORPUS[:10], cache_dir=tmp_path)
    assert "rebuilding" in caplog.text and torch.equal(again.mom2, first.mom2)
    assert torch.equal(SecondMoment.load(file).mom2, first.mom2)  # rewritten whole
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="text.safetensors"):
        SecondMoment.load(tmp_path / "text.safetensors")


def test_a_non_finite_second_moment_is_refused_never_written_into_the_weights(sharp, stats):
    before = model_state(sharp)
    nan = stats.mom2.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=nan)
    inf = stats.mom2.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=inf)
    with pytest.raises(ValueError, match="non-finite"):
        SecondMoment(mom2=nan, n_tokens=10, layer=1)
    broken = copy.deepcopy(sharp)
    with torch.no_grad():
        adapter(broken).mlp_weights(1).W_in[5, 0] = float("inf")  # keys overflow
    with pytest.raises(ValueError, match="non-finite second moment"):
        SecondMoment.compute(broken, 1, CORPUS[:4])
    assert_same_state(before, model_state(sharp))


def test_second_moment_arguments_are_checked(sharp, stats, big_vocab, tokenizer):
    with pytest.raises(ValueError, match="holds the keys of layer 1; the edit is at layer 0"):
        rank_one_edit_ids(sharp, IDS, (5, 8), [3], 0, second_moment=stats)
    with pytest.raises(TypeError, match="second_moment must be a SecondMoment"):
        rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=[[1.0]])
    with pytest.raises(TypeError, match="exactly one of second_moment"):
        rank_one_edit(big_vocab, tokenizer, "The capital city of Dracula", "Dracula", " London", 1)
    with pytest.raises(ValueError, match="max_tokens=0 is out of range"):
        SecondMoment.compute(sharp, 1, CORPUS, max_tokens=0)
    with pytest.raises(ValueError, match="max_length=0 is out of range"):
        SecondMoment.compute(sharp, 1, CORPUS, max_length=0)
    with pytest.raises(ValueError, match="batch_size=0 is out of range"):
        SecondMoment.compute(sharp, 1, CORPUS, batch_size=0)
    other = make_model(seed=2, initializer_range=0.3)
    with pytest.warns(UserWarning, match="other weights"):
        rank_one_edit_ids(other, IDS, (5, 8), [3], 1, second_moment=stats, steps=1)


def test_statistics_from_a_corpus_equal_given_statistics(big_vocab, tokenizer):
    prompt, subject = "The capital city of Dracula", "Dracula"
    corpus = [
        "The count lived in a castle far away. " * 3,
        "Mr. Holmes looked at the letter and smiled. " * 3,
    ]
    kwargs = dict(template_shapes=((2, 2),), steps=3)
    a = rank_one_edit(big_vocab, tokenizer, prompt, subject, " London", 1, stats_corpus=corpus, **kwargs)
    stats = SecondMoment.compute(big_vocab, 1, corpus, tokenizer=tokenizer)
    b = rank_one_edit(big_vocab, tokenizer, prompt, subject, " London", 1, second_moment=stats, **kwargs)
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and a.nll == b.nll
    assert (b.prompt, b.subject, b.new_answer, b.templates, b.steps) == (
        prompt,
        subject,
        " London",
        3,
        len(b.nll),
    )


# --- restoring edits: only what the edit wrote, in the reverse order of apply ---------------


def _two_edits(sharp, stats):
    a = rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=stats, steps=3)
    b = rank_one_edit_ids(sharp, IDS.flip(0), (2, 4), [9], 1, second_moment=stats, steps=3)
    assert not torch.equal(a.delta, b.delta)
    return a, b


def test_edits_of_one_layer_restored_out_of_order_are_refused(sharp, stats):
    before = model_state(sharp)
    a, b = _two_edits(sharp, stats)
    a.apply()
    b.apply()
    with pytest.raises(
        RuntimeError,
        match=r"cannot restore RankOneEdit\(layer=1.*was applied to the same weight "
        r"after it.*restore that one first",
    ):
        a.restore()
    assert a.applied and b.applied  # the refused restore changed nothing
    b.restore()
    a.restore()
    assert_same_state(before, model_state(sharp))  # the right order gives the original bits back
    with a, b:  # nested context managers restore in the right order
        pass
    assert_same_state(before, model_state(sharp))


def test_an_edit_refuses_to_restore_a_weight_changed_since(sharp, stats):
    before = model_state(sharp)
    a, _ = _two_edits(sharp, stats)
    a.apply()
    with torch.no_grad():
        a.weight[0, 0] += 1.0  # someone else wrote into the weight
    with pytest.raises(RuntimeError, match="the weight changed since this edit was applied"):
        a.restore()
    a.restore(force=True)
    assert_same_state(before, model_state(sharp))
    assert hook_counts(sharp) == {}


def test_edit_repr_info_and_orientation(sharp, stats):
    edit = rank_one_edit_ids(sharp, IDS, (5, 8), [3], 1, second_moment=stats, steps=2)
    assert "tensor" not in repr(edit) and "layer=1" in repr(edit) and "<table>" in edit._repr_html_()
    assert edit.info["new_answer_ids"] == [3] and edit.info["steps"] == edit.steps == len(edit.nll)
    arch = adapter(sharp)
    assert edit.weight is arch.mlp_out_param(1)
    assert (
        torch.equal(edit.delta, arch.rank_one_delta(edit.u, edit.v)) and edit.delta.shape == edit.weight.shape
    )


def test_statistics_know_when_the_weights_under_them_changed(stats):
    model = make_model(initializer_range=0.3)  # the same weights as `sharp`, another object
    assert not stats.matches(model) or stats.weights == SecondMoment.compute(model, 1, CORPUS[:2]).weights
    own = SecondMoment.compute(model, 1, CORPUS[:4])
    assert own.matches(model)
    with torch.no_grad():
        adapter(model).W_E[0, 0] += 1.0  # an in-place change of a weight that shapes layer 1's keys
    assert not own.matches(model)
    with pytest.warns(UserWarning, match="other weights"):
        rank_one_edit_ids(model, IDS, (5, 8), [3], 1, second_moment=own, steps=1)


def test_the_edit_is_exact_and_reversible_in_every_family(family_model):
    """The bare prompt's value-projection output becomes v* whatever the stored orientation of the weight.

    That output is mlp_out itself, or (Gemma 2/3, OLMo 2) what the MLP's output norm then rescales: there
    mlp_out becomes that norm of v*. A mixture of experts refuses the edit, before any forward.
    """
    arch = adapter(family_model)
    before = model_state(family_model)
    if "rank_one_edit" in arch.limits:
        refused = f"rank one edit is refused on this {arch.family} model: .*expert"
        with pytest.raises(ValueError, match=refused):
            rank_one_edit_ids(family_model, IDS, (5, 8), [3], 1, second_moment=torch.eye(arch.d_mlp), steps=3)
        assert_same_state(before, model_state(family_model))
        return
    stats = SecondMoment.compute(family_model, 1, CORPUS[:10])
    edit = rank_one_edit_ids(family_model, IDS, (5, 8), [3], 1, second_moment=stats, steps=3)
    assert edit.delta.shape == edit.weight.shape
    raw = []
    with edit, patch(family_model, {("mlp_raw", 1): lambda t: raw.append(t.detach().clone())}):
        res = capture(family_model, IDS[None], sites="mlp_out", layers=1)
    torch.testing.assert_close(raw[0][0, 7].float(), edit.value, rtol=1e-4, atol=1e-4)
    norm = arch.out_norm("mlp", 1)
    expected = edit.value if norm is None else norm(edit.value)
    torch.testing.assert_close(res.mlp_out[0, 0, 7].float(), expected, rtol=1e-4, atol=1e-4)
    assert_same_state(before, model_state(family_model))


def test_edit_contexts_follow_a_tokenizer_that_puts_a_bos_first(tokenizer):
    """Llama-family convention: every context (and the KL prompt) starts with the BOS the tokenizer puts."""
    from helpers import make_family
    from test_tracing import bos_first

    from reslens.rome.edit import _contexts

    model = make_family("llama", vocab_size=50257)
    bos_tok = bos_first(tokenizer)
    prompt, subject = "The capital city of Dracula is", "Dracula"
    templates = ["{}", "It is known. {}"]
    contexts = _contexts(adapter(model), bos_tok, templates, prompt, subject, 1)
    for (ids, at), template in zip(contexts, templates):
        assert ids == bos_tok(template.format(prompt))["input_ids"] and ids[0] == 50256
        assert bos_tok.decode([ids[at]]) == " Dracula"

    plain = tokenizer(prompt)["input_ids"]
    corpus = torch.randint(0, 50257, (8, 12), generator=torch.Generator().manual_seed(0))
    stats = SecondMoment.compute(model, 1, corpus)
    before = model_state(model)
    edit = rank_one_edit(model, bos_tok, prompt, subject, " London", 1, second_moment=stats,
                         context_templates=[], kl_factor=0.0, steps=5)
    ref = rank_one_edit_ids(model, [50256] + plain, (5, 6), tokenizer(" London")["input_ids"], 1,
                            second_moment=stats, kl_factor=0.0, steps=5)
    torch.testing.assert_close(edit.u, ref.u)
    torch.testing.assert_close(edit.v, ref.v, rtol=1e-4, atol=1e-5)
    assert_same_state(before, model_state(model))


def test_an_edit_that_cannot_reach_the_answer_is_refused_not_returned_as_a_no_op(sharp):
    # The last block (layer 2 of 3) with the subject (5, 7) ending before the prompt's last token: its
    # MLP output reaches no later position, so the answer's loss has an exactly zero gradient.
    last = SecondMoment.compute(sharp, 2, CORPUS)
    before = model_state(sharp)
    with pytest.raises(ValueError, match="layer=2 cannot change the prediction"):
        rank_one_edit_ids(sharp, IDS, (5, 7), [3], 2, second_moment=last, steps=3)
    assert_same_state(before, model_state(sharp))
    # the subject ending at the last token: the edit reaches the answer
    edit = rank_one_edit_ids(sharp, IDS, (5, 8), [3], 2, second_moment=last, steps=3)
    assert edit.delta.abs().sum() > 0
