"""reslens.heads against brute-force references on tiny random GPT-2s, plus the embedded model."""

from __future__ import annotations

import dataclasses
import math

import matplotlib
import pytest
import torch

from helpers import VOCAB, assert_same_state, hook_counts, make_model, model_state
from reslens import heads
from reslens._gpt2 import GPT2
from reslens.hooks import Batch, capture

matplotlib.use("Agg")


def _dense_attention(g: GPT2, layer: int, x: torch.Tensor):
    """Eager attention of one layer from the per-head weights: pattern [B, H, P, P], z [B, P, H, dh], out."""
    h = g.ln_1(layer)(x)
    q = torch.einsum("bpd,hde->bhpe", h, g.W_Q(layer)) + g.b_Q(layer)[None, :, None]
    k = torch.einsum("bpd,hde->bhpe", h, g.W_K(layer)) + g.b_K(layer)[None, :, None]
    v = torch.einsum("bpd,hde->bhpe", h, g.W_V(layer)) + g.b_V(layer)[None, :, None]
    n_pos = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(g.d_head)
    scores = scores.masked_fill(~torch.ones(n_pos, n_pos, dtype=torch.bool).tril(), float("-inf"))
    pattern = scores.softmax(-1)
    z = (pattern @ v).transpose(1, 2)  # [B, P, H, dh]
    out = torch.einsum("bphe,hed->bpd", z, g.W_O(layer)) + g.b_O(layer)
    return pattern, z, out


# --- per-head weights and the attn_z site ----------------------------------------------------


def test_per_head_weight_split_reproduces_the_attention_layer(model, ids):
    g = GPT2(model)
    res = capture(model, ids, sites=("resid", "attn_out", "attn_pattern", "attn_z"))
    assert res.attn_z.shape == (3, 3, 11, 32)
    with torch.no_grad():
        for layer in range(g.n_layer):
            pattern, z, out = _dense_attention(g, layer, res.resid[layer])
            torch.testing.assert_close(pattern, res.attn_pattern[layer], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(z, g.split_heads(res.attn_z[layer]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, res.attn_out[layer], atol=1e-5, rtol=1e-5)


def test_per_head_weights_are_views_with_the_documented_shapes(model):
    g = GPT2(model)
    assert g.W_Q(1).shape == g.W_K(1).shape == g.W_V(1).shape == (4, 32, 8)
    assert g.W_O(1).shape == (4, 8, 32) and g.b_Q(1).shape == (4, 8) and g.b_O(1).shape == (32,)
    # head 2's value weights are columns 2*d_model + 16 .. + 24 of c_attn
    torch.testing.assert_close(g.W_V(1)[2], model.transformer.h[1].attn.c_attn.weight[:, 64 + 16 : 64 + 24])
    assert g.W_O(1).data_ptr() == model.transformer.h[1].attn.c_proj.weight.data_ptr()


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
    torch.testing.assert_close(padded.scores, (8 * alone_a.scores + 4 * alone_b.scores) / 12, atol=1e-6, rtol=1e-5)
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


def test_head_scores_outputs(model):
    scores = heads.HeadScores(torch.tensor([[0.1, 0.9], [float("nan"), 0.5]]), "test")
    assert scores.top(2) == [("0.1", pytest.approx(0.9)), ("1.1", 0.5)]
    assert [label for label, _ in scores.top(5, largest=False)] == ["0.0", "1.1", "0.1"]
    frame = scores.to_frame()
    assert list(frame.columns) == ["layer", "head", "label", "score"] and len(frame) == 4
    assert "L1" in scores.table() and "top: 0.1 0.900" in scores.table()
    assert scores.plot().axes
    with pytest.raises(ValueError, match=r"\[n_layer, n_head\]"):
        heads.HeadScores(torch.zeros(3), "bad")


# --- OV circuits -----------------------------------------------------------------------------


def _dense_full_ov(g: GPT2, layer: int, head: int, embedding: torch.Tensor, fold_ln: bool) -> torch.Tensor:
    w_v, w_o, w_u = g.W_V(layer)[head].double(), g.W_O(layer)[head].double(), g.W_U.double()
    if fold_ln:
        w_v = g.ln_1(layer).weight.double()[:, None] * w_v
        w_u = w_u * g.ln_f.weight.double()
    return embedding.double() @ w_v @ w_o @ w_u.T  # [V, V]


def _match_eigenvalues(small: torch.Tensor, dense_matrix: torch.Tensor) -> None:
    dense = torch.linalg.eigvals(dense_matrix)
    top = dense[dense.abs().argsort(descending=True)[: small.numel()]]
    for value in small.to(torch.complex128):
        assert (top - value).abs().min() < 1e-4 * max(1.0, float(dense.abs().max()))
    assert dense.abs()[dense.abs().argsort(descending=True)[small.numel():]].max() < 1e-8 * float(dense.abs().max())


@pytest.mark.parametrize("fold_ln", [False, True])
def test_ov_eigenvalues_equal_the_dense_vocab_matrix(model, fold_ln):
    g = GPT2(model)
    with torch.no_grad():
        for layer in range(3):
            model.transformer.h[layer].ln_1.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        ov = heads.ov_eigen_summary(model, fold_ln=fold_ln)
        assert ov.eigenvalues.shape == (3, 4, 8) and ov.copying.shape == (3, 4)
        for layer, head in [(0, 0), (1, 3), (2, 1)]:
            dense = _dense_full_ov(g, layer, head, g.wte.weight, fold_ln)
            _match_eigenvalues(ov.eigenvalues[layer, head], dense)
            lam = torch.linalg.eigvals(dense)
            assert float(ov.copying[layer, head]) == pytest.approx(float(lam.sum().real / lam.abs().sum()), abs=1e-4)


def test_ov_effective_embedding_through_mlp0(model):
    g = GPT2(model)
    ov = heads.ov_eigen_summary(model, effective_embedding="wte+mlp0")
    with torch.no_grad():
        w_e = g.wte.weight
        effective = w_e + model.transformer.h[0].mlp(model.transformer.h[0].ln_2(w_e))
        _match_eigenvalues(ov.eigenvalues[2, 1], _dense_full_ov(g, 2, 1, effective, False))
        _match_eigenvalues(ov.eigenvalues[0, 1], _dense_full_ov(g, 0, 1, w_e, False))  # layer 0 reads W_E
    with pytest.raises(ValueError, match="effective_embedding must be one of"):
        heads.ov_eigen_summary(model, effective_embedding="mlp")


def test_copying_head_and_deleter_flags():
    # a head whose OV circuit maps every embedding onto itself (W_V W_O = projection) copies
    model = make_model(n_layer=1, n_embd=8, n_head=2)
    g = GPT2(model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.zero_()
        model.transformer.h[0].attn.c_proj.weight.zero_()
        g.W_V(0)[0].copy_(torch.eye(8)[:, :4])
        g.W_O(0)[0].copy_(torch.eye(8)[:4])
        g.W_V(0)[1].copy_(torch.eye(8)[:, 4:])
        g.W_O(0)[1].copy_(-torch.eye(8)[4:])
    ov = heads.ov_eigen_summary(model)
    assert float(ov.copying[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(ov.copying[0, 1]) == pytest.approx(-1.0, abs=1e-5)
    assert ov.top(1) == [("0.0", pytest.approx(1.0, abs=1e-5))]
    attends_self = heads.HeadScores(torch.tensor([[0.2, 0.8]]), "current-token")
    assert [label for label, *_ in ov.deleters(attends_self)] == ["0.1"]
    assert ov.deleters(heads.HeadScores(torch.tensor([[0.9, 0.1]]), "current-token")) == []
    assert set(ov.to_frame().columns) >= {"copying", "max_abs_eig", "min_real_eig"}


# --- composition ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_equals_the_dense_formula(model, kind):
    g = GPT2(model)
    comp = heads.composition_scores(model, kind, n_baseline=20)
    ov = lambda l, h: g.W_V(l)[h] @ g.W_O(l)[h]  # noqa: E731
    qk = lambda l, h: g.W_Q(l)[h] @ g.W_K(l)[h].T  # noqa: E731
    reader = {"q": qk, "k": lambda l, h: qk(l, h).T, "v": ov}[kind]
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
    g = GPT2(model)
    low, high = torch.eye(8)[:, :4], torch.eye(8)[:, 4:]
    with torch.no_grad():
        for layer in range(2):
            model.transformer.h[layer].attn.c_attn.weight.zero_()
            model.transformer.h[layer].attn.c_proj.weight.zero_()
        g.W_V(0)[0].copy_(low)
        g.W_O(0)[0].copy_(low.T)  # OV = projection onto dims 0-3 (Frobenius norm 2)
        g.W_V(0)[1].copy_(high)
        g.W_O(0)[1].copy_(high.T)
        g.W_Q(1)[0].copy_(low)
        g.W_K(1)[0].copy_(high)  # QK = low @ high^T: queries from 0-3, keys from 4-7
        g.W_Q(1)[1].copy_(high)
        g.W_K(1)[1].copy_(high)
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
    mean, std = heads._random_baseline(24, 6, 400, seed=1)
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
    with pytest.raises(ValueError, match="kind must be one of"):
        heads.composition_scores(model, "o")


# --- direct logit attribution ----------------------------------------------------------------


@pytest.mark.parametrize("against", [None, 11])
def test_logit_attribution_sums_to_the_model_logit(model, ids, against):
    dla = heads.logit_attribution(model, ids, target=[3, 4, 5], against=against)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    expected = logits[torch.arange(3), torch.tensor([3, 4, 5])]
    if against is not None:
        expected = expected - logits[:, against]
    torch.testing.assert_close(dla.sum(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dla.logit, expected, atol=2e-5, rtol=1e-5)
    assert len(dla.labels) == 3 + 3 * 6 and dla.labels[-1] == "ln_f bias" and dla.heads().shape == (3, 3, 4)


def test_logit_attribution_with_padding_and_a_position(model):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, VOCAB, (8,), generator=gen), torch.randint(0, VOCAB, (5,), generator=gen)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    ids[0], mask[0] = a, True
    ids[1, 3:], mask[1, 3:] = b, True
    dla = heads.logit_attribution(model, Batch(ids, mask), target=7)
    alone = heads.logit_attribution(model, b[None], target=7)
    torch.testing.assert_close(dla.contributions[1], alone.contributions[0], atol=1e-5, rtol=1e-5)
    assert dla.position.tolist() == [7, 7]
    at_4 = heads.logit_attribution(model, Batch(ids, mask), target=7, position=4)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask.long(), position_ids=Batch(ids, mask).position_ids).logits[:, 4, 7]
    torch.testing.assert_close(at_4.sum(), expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="is padding in sequence"):
        heads.logit_attribution(model, Batch(ids, mask), target=7, position=1)


def test_logit_attribution_pieces_are_the_components(model, ids):
    """Head pieces sum (with the bias) to the attention output's piece; MLP pieces match mlp_out."""
    g = GPT2(model)
    dla = heads.logit_attribution(model, ids, target=2)
    res = capture(model, ids, sites=("resid", "attn_out", "mlp_out"))
    x = res.resid[-1][:, -1]
    sigma = (x.var(-1, unbiased=False) + 1e-5).sqrt()
    u = model.transformer.ln_f.weight * g.W_U[2]
    u = u - u.mean()
    labels = list(dla.labels)
    with torch.no_grad():
        for layer in range(3):
            attn = (res.attn_out[layer, :, -1] @ u) / sigma
            cols = [labels.index(f"{layer}.{h}") for h in range(4)] + [labels.index(f"attn_bias {layer}")]
            torch.testing.assert_close(dla.contributions[:, cols].sum(-1), attn, atol=1e-5, rtol=1e-5)
            mlp = (res.mlp_out[layer, :, -1] @ u) / sigma
            torch.testing.assert_close(dla.contributions[:, labels.index(f"mlp {layer}")], mlp, atol=1e-5, rtol=1e-5)


def test_logit_attribution_on_a_base_model(base_model, ids):
    dla = heads.logit_attribution(base_model, ids, target=1)
    with torch.no_grad():
        final = base_model(ids).last_hidden_state[:, -1]
    torch.testing.assert_close(dla.sum(), final @ base_model.wte.weight[1], atol=2e-5, rtol=1e-5)


def test_logit_attribution_outputs_and_errors(model, ids):
    dla = heads.logit_attribution(model, ids, target=3)
    assert len(dla.top(4)) == 4 and abs(dla.top(1)[0][1]) == pytest.approx(float(dla.contributions[0].abs().max()))
    frame = dla.to_frame()
    assert len(frame) == 3 * len(dla.labels) and set(frame["kind"]) == {"embed", "pos_embed", "head", "attn_bias", "mlp", "ln_f bias"}
    assert "sum of pieces" in dla.table() and dla.plot().axes
    with pytest.raises(ValueError, match="outside the vocabulary"):
        heads.logit_attribution(model, ids, target=VOCAB)
    with pytest.raises(ValueError, match="one id or 3 ids"):
        heads.logit_attribution(model, ids, target=[1, 2])
    with pytest.raises(TypeError, match="tokenizer= is required"):
        heads.logit_attribution(model, ids, target="the")


# --- robustness --------------------------------------------------------------------------------


def test_nothing_changes_on_the_model(model, ids):
    before, hooks_before = model_state(model), hook_counts(model)
    heads.induction_scores(model, seq_len=5, n=2)
    heads.previous_token_scores(model, ids)
    heads.ov_eigen_summary(model, fold_ln=True, effective_embedding="wte+mlp0")
    heads.composition_scores(model, "q", fold_ln=True, n_baseline=5)
    heads.logit_attribution(model, ids, target=1)
    assert_same_state(before, model_state(model))
    assert hook_counts(model) == hooks_before


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: heads.induction_scores(m, seq_len=21), ValueError, "needs 42 positions"),
        (lambda m: heads.induction_scores(m, seq_len=1), ValueError, "seq_len must be at least 2"),
        (lambda m: heads.induction_scores(m, n=2.0), TypeError, "n must be an int"),
        (lambda m: heads.repeated_tokens(m, seq_len=5, token_pool=[1]), ValueError, "at least 2"),
        (lambda m: heads.repeated_tokens(m, seq_len=5, token_pool=[1, 200]), ValueError, "outside the vocabulary"),
        (lambda m: heads.previous_token_scores(m, torch.tensor([[4]])), ValueError, "at least 2 real tokens"),
        (lambda m: heads.ov_circuit(m, 3, 0), ValueError, r"layer=3 is out of range .* \(0..2\)"),
        (lambda m: heads.qk_circuit(m, 0, -1), ValueError, "head=-1 is out of range"),
        (lambda m: heads.ov_eigen_summary(m, fold_ln="yes"), TypeError, "fold_ln must be True or False"),
        (lambda m: heads.composition_scores(m, "k", n_baseline=0), ValueError, "n_baseline must be at least 1"),
        (lambda m: heads.induction_scores(torch.nn.Linear(2, 2)), TypeError, "GPT2LMHeadModel"),
    ],
)
def test_errors_name_the_parameter(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


def test_circuit_helpers_match_the_weights(model):
    g = GPT2(model)
    torch.testing.assert_close(heads.ov_circuit(model, 1, 2), g.W_V(1)[2] @ g.W_O(1)[2])
    torch.testing.assert_close(heads.qk_circuit(model, 1, 2), g.W_Q(1)[2] @ g.W_K(1)[2].T)


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
    assert main(["heads", "--model", str(path), "--out", str(out), "--top", "3", "--n", "2", "--file", str(text)]) == 0
    captured = capsys.readouterr()
    assert "top induction heads" in captured.out and "top previous-token heads" in captured.out
    assert "top copying heads" in captured.out and "K-composition" in captured.out
    assert "using 12" in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def embedded():
    import reslens

    return reslens.load_model()


def test_embedded_model_head_pipeline(embedded):
    """The whole pipeline on the embedded model; the >= 0.3 induction bar only once the model has induction heads."""
    from reslens.models import embedded_model_dir

    model, tokenizer = embedded
    induction = heads.induction_scores(model, seq_len=30, n=4)
    assert induction.scores.shape == (4, 4) and ((induction.scores >= 0) & (induction.scores <= 1)).all()
    previous = heads.previous_token_scores(model, "The cat sat on the mat. The dog sat on the log.", tokenizer=tokenizer)
    assert previous.scores.shape == (4, 4)
    comp = heads.composition_scores(model, "k", n_baseline=20)
    assert comp.top(1)[0][2] > 0
    dla = heads.logit_attribution(model, "The cat sat on the", target=" mat", tokenizer=tokenizer)
    torch.testing.assert_close(dla.sum(), dla.logit, atol=1e-4, rtol=1e-5)
    provisional = "provisional" in (embedded_model_dir() / "MODEL_CARD.md").read_text().lower()
    if provisional:
        pytest.xfail(f"the provisional embedded model has no induction heads yet (max score {induction.top(1)[0][1]:.3f})")
    assert induction.top(2)[1][1] >= 0.3


def test_results_round_trip_through_safetensors(model, ids, tmp_path):
    results = [
        heads.induction_scores(model, seq_len=5, n=2),
        heads.ov_eigen_summary(model),
        heads.composition_scores(model, "v", n_baseline=5),
        heads.logit_attribution(model, ids, target=2, against=3),
        heads.logit_attribution(model, ids, target=2),
    ]
    for i, result in enumerate(results):
        path = tmp_path / f"r{i}.safetensors"
        result.save(path)
        back = type(result).load(path)
        for f in dataclasses.fields(result):
            a, b = getattr(result, f.name), getattr(back, f.name)
            if isinstance(a, torch.Tensor):
                assert torch.equal(a.nan_to_num(-9), b.nan_to_num(-9)), f.name
            else:
                assert a == b, f.name
    with pytest.raises(ValueError, match="not a reslens HeadScores file"):
        heads.HeadScores.load(tmp_path / "r1.safetensors")


def test_composition_with_a_zero_head_is_nan_and_skipped_by_top():
    model = make_model(n_layer=2, n_embd=8, n_head=2)
    with torch.no_grad():
        GPT2(model).W_O(0)[1].zero_()
    comp = heads.composition_scores(model, "k", n_baseline=5)
    assert comp.raw[0, 1].isnan().all() and not comp.raw[0, 0, 1].isnan().any()
    assert len(comp.top(10)) == 2 and all(w == "0.0" for w, _, _ in comp.top(10))
