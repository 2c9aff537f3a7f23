"""Residual PCA against scikit-learn, the batched trajectory path against per-example fits."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError

from reslens import capture
from reslens.pca import (
    PCAExperiment,
    ResidualPCA,
    TrajectoryPCAResult,
    pca_experiment,
    trajectory_pca,
    trajectory_pca_of,
)
from helpers import VOCAB


def test_residual_pca_equals_sklearn_up_to_sign():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.5, 12)
    ours = ResidualPCA(n_components=5).fit(x)
    ref = PCA(n_components=5).fit(x.double().numpy())
    for a, b in zip(ours.components_.numpy(), ref.components_):
        assert np.allclose(a, b, atol=1e-5) or np.allclose(a, -b, atol=1e-5)
    np.testing.assert_allclose(
        ours.explained_variance_ratio_.numpy(), ref.explained_variance_ratio_, rtol=1e-5
    )
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
    torch.testing.assert_close(
        streamed.explained_variance_ratio_, full.explained_variance_ratio_, atol=1e-5, rtol=1e-4
    )
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


@pytest.mark.parametrize("normalize", [None, "unit", "final_norm"])
@pytest.mark.parametrize("center", [True, False])
def test_batched_trajectory_equals_per_example_fits(model, ids, normalize, center):
    result = trajectory_pca(model, ids, positions="all", center=center, normalize=normalize)
    res = capture(model, ids, sites=("resid",))
    g_ln = model.transformer.ln_f
    for e in range(0, len(result.seq), 7):
        stack = res.resid[:, result.seq[e], result.pos[e]]  # [n_layer + 1, d_model]
        if normalize == "unit":
            stack = stack / stack.norm(dim=-1, keepdim=True)
        elif normalize == "final_norm":
            with torch.no_grad():
                stack = g_ln(stack)
        ref = ResidualPCA(center=center).fit(stack)
        k = ref.explained_variance_ratio_.shape[0]
        torch.testing.assert_close(
            result.explained_variance_ratio[e, :k], ref.explained_variance_ratio_, atol=1e-4, rtol=1e-4
        )
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
    with pytest.raises(ValueError, match=r"positions=20 is out of range \(expected -11..10\)"):
        trajectory_pca(model, ids, positions=20)
    with pytest.raises(ValueError, match="one int per sequence"):
        trajectory_pca(model, ids, positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"positions\[1\]=12 is out of range"):
        trajectory_pca(model, ids, positions=torch.tensor([1, 12, 3]))
    with pytest.raises(ValueError, match="positions must be one of 'last', 'all'"):
        trajectory_pca(model, ids, positions="first")
    with pytest.raises(TypeError, match="center must be True or False"):
        trajectory_pca(model, ids, center=1)
    with pytest.raises(ValueError, match="normalize must be one of"):
        trajectory_pca(model, ids, normalize="ln_f")  # the old name of "final_norm"
    with pytest.raises(ValueError, match="normalize must be one of"):
        trajectory_pca(model, ids, normalize="l2")
    with pytest.raises(ValueError, match="at least 2 layers"):
        trajectory_pca(model, ids, layers=[3])


class WordTokenizer:
    """Maps each word to an id (stable hash), enough to drive the experiment on a tiny model."""

    pad_token_id, eos_token_id = None, 0

    def __call__(self, text, add_special_tokens=False):  # a string or a list of them, as HuggingFace's
        def ids(t):
            return [1 + sum(map(ord, w)) % (VOCAB - 1) for w in t.split()]

        return {"input_ids": ids(text) if isinstance(text, str) else [ids(t) for t in text]}


def test_experiment_runs_every_condition(model):
    text = " ".join(f"w{i % 37} x{i % 11}" for i in range(300))
    exp = pca_experiment(model, WordTokenizer(), [text], n=30, max_length=32, progress=False)
    summary = exp.summary()
    assert list(summary.condition) == [
        "baseline",
        "no_embedding",
        "uncentred",
        "unit_norm",
        "final_norm",
        "random",
    ]
    assert (summary.pc1_evr_mean > 0).all() and (summary.pc1_evr_mean <= 1).all()
    assert len(exp.to_frame()) == 30 * 6
    assert exp.baseline.explained_variance_ratio.shape == (30, 4)
    assert exp.condition("no_embedding").explained_variance_ratio.shape == (30, 3)
    assert exp.random.explained_variance_ratio.shape == (30, 1)
    assert torch.equal(exp.final_norm.match, exp.final_norm.pc1_top_token == exp.final_prediction)
    assert "baseline" in exp.table()
    exp.plot()
    again = pca_experiment(model, WordTokenizer(), [text], n=30, max_length=32, progress=False)
    assert torch.equal(again.examples, exp.examples)


def test_experiment_bad_inputs(model):
    with pytest.raises(ValueError, match="n=500 is larger than the"):
        pca_experiment(model, WordTokenizer(), ["a b c d e f g h i j k l"], n=500, progress=False)
    with pytest.raises(ValueError, match="no position"):
        pca_experiment(model, WordTokenizer(), [""], n=1, progress=False)
    with pytest.raises(ValueError, match=r"n=0 is out of range \(expected >= 1\)"):
        pca_experiment(model, WordTokenizer(), ["a b"], n=0, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(min_context=-3), ValueError, r"min_context=-3 is out of range \(expected >= 0\)"),
        (dict(batch_size=0), ValueError, r"batch_size=0 is out of range"),
        (dict(max_length=0), ValueError, r"max_length=0 is out of range"),
        (dict(n=2.0), TypeError, "n must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(progress="no"), TypeError, "progress must be True or False"),
    ],
)
def test_experiment_options_are_checked_up_front(model, kwargs, error, match):
    text = " ".join(f"w{i % 37}" for i in range(100))
    with pytest.raises(error, match=match):
        pca_experiment(model, WordTokenizer(), [text], **{"n": 5, "progress": False, **kwargs})


def test_experiment_round_trip_and_display(model, tmp_path):
    text = " ".join(f"w{i % 37} x{i % 11}" for i in range(200))
    exp = pca_experiment(model, WordTokenizer(), [text], n=12, max_length=32, progress=False)
    exp.save(tmp_path / "exp.safetensors")
    back = PCAExperiment.load(tmp_path / "exp.safetensors")
    assert back.n == 12 and torch.equal(back.examples, exp.examples)
    for name in ("baseline", "final_norm", "random"):
        for field in ("explained_variance_ratio", "match", "pc1_final_rank"):
            assert torch.equal(getattr(back.condition(name), field), getattr(exp.condition(name), field))
    assert back.table() == exp.table() and "(no norm)" in exp.table()
    assert (
        "<table>" in exp._repr_html_()
        and len(repr(exp)) < 200
        and "ConditionResult(n=12" in repr(exp.baseline)
    )
    with pytest.raises(ValueError, match="condition must be one of"):
        exp.condition("ln_f")


def test_trajectory_pure_form_on_one_capture(model, ids, tmp_path):
    from reslens.arch import adapter

    arch = adapter(model)
    res = capture(arch, ids, sites=("resid", "resid_mid", "mlp_out"))  # one capture, several analyses
    pure = trajectory_pca_of(res, arch, positions="all", normalize="final_norm")
    wrapped = trajectory_pca(model, ids, positions="all", normalize="final_norm")
    for name in ("explained_variance_ratio", "pc1", "pc1_top_token", "pc1_final_rank", "final_prediction"):
        assert torch.equal(getattr(pure, name), getattr(wrapped, name)), name
    assert torch.equal(trajectory_pca_of(res, arch, positions=None).pos, trajectory_pca(model, ids).pos)
    pure.save(tmp_path / "t.safetensors")
    back = TrajectoryPCAResult.load(tmp_path / "t.safetensors")
    assert back.layers == pure.layers and back.normalize == "final_norm" and torch.equal(back.pc1, pure.pc1)
    assert "<table>" in pure._repr_html_() and "examples=33" in repr(pure)
    with pytest.raises(ValueError, match="resid"):
        trajectory_pca_of(capture(arch, ids, sites=("mlp_out",)), arch)


def test_residual_pca_follows_the_sklearn_protocol():
    from sklearn.base import clone
    from sklearn.decomposition import IncrementalPCA

    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(3))
    pca = ResidualPCA(n_components=3)
    for part in x.split(20):
        pca.partial_fit(part)
    assert pca.incremental is False  # partial_fit no longer rewrites a constructor argument
    assert isinstance(pca.estimator_, IncrementalPCA)
    assert pca.get_params() == {"n_components": 3, "center": True, "incremental": False, "batch_size": None}
    assert pca.set_params(n_components=2) is pca and clone(pca).n_components == 2
    assert not hasattr(clone(pca), "components_")
    with pytest.raises(ValueError, match="continues an incremental fit"):
        ResidualPCA().fit(x).partial_fit(x)
    assert ResidualPCA(center=False).fit(x).estimator_ is None


def test_residual_pca_checks_torch_input_and_parameters():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(4))
    pca = ResidualPCA(n_components=2).fit(x)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pca.transform(bad)  # torch input goes through the same checks as numpy
    with pytest.raises(ValueError, match=r"x must be \[n_samples, 5\]"):
        pca.transform(torch.zeros(2, 4))
    assert pca.transform(x[:1]).shape == (1, 2)  # one sample is fine to transform
    with pytest.raises(TypeError, match="n_components must be an int"):
        ResidualPCA(n_components="2").fit(x)
    with pytest.raises(ValueError, match=r"n_components=0 is out of range"):
        ResidualPCA(n_components=0).fit(x)
    with pytest.raises(TypeError, match="incremental must be True or False"):
        ResidualPCA(incremental="yes").fit(x)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("normalize", [None, "unit", "final_norm"])
def test_trajectory_pca_on_rmsnorm_families_equals_per_example_fits(family, normalize):
    from helpers import make_family

    model = make_family(family)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    result = trajectory_pca(model, ids, positions="all", normalize=normalize)
    norm, head = model.model.norm, model.lm_head  # plain HF: the final RMSNorm and the head
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert torch.equal(result.final_prediction, out.logits.argmax(-1).flatten())
        readout = head(norm(result.pc1))  # PC1 read through the final RMSNorm and the head
    assert torch.equal(result.pc1_top_token, readout.argmax(-1))
    assert torch.equal(result.pc1_top_token_raw, (result.pc1 @ head.weight.T).argmax(-1))
    gamma, eps = norm.weight.detach(), norm.variance_epsilon
    for e in range(0, len(result.seq), 3):
        # HF's hidden_states are the raw residuals except the last (normed): rebuild it from capture
        stack = capture(model, ids, sites=("resid",)).resid[:, result.seq[e], result.pos[e]]
        assert torch.equal(stack[:-1], torch.stack(out.hidden_states[:-1])[:, result.seq[e], result.pos[e]])
        unit = stack / stack.norm(dim=-1, keepdim=True)
        if normalize == "unit":
            stack = unit
        elif normalize == "final_norm":  # RMSNorm: the unit vector times γ sqrt(d), shrunk only by eps
            mean_square = stack.pow(2).mean(-1, keepdim=True)
            shrink = (mean_square / (mean_square + eps)).sqrt()
            with torch.no_grad():
                stack = norm(stack)
            expected = gamma * unit * stack.shape[-1] ** 0.5 * shrink
            torch.testing.assert_close(stack, expected, atol=1e-5, rtol=1e-4)
        ref = ResidualPCA(center=True).fit(stack)
        k = ref.explained_variance_ratio_.shape[0]
        torch.testing.assert_close(result.explained_variance_ratio[e, :k], ref.explained_variance_ratio_,
                                   atol=1e-4, rtol=1e-4)
        cos = torch.nn.functional.cosine_similarity(result.pc1[e], ref.components_[0], dim=0)
        assert abs(float(cos)) > 0.999


def test_trajectory_pca_of_non_finite_residuals_is_refused_with_the_predictions_named(model, ids):
    import dataclasses

    res = capture(model, ids, sites=("resid",))
    resid = res.resid.clone()
    resid[2, 1, -1, 0] = float("inf")  # layer 2 of sequence 1's last token: prediction 1 of 3
    bad = dataclasses.replace(res, resid=resid)
    with pytest.raises(ValueError, match=r"NaN or inf at the chosen positions \(predictions \[1\] of 3"):
        trajectory_pca_of(bad, model)
    assert trajectory_pca_of(bad, model, positions=0).explained_variance_ratio.isfinite().all()


def test_the_experiment_without_a_tokenizer_says_it_needs_one(model):
    with pytest.raises(TypeError, match=r"tokenizer must be a HuggingFace tokenizer \(the experiment reads "
                                        r"text\).*got None"):
        pca_experiment(model, None, "The cat sat on the mat. " * 20, n=3, progress=False)
