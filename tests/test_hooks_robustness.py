"""Bad input gets a clear error, and nothing is left on or changed in the model."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reslens
from reslens import Batch, capture, tokenize, trace
from reslens.hooks import patch
from reslens.hooks import SITES as ALL_SITES

from helpers import N_POSITIONS, VOCAB, assert_same_state, hook_counts, make_model, model_state

SITES = tuple(s for s in ALL_SITES if s != "mlp_gate")  # GPT-2 has no gate (tests/test_families.py covers it)


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
        (torch.zeros(1, N_POSITIONS + 1, dtype=torch.long), ValueError, "n_ctx=40"),
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


def test_a_device_this_machine_lacks_is_named_before_any_hook(model, ids, monkeypatch):
    """``device="cuda"`` without CUDA says so (it used to fail deep in the hook: "Torch not compiled ...")."""
    before = hook_counts(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available on this.*'cpu'"):
        capture(model, ids, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3': this machine has 1 CUDA device\(s\) \(cuda:0"):
        capture(model, ids, device="cuda:3")
    assert hook_counts(model) == before


def test_pads_given_without_a_mask_are_named(ids):
    """A padded ``input_ids`` tensor passed alone is read with its pads as tokens: a run of the pad id at a
    row's start or end warns (it used to pass silently); a single end-of-text id, a mask, or a pad id
    inside a row does not."""
    import warnings

    from reslens._inputs import as_batch
    from reslens.arch import adapter

    gpt2 = adapter(make_model())  # no pad id: padded with its end-of-text id 0, also a real token
    padded = ids.clone()
    padded[1, -3:] = 0
    for inputs in (padded, {"input_ids": padded}, padded.flip(-1)):  # right, a mapping, left
        with pytest.warns(UserWarning, match=r"without an attention_mask, and row 1 starts or ends with 3 "
                          r"pad tokens \(id 0\): they are read as real tokens. Pass the attention_mask"):
            as_batch(inputs, gpt2)
    one_eos = ids.clone()
    one_eos[:, -1], one_eos[:, 0] = 0, 5
    one_eos[:, 1:-1] = one_eos[:, 1:-1].clamp(min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_batch(one_eos, gpt2)  # a text that ends with one end-of-text token
        as_batch({"input_ids": padded, "attention_mask": padded != 0}, gpt2)
        as_batch(Batch.from_ids(padded), gpt2)  # a Batch says what is real
    dedicated = adapter(make_model(pad_token_id=7))  # a pad id only the config names: two are needed
    tail = one_eos.clone()
    tail[2, -2:] = 7
    with pytest.warns(UserWarning, match=r"row 2 starts or ends with 2 pad tokens \(id 7\)"):
        as_batch(tail, dedicated)
    tail[2, -2], tail[2, 4] = 5, 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_batch(tail, dedicated)  # one at the end (the config's pad id may be any token), one inside a row
    tokenizer = type("Tok", (), {"pad_token_id": 9, "eos_token_id": 0})()
    tail[0, :1] = 9
    with pytest.warns(UserWarning, match=r"row 0 starts or ends with 1 pad tokens \(id 9\)"):
        as_batch(tail, dedicated, tokenizer)  # the tokenizer's pad id comes first


def test_non_gpt2_model_is_rejected(ids):
    with pytest.raises(TypeError, match="supported family.*gpt2.*Linear"):
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
    assert res.layers == kept and res.blocks == tuple(layer for layer in kept if layer < 3)
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


# --- issue 18: threads, patch inside trace, files, inputs --------------------------------------


def test_capture_in_two_threads_records_each_threads_own_forward(model):
    import threading

    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(0, VOCAB, (2, 9), generator=gen) for _ in range(2)]
    expected = [capture(model, ids, sites=("resid", "mlp_out")).resid for ids in inputs]
    wrong, errors = [], []

    def work(k: int) -> None:
        try:
            for _ in range(15):
                got = capture(model, inputs[k], sites=("resid", "mlp_out")).resid
                # close, not equal: concurrent matmuls may split their sums differently; the other
                # thread's activations would differ by O(1)
                if got.shape != expected[k].shape or not torch.allclose(
                    got, expected[k], atol=1e-5, rtol=1e-5
                ):
                    wrong.append(k)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert hook_counts(model) == {}


def test_a_plain_forward_in_another_thread_is_never_stopped_or_patched(model, ids):
    import threading

    with torch.no_grad():
        reference = model(ids).logits
    seen = {}

    def other() -> None:
        with torch.no_grad():
            seen["logits"] = model(ids).logits

    with patch(model, {("mlp_out", 0): torch.zeros_like}), trace(model, sites="resid", layers=0):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert torch.equal(seen["logits"], reference)


def test_patch_entered_inside_trace_is_recorded_consistently(model, ids):
    shift = torch.full((32,), 0.5)
    with trace(model, sites=("resid", "attn_out", "mlp_out")) as tr:
        with patch(model, {("mlp_out", 0): lambda t: t + shift, ("resid", 2): lambda t: t * 2}):
            with torch.no_grad():
                model(ids)
    res = tr.residuals
    torch.testing.assert_close(
        res.resid[1], res.resid[0] + res.attn_out[0] + res.mlp_out[0], atol=1e-5, rtol=1e-5
    )
    with patch(model, {("mlp_out", 0): lambda t: t + shift, ("resid", 2): lambda t: t * 2}):
        outer = capture(model, ids, sites=("resid", "attn_out", "mlp_out"))
    assert torch.equal(outer.resid, res.resid) and torch.equal(outer.mlp_out, res.mlp_out)
    assert hook_counts(model) == {}


def test_a_second_forward_inside_trace_warns(model, ids):
    with trace(model, sites="resid") as tr, torch.no_grad():
        model(ids)
        with pytest.warns(UserWarning, match="second forward"):
            model(ids[:1])
    assert tr.residuals.resid.shape[1] == 1


def test_residuals_repr_is_short_and_html_is_a_table(model, ids):
    res = capture(model, ids, sites=("resid", "mlp_act", "logits"))
    text = repr(res)
    assert len(text) < 300 and "resid[4, 3, 11, 32]" in text and "tensor(" not in text
    assert "<table>" in res._repr_html_() and "mlp_act" in res._repr_html_()


def test_residuals_files_fail_with_a_message_naming_the_path(model, ids, tmp_path):
    res = capture(model, ids, sites=("resid",))
    target = tmp_path / "new" / "folder" / "run.safetensors"
    res.save(target)  # the folder is created
    assert (target.stat().st_mode & 0o777) != 0o600
    loaded = reslens.Residuals.load(target)
    assert torch.equal(loaded.resid, res.resid) and loaded.layers == res.layers
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(target.read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for bad, why in [
        (truncated, "truncated"),
        (text, "safetensors"),
        (tmp_path, "folder"),
        (tmp_path / "missing.safetensors", "no such file"),
    ]:
        with pytest.raises(ValueError, match=why) as info:
            reslens.Residuals.load(bad)
        assert str(bad) in str(info.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        res.save(tmp_path / "a_file" / "run.safetensors")
    assert not list(tmp_path.glob("**/*.tmp"))


def test_uint8_ids_work_and_out_of_range_positions_are_refused(model, ids):
    small = ids.to(torch.uint8)
    assert torch.equal(capture(model, small).resid, capture(model, ids).resid)
    batch = reslens.Batch(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(11).expand(3, 11) + 35)
    with pytest.raises(ValueError, match="position_ids must lie in 0..39"):
        capture(model, batch)
    with pytest.raises(TypeError, match="position_ids must hold integers"):
        reslens.Batch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(3, 11))
