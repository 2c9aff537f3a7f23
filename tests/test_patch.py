"""hooks.patch: interventions replace exactly the named site and leave nothing behind."""

import pytest
import torch

from helpers import assert_same_state, hook_counts, model_state
from reslens.hooks import capture, patch

ALL = ("resid", "resid_mid", "attn_out", "mlp_out", "mlp_act", "logits")


def test_identity_edits_change_nothing(model, ids):
    clean = capture(model, ids, sites=ALL)
    edits = {(site, 1): (lambda t: t) for site in ("resid", "attn_out", "mlp_out", "mlp_act")}
    edits[("resid", 3)] = lambda t: None  # in place, no change
    with patch(model, edits):
        patched = capture(model, ids, sites=ALL)
    for site in ALL:
        assert torch.equal(getattr(clean, site), getattr(patched, site)), site
    assert hook_counts(model) == {}


def test_resid_edit_shifts_that_layer(model, ids):
    clean = capture(model, ids, sites="resid")
    delta = torch.randn(32, generator=torch.Generator().manual_seed(0))
    for layer in (0, 2, 3):
        with patch(model, {("resid", layer): lambda t: t + delta}):
            res = capture(model, ids, sites="resid")
        torch.testing.assert_close(res.resid[layer], clean.resid[layer] + delta, rtol=0, atol=1e-6)
        assert torch.equal(res.resid[:layer], clean.resid[:layer])


def test_mlp_act_edit_moves_mlp_out_by_delta_times_value(model, ids):
    clean = capture(model, ids, sites=("mlp_out", "mlp_act"))
    value = model.transformer.h[1].mlp.c_proj.weight[5]  # [d_model]

    def bump(t):
        t = t.clone()
        t[..., 5] += 2.5
        return t

    with patch(model, {("mlp_act", 1): bump}):
        res = capture(model, ids, sites=("mlp_out", "mlp_act"), layers=[1])
    assert torch.equal(res.mlp_act[0], bump(clean.mlp_act[1]))
    torch.testing.assert_close(res.mlp_out[0], clean.mlp_out[1] + 2.5 * value, rtol=0, atol=1e-5)


def test_attn_out_zeroed_leaves_resid_mid_equal_resid(model, ids):
    with patch(model, {("attn_out", 2): torch.zeros_like}):
        res = capture(model, ids, sites=("resid", "resid_mid"))
    assert torch.equal(res.resid_mid[2], res.resid[2])


def test_gradients_flow_through_the_edit(model, ids):
    delta = torch.zeros(32, requires_grad=True)
    with patch(model, {("mlp_out", 0): lambda t: t + delta}):
        logits = model(ids).logits
    logits[0, -1, 3].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert hook_counts(model) == {}


@pytest.mark.parametrize(
    "edits, error, match",
    [
        ([("resid", 0)], TypeError, "mapping"),
        ({"resid": abs}, TypeError, "pairs"),
        ({("mlp_in", 0): abs}, ValueError, "unknown site 'mlp_in'"),
        ({("mlp_out", 3): abs}, ValueError, "out of range"),
        ({("resid", 4): abs}, ValueError, "out of range"),
        ({("resid", 0): 3}, TypeError, "function"),
        ({("resid", 3): abs, ("resid", -1): abs}, ValueError, "twice"),
    ],
)
def test_bad_edits(model, edits, error, match):
    with pytest.raises(error, match=match):
        patch(model, edits)
    assert hook_counts(model) == {}


def test_wrong_shape_and_exceptions_leave_no_hooks(model, ids):
    before = model_state(model)
    with pytest.raises(ValueError, match=r"returned \(3, 11\); expected a tensor \(3, 11, 32\)"):
        with patch(model, {("mlp_out", 1): lambda t: t.sum(-1)}):
            model(ids)
    assert hook_counts(model) == {}
    with pytest.raises(RuntimeError, match="boom"):
        with patch(model, {("resid", 1): lambda t: (_ for _ in ()).throw(RuntimeError("boom"))}):
            model(ids)
    assert hook_counts(model) == {}
    assert_same_state(before, model_state(model))
