"""Residual PCA against scikit-learn, the batched trajectory path against per-example fits."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError

from reslens import capture
from reslens.pca import ResidualPCA, pca_experiment, trajectory_pca
from helpers import VOCAB


def test_residual_pca_equals_sklearn_up_to_sign():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.5, 12)
    ours = ResidualPCA(n_components=5).fit(x)
    ref = PCA(n_components=5).fit(x.double().numpy())
    for a, b in zip(ours.components_.numpy(), ref.components_):
        assert np.allclose(a, b, atol=1e-5) or np.allclose(a, -b, atol=1e-5)
    np.testing.assert_allclose(ours.explained_variance_ratio_.numpy(), ref.explained_variance_ratio_, rtol=1e-5)
    np.testing.assert_allclose(ours.mean_.numpy(), ref.mean_, atol=1e-6)
    # deterministic signs: the largest-magnitude loading of every component is positive
    comps = ours.components_
    assert (comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all()


@pytest.mark.parametrize("center", [True, False])
def test_inverse_transform_reconstructs_at_full_rank(center):
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) + 3
    pca = ResidualPCA(center=center).fit(x)
    torch.testing.assert_close(pca.inverse_transform(pca.transform(x)), x, atol=1e-4, rtol=1e-4)


def test_incremental_matches_full_fit():
    x = torch.randn(400, 10, generator=torch.Generator().manual_seed(2)) * torch.linspace(4, 1, 10)
    full = ResidualPCA().fit(x)
    streamed = ResidualPCA()
    for part in x.split(100):
        streamed.partial_fit(part)  # keeping every component, the streamed fit is exact
    torch.testing.assert_close(streamed.explained_variance_ratio_, full.explained_variance_ratio_, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(streamed.components_, full.components_, atol=1e-4, rtol=0)
    torch.testing.assert_close(streamed.mean_, full.mean_, atol=1e-5, rtol=0)


def test_residual_pca_errors():
    with pytest.raises(NotFittedError):
        ResidualPCA().transform(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        ResidualPCA().fit(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ResidualPCA().fit(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="n_components=9"):
        ResidualPCA(n_components=9).fit(torch.randn(5, 3))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        ResidualPCA().fit([[1, 2], [3, 4]])


@pytest.mark.parametrize("normalize", [None, "unit", "ln_f"])
@pytest.mark.parametrize("center", [True, False])
def test_batched_trajectory_equals_per_example_fits(model, ids, normalize, center):
    result = trajectory_pca(model, ids, positions="all", center=center, normalize=normalize)
    res = capture(model, ids, sites=("resid",))
    g_ln = model.transformer.ln_f
    for e in range(0, len(result.seq), 7):
        stack = res.resid[:, result.seq[e], result.pos[e]]  # [n_layer + 1, d_model]
        if normalize == "unit":
            stack = stack / stack.norm(dim=-1, keepdim=True)
        elif normalize == "ln_f":
            with torch.no_grad():
                stack = g_ln(stack)
        ref = ResidualPCA(center=center).fit(stack)
        k = ref.explained_variance_ratio_.shape[0]
        torch.testing.assert_close(result.explained_variance_ratio[e, :k], ref.explained_variance_ratio_, atol=1e-4, rtol=1e-4)
        cos = torch.nn.functional.cosine_similarity(result.pc1[e], ref.components_[0], dim=0)
        assert abs(float(cos)) > 0.999
        # sign convention: the last row (centred if centring) has a non-negative PC1 coordinate
        last = stack[-1] - (stack.mean(0) if center else 0)
        assert float(result.pc1[e] @ last) >= -1e-5


def test_vocabulary_readout_and_final_prediction(model, ids):
    result = trajectory_pca(model, ids)
    logits = model(ids).logits
    assert torch.equal(result.final_prediction, logits[:, -1].argmax(-1))
    readout = model.lm_head(model.transformer.ln_f(result.pc1))
    assert torch.equal(result.pc1_top_token, readout.argmax(-1))
    rank = (readout > readout.gather(1, result.final_prediction[:, None])).sum(-1)
    assert torch.equal(result.pc1_final_rank, rank)
    assert torch.equal(result.match, result.pc1_final_rank == 0)
    assert len(result.to_frame()) == ids.shape[0]


def test_trajectory_bad_inputs(model, ids):
    with pytest.raises(ValueError, match=r"positions\[0\]=20"):
        trajectory_pca(model, ids, positions=20)
    with pytest.raises(ValueError, match="one int per sequence"):
        trajectory_pca(model, ids, positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="normalize must be one of"):
        trajectory_pca(model, ids, normalize="l2")
    with pytest.raises(ValueError, match="at least 2 layers"):
        trajectory_pca(model, ids, layers=[3])


class WordTokenizer:
    """Maps each word to an id (stable hash), enough to drive the experiment on a tiny model."""

    pad_token_id, eos_token_id = None, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + sum(map(ord, w)) % (VOCAB - 1) for w in text.split()]}


def test_experiment_runs_every_condition(model):
    text = " ".join(f"w{i % 37} x{i % 11}" for i in range(300))
    exp = pca_experiment(model, WordTokenizer(), [text], n=30, max_length=32, progress=False)
    summary = exp.summary()
    assert list(summary.condition) == ["baseline", "no_embedding", "uncentred", "unit_norm", "ln_f", "random"]
    assert (summary.pc1_evr_mean > 0).all() and (summary.pc1_evr_mean <= 1).all()
    assert len(exp.to_frame()) == 30 * 6
    assert exp.results["baseline"]["explained_variance_ratio"].shape == (30, 4)
    assert exp.results["no_embedding"]["explained_variance_ratio"].shape == (30, 3)
    assert "baseline" in exp.table()
    exp.plot()
    again = pca_experiment(model, WordTokenizer(), [text], n=30, max_length=32, progress=False)
    assert torch.equal(again.examples, exp.examples)


def test_experiment_bad_inputs(model):
    with pytest.raises(ValueError, match="n=500 is larger than the"):
        pca_experiment(model, WordTokenizer(), ["a b c d e f g h i j k l"], n=500, progress=False)
    with pytest.raises(ValueError, match="no position"):
        pca_experiment(model, WordTokenizer(), [""], n=1, progress=False)
    with pytest.raises(ValueError, match="n must be a positive int"):
        pca_experiment(model, WordTokenizer(), ["a b"], n=0, progress=False)
