"""reslens.heads against brute-force references on tiny random models, plus the embedded model."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
from unittest import mock

import matplotlib
import pytest
import torch

from helpers import VOCAB, assert_same_state, hook_counts, make_family, make_model, model_state
from reslens import Batch, attribution, heads
from reslens.arch import adapter
from reslens.heads.composition import _random_baseline
from reslens.hooks import capture

matplotlib.use("Agg")


def _dense_attention(arch, layer: int, x: torch.Tensor):
    """Eager attention of one layer from the per-head weights: pattern [B, H, P, P], z [B, P, H, dh], out."""
    h = arch.norm("attn", layer)(x)
    q = torch.einsum("bpd,hde->bhpe", h, arch.W_Q(layer)) + arch.b_Q(layer)[None, :, None]
    k = torch.einsum("bpd,hde->bhpe", h, arch.W_K(layer)) + arch.b_K(layer)[None, :, None]
    v = torch.einsum("bpd,hde->bhpe", h, arch.W_V(layer)) + arch.b_V(layer)[None, :, None]
    n_pos = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(arch.d_head)
    scores = scores.masked_fill(~torch.ones(n_pos, n_pos, dtype=torch.bool).tril(), float("-inf"))
    pattern = scores.softmax(-1)
    z = (pattern @ v).transpose(1, 2)  # [B, P, H, dh]
    out = torch.einsum("bphe,hed->bpd", z, arch.W_O(layer)) + arch.b_O(layer)
    return pattern, z, out


# --- per-head weights and the attn_z site ----------------------------------------------------


def test_per_head_weight_split_reproduces_the_attention_layer(model, ids):
    arch = adapter(model)
    res = capture(model, ids, sites=("resid", "attn_out", "attn_pattern", "attn_z"))
    assert res.attn_z.shape == (3, 3, 11, 32)
    with torch.no_grad():
        for layer in range(arch.n_layer):
            pattern, z, out = _dense_attention(arch, layer, res.resid[layer])
            torch.testing.assert_close(pattern, res.attn_pattern[layer], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(z, arch.split_heads(res.attn_z[layer]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, res.attn_out[layer], atol=1e-5, rtol=1e-5)


# --- attention-pattern scores ----------------------------------------------------------------


def test_repeated_tokens_and_induction_score_brute_force(model):
    ids = heads.repeated_tokens(model, seq_len=6, n=3, seed=4)
    assert ids.shape == (3, 12) and torch.equal(ids[:, :6], ids[:, 6:])
    assert torch.equal(ids, heads.repeated_tokens(model, seq_len=6, n=3, seed=4))
    pattern = heads.attention_patterns(model, ids)
    expected = torch.zeros(3, 4)
    for layer in range(3):
        for head in range(4):
            values = [pattern[layer, b, head, i, i - 6 + 1] for b in range(3) for i in range(6, 12)]
            expected[layer, head] = torch.stack(values).mean()
    scores = heads.induction_scores(model, seq_len=6, n=3, seed=4)
    torch.testing.assert_close(scores.scores, expected)
    assert scores.name == "induction" and scores.scores.shape == (3, 4)


def test_induction_score_with_bos_and_token_pool(model):
    ids = heads.repeated_tokens(model, seq_len=5, n=2, token_pool=[3, 4, 5], bos_token_id=0)
    assert ids.shape == (2, 11) and (ids[:, 0] == 0).all() and set(ids[:, 1:].unique().tolist()) <= {3, 4, 5}
    pattern = heads.attention_patterns(model, ids)
    expected = pattern[:, :, :, torch.arange(6, 11), torch.arange(2, 7)].mean(dim=(1, 3))
    scores = heads.induction_scores(model, seq_len=5, n=2, token_pool=[3, 4, 5], bos_token_id=0)
    torch.testing.assert_close(scores.scores, expected)


def test_previous_token_scores_ignore_padding(model):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 9), generator=gen), torch.randint(0, VOCAB, (1, 5), generator=gen)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    ids[0], mask[0] = a[0], True
    ids[1, 4:], mask[1, 4:] = b[0], True  # left padding
    padded = heads.previous_token_scores(model, Batch(ids, mask))
    alone_a = heads.previous_token_scores(model, a)
    alone_b = heads.previous_token_scores(model, b)
    pooled = (8 * alone_a.scores + 4 * alone_b.scores) / 12
    torch.testing.assert_close(padded.scores, pooled, atol=1e-6, rtol=1e-5)
    pattern = heads.attention_patterns(model, a)
    brute = torch.stack([pattern[:, 0, :, i, i - 1] for i in range(1, 9)]).mean(0)
    torch.testing.assert_close(alone_a.scores, brute)


def test_duplicate_and_current_token_scores_brute_force(model):
    ids = torch.tensor([[5, 6, 5, 7, 6, 5, 8]])
    pattern = heads.attention_patterns(model, ids)[:, 0]  # [L, H, P, P]
    dup = [pattern[..., i, [j for j in range(i) if ids[0, j] == ids[0, i]]].sum(-1) for i in (2, 4, 5)]
    torch.testing.assert_close(heads.duplicate_token_scores(model, ids).scores, torch.stack(dup).mean(0))
    cur = torch.stack([pattern[..., i, i] for i in range(1, 7)]).mean(0)
    torch.testing.assert_close(heads.current_token_scores(model, ids).scores, cur)
    with pytest.raises(ValueError, match="no token occurs twice"):
        heads.duplicate_token_scores(model, torch.tensor([[1, 2, 3]]))


def test_duplicate_token_score_against_transformerlens_by_hand(model):
    """Issue 17 item 9: reslens averages over the queries that have an earlier copy; TransformerLens's
    detect_head(..., "duplicate_token_head") ("mul", no exclusions) divides the same mass by every query
    row. Here 3 of the 7 queries (positions 2, 4, 5) have an earlier copy, so TL = reslens * 3 / 7."""
    ids = torch.tensor([[5, 6, 5, 7, 6, 5, 8]])
    pattern = heads.attention_patterns(model, ids)[:, 0]  # [L, H, P, P]
    detection = (ids[0][:, None] == ids[0][None, :]).float().tril(-1)  # TL's duplicate-token pattern
    tl = (pattern * detection).sum(dim=(-1, -2)) / pattern.sum(dim=(-1, -2))  # TL's "mul" score per head
    torch.testing.assert_close(pattern.sum(dim=(-1, -2)), torch.full((3, 4), 7.0))  # every row sums to 1
    ours = heads.duplicate_token_scores(model, ids)
    torch.testing.assert_close(ours.scores * 3 / 7, tl)
    assert not torch.allclose(ours.scores, tl)  # the two definitions differ
    assert "3 positions that have one" in ours.description


def test_pure_pattern_scores_read_one_capture(model):
    """Capture once, analyse many: every score from one attn_pattern capture equals its wrapper."""
    ids = heads.repeated_tokens(model, seq_len=6, n=3, seed=4, bos_token_id=0)
    res = capture(model, ids, sites=("attn_pattern", "resid"), dtype=torch.float32)
    for pure, wrapper in [
        (heads.previous_token_scores_of, heads.previous_token_scores),
        (heads.current_token_scores_of, heads.current_token_scores),
        (heads.duplicate_token_scores_of, heads.duplicate_token_scores),
    ]:
        assert torch.equal(pure(res).scores, wrapper(model, ids).scores), pure.__name__
    induction = heads.induction_scores(model, seq_len=6, n=3, seed=4, bos_token_id=0)
    assert torch.equal(heads.induction_scores_of(res, seq_len=6, start=1).scores, induction.scores)
    assert torch.equal(res.attn_pattern, heads.attention_patterns(model, ids))


def test_pure_pattern_scores_refuse_what_they_cannot_score(model, ids):
    with pytest.raises(ValueError, match="needs the site.*attn_pattern"):
        heads.previous_token_scores_of(capture(model, ids, sites="resid"))
    with pytest.raises(ValueError, match="blocks 0, 1, ... in order"):
        heads.current_token_scores_of(capture(model, ids, sites="attn_pattern", layers=[1, 2]))
    with pytest.raises(TypeError, match="Residuals"):
        heads.previous_token_scores_of(heads.attention_patterns(model, ids))
    with pytest.raises(ValueError, match="do not repeat"):
        heads.induction_scores_of(capture(model, ids, sites="attn_pattern"), seq_len=5)
    with pytest.raises(ValueError, match="exceeds the 11 captured positions"):
        heads.induction_scores_of(capture(model, ids, sites="attn_pattern"), seq_len=6)


def test_head_scores_outputs(model):
    scores = heads.HeadScores(torch.tensor([[0.1, 0.9], [float("nan"), 0.5]]), "test")
    assert scores.top(2) == [("0.1", pytest.approx(0.9)), ("1.1", 0.5)]
    assert [label for label, _ in scores.top(5, largest=False)] == ["0.0", "1.1", "0.1"]
    frame = scores.to_frame()
    assert list(frame.columns) == ["layer", "head", "label", "score"] and len(frame) == 4
    assert "L1" in scores.table() and "top: 0.1 0.900" in scores.table()
    assert scores.plot().axes
    assert "tensor(" not in repr(scores) and "<table" in scores._repr_html_()
    with pytest.raises(ValueError, match=r"\[n_layer, n_head\]"):
        heads.HeadScores(torch.zeros(3), "bad")


def test_to_frame_without_pandas_names_the_extra(model, monkeypatch):
    ov = heads.ov_eigen_summary(model)
    monkeypatch.setitem(sys.modules, "pandas", None)
    for result in (ov.copying_scores, ov, heads.composition_scores(model, "v", n_baseline=3)):
        with pytest.raises(ImportError, match=r'pip install "reslens\[frame\]"'):
            result.to_frame()


# --- OV circuits -----------------------------------------------------------------------------


def _dense_full_ov(arch, layer: int, head: int, embedding: torch.Tensor, fold_ln: bool) -> torch.Tensor:
    """``embedding W_V W_O W_U^T [V, V]``; ``fold_ln``: the norms' γ (Gemma: ``1 + weight``) folded in."""
    w_v, w_o, w_u = arch.W_V(layer)[head].double(), arch.W_O(layer)[head].double(), arch.W_U.double()
    if fold_ln:
        w_v = arch.norm("attn", layer).gamma.double()[:, None] * w_v
        w_u = w_u * arch.norm("final").gamma.double()
    return embedding.double() @ w_v @ w_o @ w_u.T  # [V, V]


def _embedded_rows(model) -> torch.Tensor:
    """Every token's row as the model's own embedding module puts it into the residual ``[V, d]``
    (Gemma's module scales by √d_model; the stored weight ``W_E`` is not what a head reads)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(model.config.vocab_size))


def _eigen_error(small: torch.Tensor, dense_matrix: torch.Tensor) -> float:
    """Largest distance of a dense eigenvalue (top d_head by modulus) to the nearest of ``small``,
    relative to the largest modulus; also checks that the dense matrix has no other nonzero eigenvalue."""
    dense = torch.linalg.eigvals(dense_matrix)
    order = dense.abs().argsort(descending=True)
    top, rest = dense[order[: small.numel()]], dense[order[small.numel():]]
    assert rest.abs().max() < 1e-8 * float(dense.abs().max())
    return float((top[:, None] - small.to(torch.complex128)[None]).abs().amin(-1).max() / dense.abs().max())


@pytest.mark.parametrize("fold_ln", [False, True])
def test_ov_eigenvalues_equal_the_dense_vocab_matrix(model, fold_ln):
    arch = adapter(model)
    with torch.no_grad():
        for layer in range(3):
            arch.attn_norm(layer).weight.uniform_(0.5, 1.5)
        arch.final_norm_module.weight.uniform_(0.5, 1.5)
        ov = heads.ov_eigen_summary(model, fold_ln=fold_ln)
        assert ov.eigenvalues.shape == (3, 4, 8) and ov.copying.shape == (3, 4)
        for layer, head in [(0, 0), (1, 3), (2, 1)]:
            dense = _dense_full_ov(arch, layer, head, arch.W_E, fold_ln)
            assert _eigen_error(ov.eigenvalues[layer, head], dense) < 1e-4
            lam = torch.linalg.eigvals(dense)
            copying = float(lam.sum().real / lam.abs().sum())
            assert float(ov.copying[layer, head]) == pytest.approx(copying, abs=1e-4)


def test_ov_eigenvalues_are_float64_exact_on_a_peaked_embedding():
    """Issue 18 item 10: W_U^T W_E is formed in float64. GPT-2's embeddings share one large direction (the
    embedded model's top singular value is ~650x the next); here one shared direction makes it ~1e5x. The
    float32 product put eigenvalues off by ~2e-5 of each head's largest; float64 leaves complex64 rounding."""
    model = make_model()
    arch = adapter(model)
    with torch.no_grad():
        shared = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(0))
        arch.W_E.add_(10 * shared / shared.norm())
        singular = torch.linalg.svdvals(arch.W_U.double().T @ arch.W_E.double())
        assert singular[0] > 1e4 * singular[1]
        ov = heads.ov_eigen_summary(model)
        for layer in range(3):
            for head in range(4):
                dense = _dense_full_ov(arch, layer, head, arch.W_E, False)
                assert _eigen_error(ov.eigenvalues[layer, head], dense) < 1e-6, (layer, head)
                lam = torch.linalg.eigvals(dense)
                copying = float(lam.sum().real / lam.abs().sum())
                assert float(ov.copying[layer, head]) == pytest.approx(copying, abs=1e-6)


def test_ov_effective_embedding_through_mlp0(model):
    arch = adapter(model)
    ov = heads.ov_eigen_summary(model, effective_embedding="embed+mlp0")
    assert ov.effective_embedding == "embed+mlp0" and "embedding embed+mlp0" in ov.copying_scores.description
    with torch.no_grad():
        w_e = arch.W_E
        effective = w_e + arch.mlp(0)(arch.mlp_norm(0)(w_e))
        assert _eigen_error(ov.eigenvalues[2, 1], _dense_full_ov(arch, 2, 1, effective, False)) < 1e-4
        # layer 0 reads W_E itself
        assert _eigen_error(ov.eigenvalues[0, 1], _dense_full_ov(arch, 0, 1, w_e, False)) < 1e-4
    for old_name in ("wte", "wte+mlp0", "mlp"):
        with pytest.raises(ValueError, match="effective_embedding must be one of 'embed', 'embed\\+mlp0'"):
            heads.ov_eigen_summary(model, effective_embedding=old_name)


def test_copying_head_and_deleter_flags():
    # a head whose OV circuit maps every embedding onto itself (W_V W_O = projection) copies
    model = make_model(n_layer=1, n_embd=8, n_head=2)
    arch = adapter(model)
    with torch.no_grad():
        for w in (arch.W_Q(0), arch.W_K(0), arch.W_V(0), arch.W_O(0)):
            w.zero_()
        arch.W_V(0)[0].copy_(torch.eye(8)[:, :4])
        arch.W_O(0)[0].copy_(torch.eye(8)[:4])
        arch.W_V(0)[1].copy_(torch.eye(8)[:, 4:])
        arch.W_O(0)[1].copy_(-torch.eye(8)[4:])
    ov = heads.ov_eigen_summary(model)
    assert float(ov.copying[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(ov.copying[0, 1]) == pytest.approx(-1.0, abs=1e-5)
    assert ov.top(1) == [("0.0", pytest.approx(1.0, abs=1e-5))]
    attends_self = heads.HeadScores(torch.tensor([[0.2, 0.8]]), "current-token")
    assert [label for label, *_ in ov.deleters(attends_self)] == ["0.1"]
    assert ov.deleters(heads.HeadScores(torch.tensor([[0.9, 0.1]]), "current-token")) == []
    assert set(ov.to_frame().columns) >= {"copying", "max_abs_eig", "min_real_eig"}
    assert "tensor(" not in repr(ov) and "OVSummary" in repr(ov) and "<table" in ov._repr_html_()


# --- composition ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_equals_the_dense_formula(model, kind):
    arch = adapter(model)
    comp = heads.composition_scores(model, kind, n_baseline=20)
    ov = lambda a, h: arch.W_V(a)[h] @ arch.W_O(a)[h]  # noqa: E731
    qk = lambda a, h: arch.W_Q(a)[h] @ arch.W_K(a)[h].T  # noqa: E731
    reader = {"q": qk, "k": lambda a, h: qk(a, h).T, "v": ov}[kind]
    with torch.no_grad():
        for a, i, b, j in [(0, 0, 1, 0), (0, 3, 2, 2), (1, 2, 2, 1)]:
            w_a, w_b = ov(a, i), reader(b, j)
            expected = (w_a @ w_b).norm() / (w_a.norm() * w_b.norm())
            assert float(comp.raw[a, i, b, j]) == pytest.approx(float(expected), rel=1e-4)
    assert torch.equal(comp.mask, ~comp.raw.isnan())
    assert comp.mask[0, :, 1:].all() and not comp.mask[1, :, :2].any() and not comp.mask[2].any()
    torch.testing.assert_close(comp.scores[comp.mask], comp.raw[comp.mask] - comp.baseline)


def test_composition_on_hand_built_heads():
    """Writer 0.0 writes into dims 0-3; reader 1.0 reads queries from dims 0-3, reader 1.1 from 4-7."""
    model = make_model(n_layer=2, n_embd=8, n_head=2)
    arch = adapter(model)
    low, high = torch.eye(8)[:, :4], torch.eye(8)[:, 4:]
    with torch.no_grad():
        for layer in range(2):
            for w in (arch.W_Q(layer), arch.W_K(layer), arch.W_V(layer), arch.W_O(layer)):
                w.zero_()
        arch.W_V(0)[0].copy_(low)
        arch.W_O(0)[0].copy_(low.T)  # OV = projection onto dims 0-3 (Frobenius norm 2)
        arch.W_V(0)[1].copy_(high)
        arch.W_O(0)[1].copy_(high.T)
        arch.W_Q(1)[0].copy_(low)
        arch.W_K(1)[0].copy_(high)  # QK = low @ high^T: queries from 0-3, keys from 4-7
        arch.W_Q(1)[1].copy_(high)
        arch.W_K(1)[1].copy_(high)
    q = heads.composition_scores(model, "q", n_baseline=10)
    k = heads.composition_scores(model, "k", n_baseline=10)
    # ‖P_low · low high^T‖ / (‖P_low‖ ‖low high^T‖) = 2 / (2 * 2) = 0.5
    assert float(q.raw[0, 0, 1, 0]) == pytest.approx(0.5, abs=1e-5)
    assert float(q.raw[0, 1, 1, 0]) == pytest.approx(0.0, abs=1e-5)
    assert float(k.raw[0, 1, 1, 0]) == pytest.approx(0.5, abs=1e-5)  # keys read dims 4-7
    assert float(k.raw[0, 0, 1, 0]) == pytest.approx(0.0, abs=1e-5)
    assert float(q.raw[0, 1, 1, 1]) == pytest.approx(0.5, abs=1e-5)
    assert q.top(1)[0][2] == pytest.approx(0.5 - q.baseline, abs=1e-5)


def test_composition_baseline_matches_dense_random_matrices():
    mean, std = _random_baseline(24, 6, 400, seed=1)
    gen = torch.Generator().manual_seed(7)
    dense = []
    for _ in range(400):
        w_a = torch.randn(24, 6, generator=gen) @ torch.randn(6, 24, generator=gen)
        w_b = torch.randn(24, 6, generator=gen) @ torch.randn(6, 24, generator=gen)
        dense.append(float((w_a @ w_b).norm() / (w_a.norm() * w_b.norm())))
    dense = torch.tensor(dense)
    assert mean == pytest.approx(float(dense.mean()), abs=4 * float(dense.std()) / 20)
    assert 0 < std < 0.2


def test_composition_outputs(model):
    comp = heads.composition_scores(model, "k", n_baseline=10)
    top = comp.top(3)
    assert len(top) == 3 and all(int(w.split(".")[0]) < int(r.split(".")[0]) for w, r, _ in top)
    assert top[0][2] == pytest.approx(float(comp.scores[comp.mask].max()))
    frame = comp.to_frame()
    assert len(frame) == int(comp.mask.sum()) == 4 * 8 + 4 * 4
    assert comp.reader(2, 1).scores.shape == (3, 4) and comp.reader(2, 1).scores[2].isnan().all()
    assert comp.plot().axes and "K-composition" in comp.table()
    assert "tensor(" not in repr(comp) and "<table" in comp._repr_html_()
    with pytest.raises(ValueError, match="kind must be one of"):
        heads.composition_scores(model, "o")
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        comp.reader(3, 0)


def test_composition_with_a_zero_head_is_nan_and_skipped_by_top():
    model = make_model(n_layer=2, n_embd=8, n_head=2)
    with torch.no_grad():
        adapter(model).W_O(0)[1].zero_()
    comp = heads.composition_scores(model, "k", n_baseline=5)
    assert comp.raw[0, 1].isnan().all() and not comp.raw[0, 0, 1].isnan().any()
    assert len(comp.top(10)) == 2 and all(w == "0.0" for w, _, _ in comp.top(10))


def test_circuit_helpers_match_the_weights(model):
    arch = adapter(model)
    torch.testing.assert_close(heads.ov_circuit(model, 1, 2), arch.W_V(1)[2] @ arch.W_O(1)[2])
    torch.testing.assert_close(heads.qk_circuit(model, 1, 2), arch.W_Q(1)[2] @ arch.W_K(1)[2].T)


def _effective_rows(model, arch) -> torch.Tensor:
    """``E + mlp_0(norm(E))`` [V, d] through the model's own modules (E: :func:`_embedded_rows`; the MLP's
    output norm where it has one; a mixture of experts' block with its router)."""
    rows = _embedded_rows(model)
    with torch.no_grad():
        norm, out_norm = arch.mlp_norm(0), arch.mlp_out_norm(0)
        out = arch.mlp(0)(rows[None] if norm is None else norm(rows[None]))
        out = out[0] if isinstance(out, tuple) else out
        return rows + (out if out_norm is None else out_norm(out))[0]


def test_weight_analyses_run_on_every_family(family_model):
    """OV eigenvalues (γ folded, through block 0's MLP) and Q/K/V composition on every family, or the refusal.

    Composition reads the writer's OV circuit and, for "q" / "k", the reader's QK circuit: it is refused with
    the first of the two the family cannot give."""
    arch = adapter(family_model)
    summary = lambda: heads.ov_eigen_summary(family_model, fold_ln=True, effective_embedding="embed+mlp0")  # noqa: E731
    if "ov_circuit" in arch.limits:
        _assert_refused(arch, "ov_circuit", summary)
    else:
        ov = summary()
        assert ov.eigenvalues.shape == (arch.n_layer, arch.n_head, arch.d_head)
        assert (ov.copying.abs() <= 1).all()
        with torch.no_grad():
            dense = _dense_full_ov(arch, 1, 3, _effective_rows(family_model, arch), True)
            assert _eigen_error(ov.eigenvalues[1, 3], dense) < 1e-4
            dense = _dense_full_ov(arch, 1, 3, _embedded_rows(family_model), False)
            assert _eigen_error(heads.ov_eigen_summary(family_model).eigenvalues[1, 3], dense) < 1e-4
    for kind in ("q", "k", "v"):
        needs = ("ov_circuit",) if kind == "v" else ("ov_circuit", "qk_circuit")
        refused = [key for key in needs if key in arch.limits]
        if refused:
            _assert_refused(arch, refused[0],
                            lambda: heads.composition_scores(family_model, kind, fold_ln=True, n_baseline=5))
            continue
        comp = heads.composition_scores(family_model, kind, fold_ln=True, n_baseline=5)
        assert comp.raw.shape == (arch.n_layer, arch.n_head) * 2
        assert not comp.raw[comp.mask].isnan().any()
        with torch.no_grad():  # writer 0.3 into reader 2.1: the dense formula, γ folded by hand
            gamma = arch.norm("attn", 2).gamma[:, None]
            w_a = heads.ov_circuit(family_model, 0, 3, fold_ln=True)
            w_b = (gamma * arch.W_V(2)[1]) @ arch.W_O(2)[1] if kind == "v" else (
                (gamma * arch.W_Q(2)[1]) @ arch.rotation(2, 0) @ (gamma * arch.W_K(2)[1]).T)
            w_b = w_b.T if kind == "k" else w_b
            expected = (w_a @ w_b).norm() / (w_a.norm() * w_b.norm())
        assert float(comp.raw[0, 3, 2, 1]) == pytest.approx(float(expected), rel=1e-4)


# --- robustness --------------------------------------------------------------------------------


def test_nothing_changes_on_the_model(model, ids):
    before, hooks_before = model_state(model), hook_counts(model)
    heads.induction_scores(model, seq_len=5, n=2)
    heads.previous_token_scores(model, ids)
    heads.ov_eigen_summary(model, fold_ln=True, effective_embedding="embed+mlp0")
    heads.composition_scores(model, "q", fold_ln=True, n_baseline=5)
    attribution.logit_attribution(model, ids, target=1)
    assert_same_state(before, model_state(model))
    assert hook_counts(model) == hooks_before


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: heads.induction_scores(m, seq_len=21), ValueError, "needs 42 positions"),
        (lambda m: heads.induction_scores(m, seq_len=1), ValueError, r"seq_len=1 is out of range \(exp"),
        (lambda m: heads.induction_scores(m, n=2.0), TypeError, "n must be an int"),
        (lambda m: heads.repeated_tokens(m, seq_len=5, token_pool=[1]), ValueError, "at least 2"),
        (lambda m: heads.repeated_tokens(m, seq_len=5, token_pool=[1, 200]), ValueError, "outside the vocab"),
        (lambda m: heads.repeated_tokens(m, seq_len=5, bos_token_id=VOCAB), ValueError, "bos_token_id=97"),
        (lambda m: heads.previous_token_scores(m, torch.tensor([[4]])), ValueError, "at least 2 real tokens"),
        (lambda m: heads.ov_circuit(m, 3, 0), ValueError, r"layer=3 is out of range \(expected 0..2\)"),
        (lambda m: heads.qk_circuit(m, 0, -1), ValueError, "head=-1 is out of range"),
        (lambda m: heads.ov_circuit(m, 0, True), TypeError, "head must be an int"),
        (lambda m: heads.ov_eigen_summary(m, fold_ln="yes"), TypeError, "fold_ln must be True or False"),
        (lambda m: heads.composition_scores(m, "k", n_baseline=0), ValueError, "n_baseline=0 is out of"),
        (lambda m: heads.composition_scores(m, "k", fold_ln=1), TypeError, "fold_ln must be True or False"),
        (lambda m: heads.induction_scores(torch.nn.Linear(2, 2)), TypeError, "supported family"),
        (lambda m: heads.HeadScores(torch.zeros(2, 2), "x").top(0), ValueError, "k=0 is out of range"),
    ],
)
def test_errors_name_the_parameter(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


def test_results_round_trip_through_safetensors(model, tmp_path):
    results = [
        heads.induction_scores(model, seq_len=5, n=2),
        heads.ov_eigen_summary(model, effective_embedding="embed+mlp0"),
        heads.composition_scores(model, "v", n_baseline=5),
    ]
    for i, result in enumerate(results):
        path = tmp_path / "sub" / f"r{i}.safetensors"
        result.save(path)
        back = type(result).load(path)
        for f in dataclasses.fields(result):
            a, b = getattr(result, f.name), getattr(back, f.name)
            if isinstance(a, torch.Tensor):
                assert torch.equal(a.nan_to_num(-9), b.nan_to_num(-9)), f.name
            else:
                assert a == b, f.name
    with pytest.raises(ValueError, match="not a reslens HeadScores file"):
        heads.HeadScores.load(tmp_path / "sub" / "r1.safetensors")


# --- the command and the embedded model --------------------------------------------------------


def test_cli_heads_prints_the_top_heads_and_writes_the_figure(tmp_path, capsys):
    from reslens.cli import main
    from reslens.models import embedded_model_dir

    path = tmp_path / "model"
    make_model(vocab_size=50257, n_positions=24).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat and the dog sat on the log. " * 3)
    out = tmp_path / "heads.png"
    argv = ["heads", "--model", str(path), "--out", str(out), "--top", "3", "--n", "2", "--file", str(text)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "top induction heads" in captured.out and "top previous-token heads" in captured.out
    assert "top copying heads" in captured.out and "K-composition" in captured.out
    assert "using 12" in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_heads_on_a_family_that_refuses_the_circuits_says_why_and_gives_the_rest(tmp_path, capsys):
    from reslens.cli import main

    path = tmp_path / "gemma3"
    make_family("gemma3").save_pretrained(path)  # QK-norm and a norm on the heads' sum: no weight circuits
    out = tmp_path / "heads.png"
    assert main(["heads", "--model", str(path), "--out", str(out), "--top", "3", "--n", "2",
                 "--seq-len", "8"]) == 0
    captured = capsys.readouterr().out
    assert "top induction heads" in captured and "top previous-token heads" in captured
    assert "top copying heads" not in captured
    assert "copying scores: not given for this gemma3 model: each head's output passes a norm" in captured
    assert "K-composition: not given for this gemma3 model" in captured
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, match", [
    (["--top", "0"], "--top"), (["--n", "-1"], "--n"), (["--seq-len", "1"], "--seq-len"),
    (["--file", "/no/such/file.txt"], "--file"),
])
def test_cli_heads_refuses_bad_arguments_before_the_work(argv, match, capsys):
    from reslens.cli import main

    assert main(["heads", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0]


def test_patterns_that_would_not_fit_in_memory_are_refused_before_any_forward(model, monkeypatch, capsys):
    """The patterns' size is checked against the device's free memory (``reslens heads --seq-len 5000`` on
    SmolLM2 tried to allocate 72 GB and died with a traceback); here the free memory is made small."""
    import reslens._checks
    from reslens.cli import main

    monkeypatch.setattr(reslens._checks, "available_memory", lambda device: 300_000, raising=False)
    before = hook_counts(model)
    with pytest.raises(ValueError, match=r"attention patterns of 10 x 40 tokens \(3 layers x 4 heads x "
                       r"40x40 positions, float32\) needs about 1.5 MB, and cpu has 0.3 MB free; use a "
                       r"smaller seq_len or n \(got seq_len=20, n=10\)"):
        heads.induction_scores(model, seq_len=20, n=10)
    with pytest.raises(ValueError, match=r"3 x 40 tokens.*needs about 0.4 MB.*give fewer or shorter seq"):
        heads.previous_token_scores(model, torch.ones(3, 40, dtype=torch.long))
    assert hook_counts(model) == before
    heads.induction_scores(model, seq_len=8, n=4)  # small enough: scored as before
    assert main(["heads", "--seq-len", "5000"]) == 2  # capped to the context of 128, then refused: one line
    err = capsys.readouterr().err
    assert "using 64" in err and "reslens heads: error: capturing the attention patterns" in err
    assert "seq_len=64, n=10" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def embedded():
    import reslens

    return reslens.load_model()


def _embedded_flags() -> dict:
    from reslens.models import embedded_model_dir

    return json.loads((embedded_model_dir() / "reslens.json").read_text(encoding="utf-8"))


def test_embedded_model_flags_are_machine_readable_and_agree_with_the_card():
    """Issue 12 item 8: the provisional flag is a JSON key (scripts/write_model_card.py), not a word."""
    from reslens.models import embedded_model_dir

    flags = _embedded_flags()
    assert isinstance(flags["provisional"], bool)
    card = (embedded_model_dir() / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert ("**Provisional" in card) == flags["provisional"]


def test_embedded_model_head_pipeline(embedded):
    """The whole pipeline on the embedded model, from one capture per input.

    Always: scores in range and consistent with their pure forms, DLA exact, K-composition above the random
    baseline. A final model (``provisional: false`` in reslens.json) must have at least 2 induction heads
    (>= 0.3); a provisional one must still be what its card says it is: no head at 0.3."""
    model, tokenizer = embedded
    arch = adapter(model)
    ids = heads.repeated_tokens(arch, seq_len=30, n=4)
    res = capture(arch, ids, sites=("attn_pattern",), dtype=torch.float32)
    rows = res.attn_pattern.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    induction = heads.induction_scores(arch, seq_len=30, n=4)
    assert torch.equal(induction.scores, heads.induction_scores_of(res, seq_len=30).scores)
    assert induction.scores.shape == (arch.n_layer, arch.n_head)
    assert ((induction.scores >= 0) & (induction.scores <= 1)).all()
    duplicate = heads.duplicate_token_scores_of(res)
    assert ((duplicate.scores >= 0) & (duplicate.scores <= 1)).all()
    text = "The cat sat on the mat. The dog sat on the log."
    previous = heads.previous_token_scores(arch, text, tokenizer=tokenizer)
    assert previous.scores.shape == (arch.n_layer, arch.n_head)
    assert ((previous.scores > 0) & (previous.scores < 1)).all()
    comp = heads.composition_scores(arch, "k", n_baseline=20)
    assert comp.top(1)[0][2] > 0
    dla = attribution.logit_attribution(arch, "The cat sat on the", target=" mat", tokenizer=tokenizer)
    torch.testing.assert_close(dla.sum(), dla.logit, atol=1e-4, rtol=1e-5)
    strong = int((induction.scores >= 0.3).sum())
    if _embedded_flags()["provisional"]:
        assert strong == 0, f"the provisional model now has {strong} induction heads: rewrite its card"
    else:
        assert strong >= 2, f"the final embedded model has {strong} induction heads >= 0.3; expected >= 2"


# --- every family: scores, circuits under GQA and rotary, RMSNorm folding ------------------------


def _assert_refused(arch, analysis: str, call) -> None:
    """``call`` raises ``arch.require(analysis)``'s ValueError: the analysis, the family, the reason."""
    reason = arch.limits[analysis]
    message = f"{analysis.replace('_', ' ')} is refused on this {arch.family} model: {reason}"
    with pytest.raises(ValueError, match=re.escape(message)):
        call()

_ATOL = dict(atol=1e-5, rtol=1e-4)


def _family_ids(n_pos: int = 14, seed: int = 5) -> torch.Tensor:
    """Ids with repeats (a short random stretch written twice) so duplicate-token scores exist."""
    half = torch.randint(3, VOCAB, (2, n_pos // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half], dim=1)


def _brute_scores(pattern: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, stat: torch.Tensor):
    """Previous / current / duplicate scores by loops over (sequence, query) pairs: [L, H] each.

    A query (and, for previous and duplicate, the key it is scored on) counts only at ``stat`` positions;
    current-token queries also need an earlier real key."""
    prev, cur, dup = [], [], []
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            if not stat[b, i]:
                continue
            if i > 0 and stat[b, i - 1]:
                prev.append(pattern[:, b, :, i, i - 1])
            if real[b, :i].any():
                cur.append(pattern[:, b, :, i, i])
            copies = [j for j in range(i) if stat[b, j] and ids[b, j] == ids[b, i]]
            if copies:
                dup.append(pattern[:, b, :, i, copies].sum(-1))
    return tuple(torch.stack(v).mean(0) for v in (prev, cur, dup))


def _eager(model):
    """A copy of ``model`` that runs its eager attention, which can return the softmax weights."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def _eager_patterns(eager, ids: torch.Tensor) -> torch.Tensor:
    """The model's own softmax attention ``[L, B, H, P, P]`` (``output_attentions=True``)."""
    with torch.no_grad():
        return torch.stack(eager(ids, output_attentions=True).attentions).float()


def test_pattern_scores_brute_force_on_every_family(family_model, caplog):
    """Previous / current / duplicate / induction scores by loops over the model's own eager attention."""
    ids = _family_ids()
    res = capture(family_model, ids, sites="attn_pattern", dtype=torch.float32)
    real = torch.ones(ids.shape, dtype=torch.bool)
    eager = _eager(family_model)
    prev, cur, dup = _brute_scores(_eager_patterns(eager, ids), ids, real, real)
    torch.testing.assert_close(heads.previous_token_scores(family_model, ids).scores, prev)
    torch.testing.assert_close(heads.current_token_scores_of(res).scores, cur)
    torch.testing.assert_close(heads.duplicate_token_scores_of(res).scores, dup)
    windows = [adapter(family_model).window(layer) for layer in range(3)]
    for seq_len in (3, 6):  # 3: within the sliding windows of 4 (Mistral; Gemma 2/3 local layers); 6: beyond
        rep = heads.repeated_tokens(family_model, seq_len=seq_len, n=2, seed=1, bos_token_id=1)
        pattern = _eager_patterns(eager, rep)
        query = torch.arange(1 + seq_len, 1 + 2 * seq_len)
        expected = pattern[..., query, query - seq_len + 1].mean(dim=(1, 3))
        caplog.clear()
        with caplog.at_level("WARNING", logger="reslens.heads.scores"):
            induction = heads.induction_scores(family_model, seq_len=seq_len, n=2, seed=1, bos_token_id=1)
        torch.testing.assert_close(induction.scores, expected)
        hidden = [w is not None and seq_len > w for w in windows]  # the earlier copy is out of the window
        assert (induction.scores[hidden] == 0).all() and (induction.scores[[not h for h in hidden]] > 0).all()
        assert ("sliding window" in caplog.text) == any(hidden)


def test_special_positions_are_left_out_like_pads_on_every_family(family_model):
    """Issue 13 item 3: a BOS marked in Batch.special_mask is attended to, but no statistic counts it.

    Row 0 starts with BOS (id 1), and id 1 recurs at position 4 as a plain token: the special position is no
    earlier copy of it, and attention to it from the next token is no previous-token attention. Row 1 is
    left-padded, then BOS."""
    ids = torch.tensor([[1, 5, 6, 7, 1, 5, 6, 8, 9, 5], [0, 0, 0, 1, 11, 12, 11, 13, 12, 14]])
    real = torch.ones(ids.shape, dtype=torch.bool)
    real[1, :3] = False
    special = torch.zeros(ids.shape, dtype=torch.bool)
    special[0, 0], special[1, 3] = True, True
    batch = Batch(ids, real, special_mask=special)
    res = capture(family_model, batch, sites="attn_pattern", dtype=torch.float32)
    assert torch.equal(res.stat_mask, real & ~special)
    prev, cur, dup = _brute_scores(res.attn_pattern, ids, real, real & ~special)
    torch.testing.assert_close(heads.previous_token_scores_of(res).scores, prev)
    torch.testing.assert_close(heads.current_token_scores_of(res).scores, cur)
    torch.testing.assert_close(heads.duplicate_token_scores_of(res).scores, dup)
    assert "over 13 positions" in heads.previous_token_scores(family_model, batch).description
    unmarked = heads.previous_token_scores(family_model, Batch(ids, real))
    assert "over 15 positions" in unmarked.description  # 8 + 5, or 9 + 6 when the BOS are not marked
    with pytest.raises(ValueError, match="non-special"):
        heads.induction_scores_of(res, seq_len=2, start=0)


def test_induction_beyond_a_sliding_window_scores_zero_and_warns(caplog):
    model = make_family("mistral")  # window 4: a key 5 back is invisible
    with caplog.at_level("WARNING", logger="reslens.heads.scores"):
        scores = heads.induction_scores(model, seq_len=6, n=2)
    assert torch.equal(scores.scores, torch.zeros(3, 4)) and "sliding window" in caplog.text


def _actual_scores(family_model, res, layer: int) -> torch.Tensor:
    """Pre-softmax scores [B, H, P, P] (scaled, unmasked) from the model's own q and k.

    Rotary families: the model's own rotated q and k, recorded where its attention calls the
    ``apply_rotary_pos_emb`` of its modeling file during a forward (so fused q/k/v projections, partial
    rotary and QK-norm are as the model computes them). GPT-2: q and k from the per-head weights, biases."""
    arch = adapter(family_model)
    if arch.positional != "rotary":
        h = arch.norm("attn", layer)(res.resid[layer])
        q = torch.einsum("bpd,hde->bhpe", h, arch.W_Q(layer)) + arch.b_Q(layer)[None, :, None]
        k = torch.einsum("bpd,hde->bhpe", h, arch.W_K(layer)) + arch.b_K(layer)[None, :, None]
        return (q @ k.transpose(-1, -2)) * arch.attn_scale(layer)
    modeling = sys.modules[type(arch.attn(layer)).__module__]
    own, rotated = modeling.apply_rotary_pos_emb, []

    def recording(*args, **kwargs):
        rotated.append(own(*args, **kwargs))
        return rotated[-1]

    with mock.patch.object(modeling, "apply_rotary_pos_emb", recording), torch.no_grad():
        family_model(res.input_ids, position_ids=res.position_ids)
    assert len(rotated) == arch.n_layer  # one call per block, in order
    q, k = rotated[layer]  # [B, H, P, dh], [B, H_kv, P, dh]
    k = k.repeat_interleave(arch.n_head // arch.n_kv_head, dim=1)
    return (q @ k.transpose(-1, -2)) * arch.attn_scale(layer)


def test_qk_circuit_at_each_offset_reproduces_the_models_scores(family_model):
    """Issue 13 item 4: x̂_i W_Q R(i-j) W_K^T x̂_j^T (+ the bias terms) is the model's own pre-softmax score.

    Under partial rotary (GPT-NeoX, Phi-3) R rotates the first dims of each head and passes the rest through.
    Under QK-norm or an attention soft-cap the score is no bilinear form of x̂: the circuit is refused."""
    arch = adapter(family_model)
    if "qk_circuit" in arch.limits:
        _assert_refused(arch, "qk_circuit", lambda: heads.qk_circuit(family_model, 1, 0, offset=3))
        _assert_refused(arch, "qk_circuit", lambda: heads.qk_circuit(family_model, 0, 2, fold_ln=True))
        return
    ids = _family_ids()
    res = capture(family_model, ids, sites=("resid", "attn_pattern"), dtype=torch.float32)
    layer, n_pos = 1, ids.shape[1]
    actual = _actual_scores(family_model, res, layer)
    with torch.no_grad():
        h = arch.norm("attn", layer)(res.resid[layer])  # [B, P, d]
        b_q, b_k = arch.b_Q(layer), arch.b_K(layer)
        for head in (0, arch.n_head - 1):
            circuits = [heads.qk_circuit(family_model, layer, head, offset=t) for t in range(n_pos)]
            for i in range(n_pos):
                for j in range(i + 1):
                    score = torch.einsum("bd,de,be->b", h[:, i], circuits[i - j], h[:, j])
                    if b_q is not None:  # Qwen2: the bias terms, linear in x̂, beside the bilinear form
                        rot = arch.rotation(layer, i - j)
                        q_b, k_b = b_q[head] @ rot, rot @ b_k[head]
                        score = (score + h[:, i] @ arch.W_Q(layer)[head] @ k_b
                                 + h[:, j] @ arch.W_K(layer)[head] @ q_b + q_b @ b_k[head])
                    torch.testing.assert_close(score * arch.attn_scale(layer), actual[:, head, i, j],
                                               atol=2e-5, rtol=1e-4)
    window = getattr(arch, "window", lambda _: None)(layer)
    visible = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    if window is not None:
        visible &= ~torch.ones(n_pos, n_pos, dtype=torch.bool).tril(-window)
    pattern = actual.masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(pattern, res.attn_pattern[layer], atol=1e-5, rtol=1e-5)
    at_5 = heads.qk_circuit(family_model, layer, 0, offset=5)
    same = torch.equal(at_5, heads.qk_circuit(family_model, layer, 0))
    assert same == (arch.positional == "learned")  # learned positions: the offset changes nothing


def test_qk_and_ov_circuits_fold_the_norm_scale_free(family_model):
    """fold_ln=True: the circuit on centre(x)/σ(x) equals the plain one on norm(x) - β (RMSNorm: β = 0)."""
    arch = adapter(family_model)
    x = torch.randn(5, arch.d_model, generator=torch.Generator().manual_seed(2)) * 3
    norm = arch.norm("attn", 2)
    with torch.no_grad():
        normed = norm(x) - (0 if norm.bias is None else norm.bias)
        bare = norm.centre(x) / norm.scale(x)[:, None]
        if "qk_circuit" in arch.limits:
            _assert_refused(arch, "qk_circuit", lambda: heads.qk_circuit(family_model, 2, 1, fold_ln=True))
        else:
            for offset in (0, 3):
                plain = heads.qk_circuit(family_model, 2, 1, offset=offset)
                folded = heads.qk_circuit(family_model, 2, 1, offset=offset, fold_ln=True)
                torch.testing.assert_close(bare @ folded @ bare.T, normed @ plain @ normed.T,
                                           atol=1e-4, rtol=1e-4)
            with pytest.raises(ValueError, match="offset=-1 is out of range"):
                heads.qk_circuit(family_model, 0, 0, offset=-1)
        if "ov_circuit" in arch.limits:
            _assert_refused(arch, "ov_circuit", lambda: heads.ov_circuit(family_model, 2, 1, fold_ln=True))
        else:
            torch.testing.assert_close(bare @ heads.ov_circuit(family_model, 2, 1, fold_ln=True),
                                       normed @ heads.ov_circuit(family_model, 2, 1), atol=1e-5, rtol=1e-4)


def test_ov_circuits_are_per_query_head_under_gqa(family_model):
    """Each query head's OV circuit (its key/value head's W_V, its own W_O) rebuilds what it writes.

    Where the attention output passes a norm (Gemma 2/3, OLMo 2) the per-head values still rebuild attn_z,
    but what a head adds to the residual depends on every head there: the OV circuit is refused."""
    arch = adapter(family_model)
    ids = _family_ids()
    res = capture(family_model, ids, sites=("resid", "attn_pattern", "attn_z"), dtype=torch.float32)
    layer = 1
    with torch.no_grad():
        h = arch.norm("attn", layer)(res.resid[layer])  # [B, P, d]
        z = arch.split_heads(res.attn_z[layer])  # [B, P, H, dh]
        for head in range(arch.n_head):
            kv = arch.kv_head(head)
            if hasattr(arch, "W_V_kv"):
                assert torch.equal(arch.W_V(layer)[head], arch.W_V_kv(layer)[kv])
            pattern = res.attn_pattern[layer][:, head]  # [B, P, P]
            b_v = 0 if arch.b_V(layer) is None else arch.b_V(layer)[head]
            torch.testing.assert_close(pattern @ (h @ arch.W_V(layer)[head] + b_v), z[:, :, head], **_ATOL)
            if "ov_circuit" in arch.limits:
                continue
            written = z[:, :, head] @ arch.W_O(layer)[head]
            ov = heads.ov_circuit(family_model, layer, head)
            bias = pattern.sum(-1, keepdim=True) * (b_v @ arch.W_O(layer)[head] if arch.b_V(layer) is not None
                                                    else 0)
            torch.testing.assert_close(pattern @ (h @ ov) + bias, written, **_ATOL)
    if "ov_circuit" in arch.limits:
        _assert_refused(arch, "ov_circuit", lambda: heads.ov_circuit(family_model, layer, 0))
        _assert_refused(arch, "ov_circuit", lambda: heads.ov_eigen_summary(family_model))
        return
    if arch.n_kv_head < arch.n_head:  # two query heads on one key/value head still differ
        assert arch.kv_head(0) == arch.kv_head(1)
        first, second = (heads.ov_circuit(family_model, layer, head) for head in (0, 1))
        assert not torch.allclose(first, second)
    ov = heads.ov_eigen_summary(family_model)
    assert ov.copying.shape == (arch.n_layer, arch.n_head)



@pytest.mark.parametrize("fold_ln", [False, True])
def test_ov_eigenvalues_equal_the_dense_matrix_on_every_family(family_model, fold_ln):
    arch = adapter(family_model)
    if "ov_circuit" in arch.limits:
        _assert_refused(arch, "ov_circuit", lambda: heads.ov_eigen_summary(family_model, fold_ln=fold_ln))
        return
    ov = heads.ov_eigen_summary(family_model, fold_ln=fold_ln)
    embedding = _embedded_rows(family_model)
    with torch.no_grad():
        for layer, head in [(0, 1), (2, 3)]:
            dense = _dense_full_ov(arch, layer, head, embedding, fold_ln)
            assert _eigen_error(ov.eigenvalues[layer, head], dense) < 1e-4
            lam = torch.linalg.eigvals(dense)
            assert float(ov.copying[layer, head]) == pytest.approx(float(lam.sum().real / lam.abs().sum()),
                                                                   abs=1e-4)


@pytest.mark.parametrize("kind", ["q", "k"])
def test_composition_by_offset_equals_the_dense_formula(family_model, kind):
    arch = adapter(family_model)
    offsets = [0, 3, 7]
    refused = [key for key in ("ov_circuit", "qk_circuit") if key in arch.limits]
    if refused:  # the writer's OV circuit is checked first, then the reader's QK circuit
        _assert_refused(arch, refused[0], lambda: heads.composition_by_offset(family_model, kind, offsets))
        _assert_refused(arch, refused[0], lambda: heads.composition_scores(family_model, kind, n_baseline=5))
        return
    by_offset = heads.composition_by_offset(family_model, kind, offsets, n_baseline=20)
    assert by_offset.scores.shape == (3, arch.n_layer, arch.n_head, arch.n_layer, arch.n_head)
    plain = heads.composition_scores(family_model, kind, n_baseline=20)
    assert plain.offset == (0 if arch.positional == "rotary" else None)
    at_0 = by_offset.at(0)
    assert torch.equal(at_0.raw.nan_to_num(-9), plain.raw.nan_to_num(-9)) and at_0.baseline == plain.baseline
    with torch.no_grad():
        for o, offset in enumerate(offsets):
            for a, i, b, j in [(0, 0, 1, 0), (0, 3, 2, 2), (1, 2, 2, 1)]:
                w_a = heads.ov_circuit(family_model, a, i)
                w_b = heads.qk_circuit(family_model, b, j, offset=offset)
                w_b = w_b if kind == "q" else w_b.T
                expected = (w_a @ w_b).norm() / (w_a.norm() * w_b.norm())
                assert float(by_offset.raw[o, a, i, b, j]) == pytest.approx(float(expected), rel=1e-4)
    moved = not torch.allclose(by_offset.raw[1][by_offset.mask], by_offset.raw[0][by_offset.mask])
    assert moved == (arch.positional == "rotary")  # learned positions: every offset is the same
    torch.testing.assert_close(by_offset.pair("0.3", "2.2"), by_offset.scores[:, 0, 3, 2, 2])


def test_composition_by_offset_outputs_and_errors(tmp_path):
    model = make_family("llama")
    by_offset = heads.composition_by_offset(model, "k", torch.tensor([0, 2]), n_baseline=5)
    assert by_offset.offsets == (0, 2) and "offset     2" in by_offset.table()
    assert "tensor(" not in repr(by_offset) and "<table" in by_offset._repr_html_()
    assert by_offset.at(2).offset == 2 and "at query-key offset 2" in by_offset.at(2).table()
    by_offset.save(tmp_path / "c.safetensors")
    back = heads.CompositionByOffset.load(tmp_path / "c.safetensors")
    assert back.offsets == (0, 2) and torch.equal(back.raw.nan_to_num(-9), by_offset.raw.nan_to_num(-9))
    assert heads.composition_scores(model, "v", n_baseline=5).offset is None
    for call, error, match in [
        (lambda: heads.composition_by_offset(model, "v", [0]), ValueError, "V-composition does not depend"),
        (lambda: heads.composition_by_offset(model, "k", []), TypeError, "non-empty sequence"),
        (lambda: heads.composition_by_offset(model, "k", [0, 0]), ValueError, "distinct"),
        (lambda: heads.composition_by_offset(model, "k", [0, 40]), ValueError, r"offsets\[1\]=40 is out of"),
        (lambda: heads.composition_by_offset(model, "q", [1.0]), TypeError, r"offsets\[0\] must be an int"),
        (lambda: by_offset.at(1), ValueError, r"offset must be one of \[0, 2\]"),
        (lambda: by_offset.pair("2.0", "1.0"), ValueError, "not in an earlier layer"),
        (lambda: by_offset.pair("x", "1.0"), ValueError, "writer must be a head label"),
    ]:
        with pytest.raises(error, match=match):
            call()
