"""The logit lens against a brute-force reference built from full logits."""

import matplotlib
import pytest
import torch

from reslens import Batch, capture
from reslens.lens import LensResult, lens_of, logit_lens
from helpers import FAMILIES, VOCAB, count_calls, make_family, make_model

matplotlib.use("Agg")


def brute_force(model, ids, mask=None, sites=("resid",)):
    """Every metric from materialised [rows, batch, pos, vocab] float32 log-probs."""
    res = capture(model, Batch.from_ids(ids, mask), sites=("resid", "resid_mid"))
    n_layer = model.config.n_layer
    rows = [
        (s, layer)
        for layer in range(n_layer + 1)
        for s in ("resid", "resid_mid")
        if s in sites and (s == "resid" or layer < n_layer)
    ]
    z = torch.stack([model.lm_head(model.transformer.ln_f(res.get(s, layer))) for s, layer in rows]).float()
    logp = z.log_softmax(-1)
    p = logp.exp()
    logq = model(ids, attention_mask=mask).logits.float().log_softmax(-1) if mask is None else logp[-1]
    q = logq.exp()
    m = (p + q) / 2
    nxt = ids[:, 1:]
    return dict(
        rows=rows,
        z=z,
        entropy=-(p * logp).sum(-1),
        kl_final_layer=(q * (logq - logp)).sum(-1),
        kl_layer_final=(p * (logp - logq)).sum(-1),
        js=0.5 * (p * (logp - m.log())).sum(-1) + 0.5 * (q * (logq - m.log())).sum(-1),
        max_prob=p.max(-1).values,
        final_top1_prob=p.gather(-1, q.argmax(-1).expand(len(rows), *q.shape[:-1])[..., None])[..., 0],
        target_logprob=logp[..., :-1, :].gather(-1, nxt.expand(len(rows), *nxt.shape)[..., None])[..., 0],
        target_rank=(
            z[..., :-1, :] > z[..., :-1, :].gather(-1, nxt.expand(len(rows), *nxt.shape)[..., None])
        ).sum(-1),
        top=z.topk(5, dim=-1),
        final_top1=q.argmax(-1),
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
@pytest.mark.parametrize("sites", [("resid",), ("resid", "resid_mid")])
def test_every_metric_equals_brute_force(model, ids, chunk_size, sites):
    lens = logit_lens(model, ids, sites=sites, chunk_size=chunk_size)
    ref = brute_force(model, ids, sites=sites)
    assert list(zip(lens.site_of_row, lens.layer_of_row)) == ref["rows"]
    for name in ("entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob", "final_top1_prob"):
        torch.testing.assert_close(getattr(lens, name), ref[name], atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(lens.target_logprob[..., :-1], ref["target_logprob"], atol=2e-5, rtol=1e-4)
    assert torch.equal(lens.target_rank[..., :-1], ref["target_rank"])
    assert torch.equal(lens.top_ids, ref["top"].indices)
    torch.testing.assert_close(
        lens.top_probs, (ref["top"].values - ref["z"].logsumexp(-1, keepdim=True)).exp()
    )
    assert torch.equal(lens.final_top1, ref["final_top1"])
    # the last position has no next token
    assert lens.target_logprob[..., -1].isnan().all() and (lens.target_rank[..., -1] == -1).all()


def test_final_row_is_the_models_own_prediction(model, ids):
    lens = logit_lens(model, ids, top_k=VOCAB)
    logits = model(ids).logits
    assert lens.layer_of_row[-1] == model.config.n_layer
    assert torch.equal(lens.top_ids[-1], logits.topk(VOCAB, dim=-1).indices)
    torch.testing.assert_close(
        lens.top_probs[-1], logits.softmax(-1).sort(-1, descending=True).values, atol=1e-4, rtol=0
    )
    assert (lens.kl_final_layer[-1] == 0).all() and (lens.kl_layer_final[-1] == 0).all()
    assert lens.js[-1].abs().max() < 1e-5


def test_ranks_and_convergence_by_hand(model, ids):
    lens = logit_lens(model, ids)
    top1 = lens.top_ids[..., 0]
    for b in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            agree = [bool(top1[r, b, p] == lens.final_top1[b, p]) for r in range(top1.shape[0])]
            first = next(r for r in range(len(agree)) if all(agree[r:]))
            assert lens.convergence_layer[b, p] == lens.layer_of_row[first]
    assert (lens.target_rank[lens.target_rank >= 0] < VOCAB).all()
    assert ((lens.target_rank[..., :-1] == 0) == (top1[..., :-1] == ids[:, 1:])).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs_and_pads_are_excluded(model, side):
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (4, 9, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(9 - len(seq), 9) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    lens = logit_lens(model, Batch(ids, mask), sites=("resid", "resid_mid"))
    for row, seq in enumerate(seqs):
        alone = logit_lens(model, seq[None], sites=("resid", "resid_mid"))
        real = mask[row].bool()
        for name in ("entropy", "kl_final_layer", "kl_layer_final", "js", "target_logprob", "top_probs"):
            torch.testing.assert_close(
                getattr(lens, name)[:, row, real],
                getattr(alone, name)[:, 0],
                atol=1e-5,
                rtol=1e-4,
                equal_nan=True,
            )
        for name in ("top_ids", "target_rank"):
            assert torch.equal(getattr(lens, name)[:, row, real], getattr(alone, name)[:, 0]), name
        assert torch.equal(lens.convergence_layer[row, real], alone.convergence_layer[0])
        assert lens.entropy[:, row, ~real].isnan().all() and (lens.top_ids[:, row, ~real] == -1).all()
        assert (lens.convergence_layer[row, ~real] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compute_in_float32(ids, dtype):
    model = make_model().to(dtype)
    lens = logit_lens(model, ids)
    assert lens.entropy.dtype == torch.float32 and lens.top_probs.dtype == torch.float32
    logits = model(ids).logits
    assert torch.equal(lens.top_ids[-1], logits.float().topk(5, dim=-1).indices)
    torch.testing.assert_close(
        lens.target_logprob[-1, :, :-1],
        logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0],
    )


def test_explicit_targets_and_no_targets(model, ids):
    targets = torch.full_like(ids, 3)
    lens = logit_lens(model, ids, targets=targets)
    logp = model(ids).logits.log_softmax(-1)[..., 3]
    torch.testing.assert_close(lens.target_logprob[-1], logp, atol=1e-5, rtol=1e-5)
    none = logit_lens(model, ids, targets=None)
    assert none.target_logprob is None and none.target_rank is None and none.targets is None
    torch.testing.assert_close(none.entropy, lens.entropy)
    one = logit_lens(model, ids, targets=3)  # one token: the target at every position
    assert torch.equal(one.targets, targets) and torch.equal(one.target_logprob, lens.target_logprob)


def test_layer_selection(model, ids):
    lens = logit_lens(model, ids, layers=[0, 2])
    full = logit_lens(model, ids)
    assert lens.layer_of_row == (0, 2)
    torch.testing.assert_close(lens.kl_final_layer, full.kl_final_layer[[0, 2]])
    assert (lens.convergence_layer == -1).any() or (lens.convergence_layer >= 0).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_k=0), ValueError, r"top_k=0 is out of range \(expected 1..97\)"),
        (dict(top_k=98), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(chunk_size=0), ValueError, r"chunk_size=0 is out of range \(expected >= 1\)"),
        (dict(fused=1), TypeError, "fused must be True or False"),
        (dict(targets=torch.full((3, 11), 2.0)), TypeError, "targets must hold integer token ids"),
        (dict(targets=torch.ones(3, 11, dtype=torch.bool)), TypeError, "targets must hold integer token ids"),
        (dict(targets=torch.full((3, 11), -5)), ValueError, "targets contains id -5"),
        (dict(sites=("mlp_out",)), ValueError, "unknown site 'mlp_out'"),
        (dict(layers=[9]), ValueError, "layers contains 9"),
        (dict(targets="prev"), TypeError, "targets='prev' is text, so tokenizer= is required"),
        (dict(targets=VOCAB), ValueError, r"targets=97 is out of range for the vocabulary \(expected 0..96"),
        (dict(targets=True), TypeError, "targets must be a token id"),
        (dict(targets=torch.zeros(2, 2, dtype=torch.long)), ValueError, "targets has shape"),
        (dict(targets=torch.full((3, 11), VOCAB)), ValueError, "targets contains id 97"),
        (dict(targets=[1, 2]), TypeError, "targets must be"),
    ],
)
def test_bad_arguments(model, ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        logit_lens(model, ids, **kwargs)


def _count_checks(monkeypatch):
    """Count the calls of every check on the single-text path (each module's own reference to it)."""
    import reslens._inputs
    import reslens.hooks
    import reslens.lens.result

    return count_calls(monkeypatch, (
        (reslens._inputs, ("check_ids", "check_mask")),
        (reslens.hooks, ("check_sites", "check_layers", "check_dtype", "check_device", "as_batch")),
        (reslens.lens.result, ("check_sites", "check_layers", "check_int", "check_bool", "_check_lens",
                               "_check_residuals", "resolve_targets", "as_batch", "_lens_rows")),
    ))


@pytest.mark.parametrize("given", ["ids", "batch", "text"])
def test_logit_lens_checks_each_argument_once(model, ids, given, monkeypatch):
    from reslens.models import load_model

    tokenizer = None
    if given == "text":
        model, tokenizer = load_model()  # the embedded GPT-2 and its tokenizer
    inputs = {"ids": ids, "batch": Batch.from_ids(ids), "text": ["The cat sat", "on the mat"]}[given]
    options = dict(tokenizer=tokenizer, sites=("resid", "resid_mid"), layers=(0, -1))
    wanted = logit_lens(model, inputs, **options)
    calls = _count_checks(monkeypatch)
    again = logit_lens(model, inputs, **options)
    assert torch.equal(again.top_ids, wanted.top_ids) and torch.equal(again.entropy, wanted.entropy)
    # once each: the inputs (ids against the vocabulary and context), the options, the lens, the targets
    assert calls.get("check_ids") == 1 and calls.get("as_batch") == 1, calls
    assert calls.get("check_mask", 0) <= 1, calls  # a Batch built once (from ids or the tokenizer)
    assert calls["check_sites"] == calls["check_layers"] == calls["_check_lens"] == 1, calls
    assert calls["resolve_targets"] == calls["_lens_rows"] == 1, calls
    assert calls["check_int"] == 2 and calls["check_bool"] == 1, calls  # top_k and chunk_size; fused
    assert "_check_residuals" not in calls and "check_dtype" not in calls and "check_device" not in calls


def test_lens_of_and_capture_check_their_arguments_once(model, ids, monkeypatch):
    from reslens.arch import adapter

    arch = adapter(model)
    calls = _count_checks(monkeypatch)
    res = capture(arch, ids, sites=("resid", "resid_mid"))
    assert calls == {"check_sites": 1, "check_layers": 1, "check_dtype": 1, "check_device": 1, "as_batch": 1,
                     "check_ids": 1, "check_mask": 1}, calls
    calls.clear()
    lens_of(res, arch, sites=("resid", "resid_mid"), layers=(0, -1))
    assert calls["_check_residuals"] == calls["check_sites"] == calls["check_layers"] == 1, calls
    assert calls["_check_lens"] == calls["resolve_targets"] == 1 and "as_batch" not in calls, calls


def test_result_round_trip_frame_table_and_plot(model, ids, tmp_path):
    lens = logit_lens(
        model,
        Batch(ids, torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)),
        sites=("resid", "resid_mid"),
    )
    path = tmp_path / "lens.safetensors"
    lens.save(path)
    back = LensResult.load(path)
    assert back.row_labels == lens.row_labels and back.token_strings == lens.token_strings
    assert isinstance(back.site_of_row, tuple) and back.targets is not None
    for name in ("top_ids", "entropy", "target_rank", "convergence_layer", "attention_mask"):
        assert torch.equal(getattr(back, name), getattr(lens, name)) or torch.allclose(
            getattr(back, name), getattr(lens, name), equal_nan=True
        )

    frame = lens.to_frame()
    assert len(frame) == len(lens.site_of_row) * int(lens.attention_mask.sum())
    assert {"site", "layer", "seq", "pos", "top1_token", "target_rank", "kl_final_layer", "js"} <= set(
        frame.columns
    )

    table = lens.table(seq=1, width=60)
    lines = table.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[0] == "logit lens: top-1 token per layer"
    assert lines[3].startswith("next") and any(line.startswith("input") for line in lines)
    assert "[0]" not in table  # position 0 is padding
    with pytest.raises(ValueError, match="seq=5"):
        lens.table(seq=5)

    for metric in ("prob", "rank", "entropy", "kl"):
        fig = lens.plot(metric=metric)
        fig.savefig(tmp_path / f"{metric}.png")
        assert (tmp_path / f"{metric}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric must be one of"):
        lens.plot(metric="logit")
    page = lens._repr_html_()
    assert "<pre>" not in page and "<table" in page and "background:" in page
    assert page.count("<tr>") == len(lens.site_of_row) + 2  # next, every row, input


def test_a_long_input_is_wrapped_into_stacked_panels_that_share_one_scale(model):
    import matplotlib

    matplotlib.use("Agg")
    ids = torch.randint(0, model.config.vocab_size, (1, 38), generator=torch.Generator().manual_seed(0))
    lens = logit_lens(model, ids)
    fig = lens.plot(per_row=16)  # 38 positions: three panels of equal widths (13, 13, 12), one colour bar
    panels = [ax for ax in fig.axes if ax.get_ylabel() == "layer"]
    assert len(panels) == 3 and len(fig.axes) == 4
    assert [len(ax.get_xticklabels()) for ax in panels] == [13, 13, 12]
    assert all(ax.get_xlim() == panels[0].get_xlim() for ax in panels)  # same cell width in every panel
    width, height = fig.get_size_inches()
    assert width < 17 and height > width / 2  # page proportions, not a 35-inch strip
    assert len([ax for ax in lens.plot().axes if ax.get_ylabel() == "layer"]) == 2  # default: two of 19
    assert len([ax for ax in lens.plot(per_row=40).axes if ax.get_ylabel() == "layer"]) == 1
    assert "logit lens" in panels[0].get_title()
    with pytest.raises(ValueError, match="per_row"):
        lens.plot(per_row=0)


def test_fused_reduction_equals_eager(model, ids):
    eager = logit_lens(model, ids, sites=("resid", "resid_mid"))
    fused = logit_lens(model, ids, sites=("resid", "resid_mid"), fused=True)
    for name in ("top_ids", "target_rank", "convergence_layer", "final_top1"):
        assert torch.equal(getattr(fused, name), getattr(eager, name)), name
    for name in (
        "top_probs",
        "target_logprob",
        "entropy",
        "kl_final_layer",
        "kl_layer_final",
        "js",
        "final_top1_prob",
    ):
        torch.testing.assert_close(
            getattr(fused, name), getattr(eager, name), atol=1e-5, rtol=1e-5, equal_nan=True, msg=name
        )


def test_lens_leaves_no_hook_and_no_change(model, ids):
    from helpers import assert_same_state, hook_counts, model_state

    before, state = hook_counts(model), model_state(model)
    logit_lens(model, ids, sites=("resid", "resid_mid"))
    assert hook_counts(model) == before
    assert_same_state(state, model_state(model))


def test_many_blocks_of_positions_equal_brute_force(model):
    ids = torch.randint(
        0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9)
    )  # 80 positions: 3 blocks
    for fused in (False, True):
        lens = logit_lens(model, ids, fused=fused)
        ref = brute_force(model, ids)
        for name in ("entropy", "kl_final_layer", "js", "final_top1_prob"):
            torch.testing.assert_close(getattr(lens, name), ref[name], atol=2e-5, rtol=1e-4, msg=name)
        assert torch.equal(lens.target_rank[..., :-1], ref["target_rank"])
        assert torch.equal(lens.top_ids, ref["top"].indices)


# --- capture once, analyse many -----------------------------------------------------------


def test_lens_of_one_capture_equals_logit_lens(model, ids):
    from reslens.arch import adapter

    arch = adapter(model)
    res = capture(arch, ids, sites=("resid", "resid_mid", "mlp_out", "attn_pattern"))  # a union of sites
    pure = lens_of(res, arch, sites=("resid", "resid_mid"))
    wrapped = logit_lens(model, ids, sites=("resid", "resid_mid"))
    for name in (
        "top_ids",
        "top_probs",
        "target_rank",
        "target_logprob",
        "entropy",
        "kl_final_layer",
        "js",
        "final_top1",
        "convergence_layer",
    ):
        assert torch.equal(getattr(pure, name).nan_to_num(-7), getattr(wrapped, name).nan_to_num(-7)), name
    subset = lens_of(res, arch, layers=[0, 2])
    assert subset.layer_of_row == (0, 2)
    assert torch.equal(subset.entropy, wrapped.entropy[[wrapped.row(0), wrapped.row(2)]])


def test_lens_of_refuses_residuals_it_cannot_read(model, ids):
    from reslens.arch import adapter

    arch = adapter(model)
    with pytest.raises(ValueError, match="final layer 3"):
        lens_of(capture(arch, ids, layers=[0, 1]), arch)
    with pytest.raises(ValueError, match="resid"):
        lens_of(capture(arch, ids, sites=("mlp_out",)), arch)
    with pytest.raises(TypeError, match="Residuals"):
        lens_of(ids, arch)
    with pytest.raises(ValueError, match="d_model=32; the model has 16"):
        lens_of(capture(arch, ids), make_model(n_embd=16, n_head=2))


# --- non-finite residuals (issue 18, item 4) ----------------------------------------------


def _nan_at(pos):
    def fn(t):
        t = t.clone()
        t[:, pos] = float("nan")
        return t

    return fn


def test_non_finite_residuals_are_marked_not_predicted(model, ids):
    from reslens.hooks import patch

    clean = logit_lens(model, ids, sites=("resid", "resid_mid"))
    nan = {("resid", 1): lambda t: torch.full_like(t, float("nan"))}
    with patch(model, nan), pytest.warns(RuntimeWarning, match=r"\d+ of \d+ lens cells .* non-finite"):
        lens = logit_lens(model, ids, sites=("resid", "resid_mid"))
    bad = lens.non_finite  # [R, B, P]
    first = lens.row(1)
    assert bad[first:].all() and not bad[:first].any()  # resid 0, resid_mid 0 are finite
    # marked cells: ids and rank -1, metrics NaN -- never "rank 0, token 0"
    assert (lens.top_ids[bad] == -1).all() and lens.top_probs[bad].isnan().all()
    assert (lens.target_rank[bad] == -1).all()
    for name in (
        "target_logprob",
        "entropy",
        "kl_final_layer",
        "kl_layer_final",
        "js",
        "max_prob",
        "final_top1_prob",
    ):
        assert getattr(lens, name)[bad].isnan().all(), name
    # the final layer is NaN too: layer 0 keeps its own top-k and entropy, but no comparison with the final
    assert (lens.final_top1 == -1).all() and (lens.convergence_layer == -1).all()
    assert torch.equal(lens.top_ids[:first], clean.top_ids[:first])
    assert (
        torch.equal(lens.entropy[:first], clean.entropy[:first]) and lens.kl_final_layer[:first].isnan().all()
    )
    table = lens.table(seq=0, width=200)
    assert table.count("NaN") == (len(lens.site_of_row) - first) * ids.shape[1]
    frame = lens.to_frame()
    assert (~frame.finite).sum() == int(bad.sum()) and (frame[~frame.finite].top1_id == -1).all()
    assert "NaN" in lens._repr_html_()


def test_a_non_finite_final_position_leaves_the_others_alone(model, ids):
    from reslens.hooks import patch

    clean = logit_lens(model, ids)
    with patch(model, {("resid", 3): _nan_at(4)}), pytest.warns(RuntimeWarning, match="12 of 132 lens cells"):
        lens = logit_lens(model, ids)  # the final raw residual: only the final norm reads it
    assert lens.non_finite[-1, :, 4].all() and int(lens.non_finite.sum()) == 3
    assert (lens.final_top1[:, 4] == -1).all() and lens.js[:, :, 4].isnan().all()
    others = [p for p in range(ids.shape[1]) if p != 4]
    for name in ("target_rank", "final_top1", "convergence_layer"):
        assert torch.equal(getattr(lens, name)[..., others], getattr(clean, name)[..., others]), name
    assert torch.equal(lens.top_ids[:, :, others], clean.top_ids[:, :, others])
    assert torch.equal(lens.top_ids[:-1, :, 4], clean.top_ids[:-1, :, 4])  # layers 0..2 still read position 4


def test_non_finite_rows_under_the_fused_reducer(model, ids):
    from reslens.hooks import patch

    with (
        patch(model, {("resid", 2): lambda t: torch.full_like(t, float("inf"))}),
        pytest.warns(RuntimeWarning),
    ):
        lens = logit_lens(model, ids, fused=True)
    assert lens.non_finite[2:].all() and not lens.non_finite[:2].any()
    assert (lens.target_rank[2:] == -1).all() and lens.top_probs[2:].isnan().all()


# --- precision of both reducers against float64 (issue 18, item 10) -----------------------


def _peaked_model():
    """A random GPT-2 with a large vocabulary and scaled-up (tied) embeddings: peaked rows."""
    model = make_model(seed=3, n_layer=2, n_embd=64, vocab_size=50257, n_positions=16)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(12.0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_reducers_match_float64_on_peaked_rows(fused):
    model = _peaked_model()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(4))
    lens = logit_lens(model, ids, fused=fused)
    res = capture(model, ids)
    with torch.no_grad():
        z = model.lm_head(model.transformer.ln_f(res.resid)).double()  # the float32 logits, then float64
    logp = z.log_softmax(-1)
    p, logq = logp.exp(), logp[-1]
    q = logq.exp()
    assert float(p.amax(-1).median()) > 0.9  # the rows are peaked
    ref = dict(
        top_probs=p.topk(5, dim=-1).values,
        entropy=-(p * logp).sum(-1),
        kl_layer_final=(p * (logp - logq)).sum(-1),
        kl_final_layer=(q * (logq - logp)).sum(-1),
    )
    # Errors here: eager 1.2e-6 .. 1.9e-6; the old compiled reduction (float32 sums in loop order,
    # log p = z - logsumexp) 2.2e-5 .. 2.4e-5 on every metric, so it fails; the new one 4e-8 .. 1.1e-6.
    tol = dict(top_probs=6e-6, entropy=6e-6, kl_layer_final=6e-6, kl_final_layer=6e-6)
    for name, value in ref.items():
        err = float((getattr(lens, name).double() - value).abs().max())
        assert err < tol[name], f"{name}: {err:.3g}"


def test_lens_of_residuals_stored_in_half_precision(model, ids):
    from reslens.arch import adapter

    arch = adapter(model)
    half = lens_of(capture(arch, ids, dtype=torch.float16), arch)  # stored float16, read by a float32 model
    full = logit_lens(model, ids)
    assert half.entropy.dtype == torch.float32
    torch.testing.assert_close(half.entropy, full.entropy, atol=1e-2, rtol=1e-2)


# --- every family: the lens applies the final norm to each layer's OWN residual ------------------


def _hf_final_norm_and_head(model):
    """The model's own final-norm module and logits (plain HuggingFace, no reslens adapter): its LM head,
    then the final-logit soft-cap ``c · tanh(l / c)`` where the config has one, as Gemma 2's forward does."""
    norm = getattr(model.get_decoder(), {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}.get(
        model.config.model_type, "norm"))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return norm, model.lm_head
    return norm, lambda h: torch.tanh(model.lm_head(h) / cap) * cap


def _hf_lens_logits(model, ids, mask=None):
    """``[n_layer + 1, B, P, vocab]`` float32: HF's ``hidden_states`` through the final norm and the head.

    HuggingFace returns the last hidden state already normed, so the last row is ``model(ids).logits``.
    """
    norm, head = _hf_final_norm_and_head(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        rows = [head(norm(h)) for h in out.hidden_states[:-1]] + [out.logits]
    return torch.stack(rows).float()


def _family_ids(seed=3, shape=(2, 9)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_final_row_is_the_models_logits_on_every_family(family):
    model, ids = make_family(family), _family_ids()
    lens = logit_lens(model, ids, top_k=VOCAB)
    with torch.no_grad():
        logits = model(ids).logits
    assert lens.layer_of_row[-1] == model.config.num_hidden_layers
    assert torch.equal(lens.top_ids[-1], logits.topk(VOCAB, dim=-1).indices)
    torch.testing.assert_close(lens.top_probs[-1], logits.softmax(-1).sort(-1, descending=True).values,
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(lens.final_top1, logits.argmax(-1))
    assert (lens.kl_final_layer[-1] == 0).all() and (lens.kl_layer_final[-1] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_equals_huggingface_hidden_states_through_the_final_norm(family):
    model, ids = make_family(family), _family_ids()
    lens = logit_lens(model, ids, top_k=VOCAB)
    z = _hf_lens_logits(model, ids)
    logp = z.log_softmax(-1)
    p, logq = logp.exp(), logp[-1]
    q = logq.exp()
    assert torch.equal(lens.top_ids, z.topk(VOCAB, dim=-1).indices)
    torch.testing.assert_close(lens.top_probs, p.sort(-1, descending=True).values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lens.entropy, -(p * logp).sum(-1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lens.kl_final_layer, (q * (logq - logp)).sum(-1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lens.kl_layer_final, (p * (logp - logq)).sum(-1), atol=2e-5, rtol=1e-4)
    nxt = ids[:, 1:].expand(z.shape[0], *ids[:, 1:].shape)[..., None]
    torch.testing.assert_close(lens.target_logprob[..., :-1], logp[..., :-1, :].gather(-1, nxt)[..., 0],
                               atol=2e-5, rtol=1e-4)


def _growing_rms_model(family):
    """A tiny RMSNorm model whose residual RMS grows ~10x per block, with a sharp unembedding.

    The head is scaled by 50, then block by block the attention and MLP output projections are scaled so
    that the block adds ~10x the RMS of its input residual. A lens that normalised every layer with the
    final layer's scale would flatten the early layers' distributions (TransformerLens #1076); top-1 ids
    alone cannot tell (a positive rescale keeps them).
    """
    model = make_family(family)
    ids = _family_ids()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # (tied to the token embedding for Qwen2: that grows too)
        for i, block in enumerate(model.model.layers):
            resid = capture(model, ids, sites=("resid",), layers=[i, i + 1]).resid.float()
            added = (resid[1] - resid[0]).pow(2).mean().sqrt()
            factor = 10 * float(resid[0].pow(2).mean().sqrt() / added)
            block.self_attn.o_proj.weight.mul_(factor)  # a block's output is linear in these two
            block.mlp.down_proj.weight.mul_(factor)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rmsnorm_lens_uses_each_layers_own_scale_not_the_final_one(family):
    from reslens.arch import adapter

    model, ids = _growing_rms_model(family), _family_ids()
    arch = adapter(model)
    n_layer = arch.n_layer
    norm_module, head = _hf_final_norm_and_head(model)
    gamma, eps = norm_module.weight.detach(), norm_module.variance_epsilon
    res = capture(model, ids, sites=("resid",))
    rms = res.resid.float().pow(2).mean(-1).sqrt()  # [n_layer + 1, B, P]
    assert (rms[1:] / rms[:-1]).min() > 3 and rms[-1].min() / rms[0].max() > 100  # norms differ a lot
    lens = logit_lens(model, ids, top_k=VOCAB)
    final_scale = torch.rsqrt(res.resid[-1].pow(2).mean(-1, keepdim=True) + eps)  # the cached final scale
    for layer in range(n_layer + 1):
        x = res.resid[layer]
        own = gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # RMSNorm by hand
        torch.testing.assert_close(arch.norm("final")(x), own, atol=1e-5, rtol=1e-5)
        assert torch.equal(arch.norm("final")(x), norm_module(x))  # the adapter's norm is the module's
        with torch.no_grad():
            p_own = head(own).float().softmax(-1)
            p_wrong = head(gamma * (x * final_scale)).float().softmax(-1)
        entropy_own = -torch.xlogy(p_own, p_own).sum(-1)
        entropy_wrong = -torch.xlogy(p_wrong, p_wrong).sum(-1)
        torch.testing.assert_close(lens.top_probs[layer], p_own.sort(-1, descending=True).values,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lens.entropy[layer], entropy_own, atol=1e-4, rtol=1e-4)
        assert torch.equal(lens.top_ids[layer, ..., 0], p_wrong.argmax(-1))  # top-1 cannot tell them apart
        if layer < n_layer:  # ... but the distributions can: the wrong scale flattens them to near uniform
            assert (entropy_wrong - lens.entropy[layer]).min() > 0.5, layer
            assert (p_wrong.amax(-1) - lens.max_prob[layer]).abs().min() > 0.05, layer
    assert float(lens.max_prob[:n_layer].median()) > 0.5  # the right lens is sharp at every layer


def test_lens_of_reads_rmsnorm_residuals_captured_once():
    model, ids = _growing_rms_model("llama"), _family_ids()
    res = capture(model, ids, sites=("resid", "resid_mid"))
    both = lens_of(res, model, sites=("resid", "resid_mid"), top_k=3)
    norm, head = _hf_final_norm_and_head(model)
    with torch.no_grad():
        for r, (site, layer) in enumerate(zip(both.site_of_row, both.layer_of_row)):
            z = head(norm(res.get(site, layer))).float()
            assert torch.equal(both.top_ids[r], z.topk(3, dim=-1).indices), (site, layer)
            torch.testing.assert_close(both.entropy[r], -(z.softmax(-1) * z.log_softmax(-1)).sum(-1),
                                       atol=2e-5, rtol=1e-4)
