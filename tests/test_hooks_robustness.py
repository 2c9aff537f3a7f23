"""Bad input gets a clear error, and nothing is left on or changed in the model."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reslens import Batch, capture, tokenize, trace
from reslens.hooks import SITES
from helpers import N_POSITIONS, VOCAB, assert_same_state, hook_counts, make_model, model_state


def test_no_hook_remains_after_capture_and_trace(model, ids):
    before = hook_counts(model)
    capture(model, ids, sites=SITES)
    capture(model, ids, sites=("resid",), layers=[0])  # stops the forward early
    with trace(model, sites=SITES):
        model(ids)
    assert hook_counts(model) == before


def test_no_hook_remains_after_an_exception_inside_trace(model, ids):
    before = hook_counts(model)
    with pytest.raises(KeyError):
        with trace(model, sites=SITES):
            model(ids)
            raise KeyError("user code failed")
    assert hook_counts(model) == before


def test_no_hook_remains_after_a_failing_forward(model):
    before = hook_counts(model)
    with pytest.raises(Exception):
        with trace(model, sites=("resid",)):
            model(torch.tensor([[VOCAB + 5]]))
    assert hook_counts(model) == before


def test_user_hooks_survive_and_still_run(model, ids):
    calls = []
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    pre = model.transformer.h[0].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    capture(model, ids, sites=("mlp_out", "resid"))
    with trace(model, sites=("mlp_out",)):
        model(ids)
    assert model.transformer.h[1].mlp._forward_hooks and model.transformer.h[0]._forward_pre_hooks
    n = len(calls)
    model(ids)
    assert len(calls) == n + 2
    handle.remove()
    pre.remove()


def test_weights_flags_and_requires_grad_unchanged(ids):
    model = make_model()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    before = model_state(model)
    capture(model, ids, sites=SITES)
    capture(model, ids, sites=SITES, detach=False)
    assert_same_state(before, model_state(model))
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        capture(model, ids)
    assert model.training


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.zeros(0, 4, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(1, N_POSITIONS + 1, dtype=torch.long), ValueError, "n_positions=40"),
        (torch.tensor([[1, VOCAB]]), ValueError, f"token id {VOCAB}.*0..{VOCAB - 1}"),
        (torch.tensor([[1, -1]]), ValueError, "token id -1"),
        (torch.tensor([1, 2, 3]), ValueError, "2-D.*1-D.*ids\\[None\\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "2-D.*3-D"),
        (torch.zeros(1, 3), TypeError, "integer token ids"),
        ([], ValueError, "empty"),
        (["text"], TypeError, "tokenizer="),
        (3.5, TypeError, "inputs must be"),
    ],
)
def test_bad_inputs(model, inputs, error, match):
    before = hook_counts(model)
    with pytest.raises(error, match=match):
        capture(model, inputs)
    assert hook_counts(model) == before


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sites=("resid", "mlp_pre")), ValueError, "unknown site 'mlp_pre'"),
        (dict(sites=()), ValueError, "sites is empty"),
        (dict(sites=5), TypeError, "sites must be"),
        (dict(layers=[4]), ValueError, "layers contains 4.*0..3"),
        (dict(layers=[-5]), ValueError, "layers contains -5"),
        (dict(layers=["1"]), TypeError, "layers must contain ints"),
        (dict(layers=[]), ValueError, "layers is empty"),
        (dict(sites=("mlp_out",), layers=[3]), ValueError, "no block"),
        (dict(dtype="float32"), TypeError, "dtype must be a torch.dtype"),
        (dict(dtype=torch.int64), ValueError, "floating"),
        (dict(device="nowhere"), ValueError, "device='nowhere'"),
        (dict(detach="yes"), TypeError, "detach"),
    ],
)
def test_bad_arguments(model, ids, kwargs, error, match):
    before = hook_counts(model)
    with pytest.raises(error, match=match):
        capture(model, ids, **kwargs)
    assert hook_counts(model) == before


def test_non_gpt2_model_is_rejected(ids):
    with pytest.raises(TypeError, match="Linear.*GPT2LMHeadModel"):
        capture(torch.nn.Linear(3, 3), ids)


def test_bad_masks():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        Batch(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 0"):
        Batch(ids, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\]"):
        Batch(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_tokenize_errors_and_padding():
    class Tok:
        pad_token_id, eos_token_id = None, 7

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    batch = tokenize(Tok(), ["a bb", "ccc dddd eeeee"], padding_side="left")
    assert batch.input_ids.tolist() == [[7, 1, 2], [3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match=r"texts \[1\] tokenize to no tokens"):
        tokenize(Tok(), ["a", ""])
    with pytest.raises(ValueError, match="padding_side"):
        tokenize(Tok(), ["a"], padding_side="middle")
    with pytest.raises(TypeError, match="texts must be"):
        tokenize(Tok(), [1, 2])


def test_trace_rejects_a_continued_kv_cache(model, ids):
    out = model(ids[:, :5], use_cache=True)
    before = hook_counts(model)
    with pytest.raises(ValueError, match="KV cache"):
        with trace(model, sites=("resid",)):
            model(ids[:, 5:], cache=out.cache)
    assert hook_counts(model) == before


# --- properties over random shapes, sites and paddings ------------------------------------

PROPERTY_MODEL = make_model(seed=7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    sites=st.sets(st.sampled_from(SITES), min_size=1),
    layers=st.one_of(st.none(), st.sets(st.integers(0, 2), min_size=1)),
    seed=st.integers(0, 2**16),
)
def test_property_padding_invariance_and_shapes(lengths, side, sites, layers, seed):
    model = PROPERTY_MODEL
    gen = torch.Generator().manual_seed(seed)
    n_pos = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), n_pos), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(n_pos - n, n_pos) if side == "left" else slice(0, n)
        mask[row, span] = 1
    sites = tuple(sorted(sites))
    layers = None if layers is None else sorted(layers)
    before = hook_counts(model)
    res = capture(model, Batch(ids, mask), sites=sites, layers=layers)
    assert hook_counts(model) == before
    assert res.sites == tuple(s for s in SITES if s in sites)
    kept = tuple(range(4)) if layers is None else tuple(layers)
    assert res.layers == kept and res.blocks == tuple(l for l in kept if l < 3)
    row = int(torch.randint(0, len(lengths), (1,), generator=gen))
    real = mask[row].bool()
    alone = capture(model, ids[row, real][None], sites=sites, layers=layers)
    for site in sites:
        got, want = getattr(res, site), getattr(alone, site)
        if site == "attn_pattern":
            got, want = got[:, row][..., real, :][..., real], want[:, 0]
        elif site in ("final", "logits"):
            got, want = got[row, real], want[0]
        else:
            got, want = got[:, row, real], want[:, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
