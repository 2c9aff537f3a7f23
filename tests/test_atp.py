"""Attribution patching (reslens.atp): gradients, first-order exactness, exact patches, planted misses."""

import math

import pytest
import torch
from helpers import FAMILIES, hook_counts, make_family

import reslens
from reslens.atp import AtPResult, attribution_patching, kl_to_clean, log_prob, logit_diff
from reslens.atp._passes import KINDS, gradient_pass, grad_keys
from reslens.tracing import Noise

IDS = torch.tensor([[5, 9, 14, 3, 7, 11, 4, 8], [2, 6, 10, 12, 1, 9, 13, 3]])
OTHER = torch.tensor([[5, 9, 3, 3, 12, 11, 4, 8], [2, 6, 8, 2, 11, 9, 13, 3]])
METRIC = logit_diff([3, 4], [5, 6])
MOE = ("mixtral", "olmoe", "qwen3_moe")


def _double(family):
    model = make_family(family).double()
    if family in MOE:  # the grouped-matmul experts run float32 only; the eager loop runs float64
        model.config._experts_implementation = "eager"
    return model


def _rel_err(result, kind):
    sel = torch.tensor([k == kind for k in result.checked_kind])
    est, exact = result.checked_estimate[sel].double(), result.checked_exact[sel].double()
    return float((est - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_is_the_exact_patch_to_first_order(family):
    """corrupt = clean + eps * noise: each kind's estimate equals its exact patch to O(eps) relative error."""
    model = _double(family)
    errs = {}
    for eps in (1e-3, 1e-4):
        noise = Noise(samples=2, scale=1.0, embedding_std=eps)
        r = attribution_patching(model, IDS, noise=noise, span=(1, 4), metric=METRIC, verify=4, sample=3)
        errs[eps] = {kind: _rel_err(r, kind) for kind in KINDS}
        assert r.spearman() > 0.95
    # Float64 models still run HF's norms in float32 (Llama/Gemma RMSNorm upcast, then cast back), which
    # floors the error near eps = 1e-4 for components with tiny effects; so: within 1% at one of the two eps.
    # MoE: the router's top-k choice is a kink (a near-tie can flip under a patch) and the routed
    # coefficients are read in float32: within 3% (measured: <= 2.6%).
    tol = 0.03 if family in MOE else 0.01
    for kind in KINDS:
        assert min(errs[1e-3][kind], errs[1e-4][kind]) < tol, (kind, errs)
    for kind in ("heads", "resid"):  # first order: the error shrinks with eps until the float32 floor
        assert errs[1e-4][kind] < max(errs[1e-3][kind] / 3, 3e-3), (kind, errs)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox", "olmoe"])
def test_gradients_match_finite_differences(family):
    """The gradient at a head's slice, an MLP's raw output and the residual equals a central difference."""
    model = _double(family)
    arch = reslens.adapter(model)
    batch = reslens.Batch.from_ids(IDS)
    keys = grad_keys(arch, KINDS)
    gp = gradient_pass(arch, batch, keys, METRIC, kinds=KINDS, keep=False)
    gen = torch.Generator().manual_seed(1)
    for key in [("attn_z", 1), ("mlp_raw", 0), ("resid", 2), ("mlp_out", 2)]:
        g = gp.grads[key]
        v = torch.randn(g.shape, generator=gen, dtype=g.dtype)
        v = v / v.norm()  # a unit step direction
        h = 1e-3  # HF's RMSNorm computes in float32 even in a float64 model: a step far above its rounding

        def value(sign, key=key, v=v):
            with reslens.patch(model, {key: lambda x: x + sign * h * v.view(x.shape)}), torch.no_grad():
                return float(METRIC(arch.unembed(arch.body(input_ids=IDS).last_hidden_state)))

        fd = (value(1) - value(-1)) / (2 * h)
        got = float((g * v).sum())
        assert math.isclose(got, fd, rel_tol=1e-3, abs_tol=5e-5)  # abs: float32 rounding / h, (key, got, fd)


@pytest.mark.parametrize("family", FAMILIES)
def test_verification_equals_one_patch_at_a_time(family):
    """The batched, staged exact effects equal patching each component alone in a whole forward."""
    model = make_family(family)
    arch = reslens.adapter(model)
    r = attribution_patching(model, IDS, OTHER, metric=METRIC, verify=3, sample=2, batch_size=5)
    corrupt = reslens.capture(model, OTHER, sites=("attn_z", "mlp_out", "resid", "mlp_act"))
    clean_act = reslens.capture(model, IDS, sites="mlp_act")

    def run(edits):
        with reslens.patch(model, edits), torch.no_grad():
            logits = model(input_ids=IDS).logits.float()
        return float(METRIC(logits))

    base = run({})
    d = arch.d_head
    for kind, layer, index, exact in zip(r.checked_kind, r.checked_layer.tolist(), r.checked_index.tolist(),
                                         r.checked_exact.tolist()):
        if kind == "heads":
            z = corrupt.get("attn_z", layer)[..., index * d:(index + 1) * d]

            def fn(x, z=z, index=index):
                x = x.clone()
                x[..., index * d:(index + 1) * d] = z
                return x

            edits = {("attn_z", layer): fn}
        elif kind == "mlp":
            edits = {("mlp_out", layer): lambda x, v=corrupt.get("mlp_out", layer): v.clone()}
        elif kind == "resid":
            def fn(x, v=corrupt.get("resid", layer), p=index):
                x = x.clone()
                x[:, p] = v[:, p]
                return x

            edits = {("resid", layer): fn}
        else:
            w = arch.mlp_weights(layer).W_out[index].detach()
            da = corrupt.get("mlp_act", layer)[..., index] - clean_act.get("mlp_act", layer)[..., index]

            def fn(x, add=da[..., None] * w):
                return x + add.view(x.shape) if x.ndim == 2 else x + add

            edits = {("mlp_raw", layer): fn}
        assert math.isclose(exact, run(edits) - base, rel_tol=1e-3, abs_tol=2e-5), (kind, layer, index)


def test_integrated_gradients_complete_at_the_embedding():
    """IG of resid layer 0 sums to metric(corrupt) - metric(clean) (completeness); one step is further off."""
    model = _double("llama")
    errs = []
    for steps in (1, 16):
        r = attribution_patching(model, IDS, OTHER, metric=log_prob([3, 4]), kinds="resid", method="ig",
                                 steps=steps, verify=0, sample=0)
        errs.append(abs(float(r.resid[0].sum()) - r.total_effect))
    assert errs[1] < 0.01 * abs(r.total_effect)
    assert errs[1] < errs[0] / 10


def test_kl_to_clean_has_no_gradient_at_the_clean_run_but_ig_sees_it():
    model = make_family("gpt2")
    atp = attribution_patching(model, IDS, OTHER, metric=kl_to_clean(), kinds="heads", verify=3, sample=0)
    ig = attribution_patching(model, IDS, OTHER, metric=kl_to_clean(), kinds="heads", method="ig", steps=4,
                              verify=3, sample=0)
    assert atp.clean_metric == pytest.approx(0, abs=1e-6) and atp.corrupt_metric > 0
    assert float(atp.heads.abs().max()) < 1e-4 * float(ig.heads.abs().max())
    assert float(atp.checked_exact.abs().max()) > 0  # the exact patches do move the output


def test_verification_flags_a_planted_miss():
    """A metric that overshoots: m = -(ld - ld_clean - t)^2 with t small. Its gradient at the clean run says
    +2t per unit of logit difference, so a component moving ld by more than 2t gets the wrong sign."""
    model = make_family("llama")
    base = attribution_patching(model, IDS, OTHER, metric=METRIC, kinds="heads", verify=6, sample=0)
    shifts = base.checked_exact  # each head's exact change of the logit difference (linear metric)
    t = float(shifts.abs().max()) / 4
    clean = base.clean_metric

    def overshoot(logits):
        return -((METRIC(logits) - clean - t) ** 2)

    r = attribution_patching(model, IDS, OTHER, metric=overshoot, kinds="heads", verify=6, sample=0)
    assert torch.equal(r.checked_layer, base.checked_layer)
    assert torch.equal(r.checked_index, base.checked_index)
    planted = [float(s) > 2 * t for s in shifts]  # exact: -(s - t)^2 + t^2 = s (2t - s) < 0; estimate 2ts > 0
    assert any(planted)
    flags = r.flags
    for is_planted, flag, exact in zip(planted, flags, r.checked_exact.abs().tolist()):
        if is_planted and exact > 0.05 * float(r.checked_exact.abs().max()):
            assert flag == "sign"
    assert "sign" in r.table()


def test_rank_flags_on_a_constructed_result():
    r = AtPResult(method="atp", steps=1, metric="m", clean_metric=0.0, corrupt_metric=1.0,
                  heads=torch.zeros(2, 2), mlp=None, memories=None, resid=None, checked_kind=("heads",) * 4,
                  checked_layer=torch.tensor([0, 0, 1, 1]), checked_index=torch.tensor([0, 1, 0, 1]),
                  checked_estimate=torch.tensor([1.0, 0.8, 0.1, 0.05]),
                  checked_exact=torch.tensor([1.0, 0.1, 0.5, 0.01]),
                  checked_top=torch.tensor([True, True, False, False]))
    assert r.flags == ("", "overrated", "missed", "")
    assert r.largest_misses(1)[0][0] == "0.1"
    assert r.spearman() == pytest.approx(0.8)


def test_weights_keep_no_gradient_and_hooks_go(tmp_path):
    model = make_family("qwen2")
    before = hook_counts(model)
    model.lm_head.weight.requires_grad_(False)  # a mixed state, restored as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    r = attribution_patching(model, IDS, OTHER, metric=METRIC, method="ig", steps=2, verify=2, sample=1)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hook_counts(model) == before

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(model, IDS, OTHER, metric=broken)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hook_counts(model) == before
    r.save(tmp_path / "atp.safetensors")
    back = AtPResult.load(tmp_path / "atp.safetensors")
    assert torch.equal(back.heads, r.heads) and back.checked_kind == r.checked_kind
    assert back.model_fingerprint == reslens.adapter(model).fingerprint != ""  # it knows which model made it
    assert r.table().splitlines()[-1].startswith("Read:")
    assert len(r.to_frame()) == r.heads.numel() + r.mlp.numel() + r.memories.numel() + r.resid.numel()
    assert "AtPResult" in r._repr_html_()
    import matplotlib

    matplotlib.use("Agg")
    fig = r.plot()
    assert len(fig.axes) == 3  # the scatter, the heads' heatmap and its colour bar


def test_bad_inputs():
    model = make_family("gpt2")
    with pytest.raises(TypeError, match="metric must be a callable"):
        attribution_patching(model, IDS, OTHER, metric=3)
    with pytest.raises(ValueError, match="kinds: 'neurons'"):
        attribution_patching(model, IDS, OTHER, metric=METRIC, kinds=("neurons",))
    with pytest.raises(ValueError, match="exactly one corruption"):
        attribution_patching(model, IDS, OTHER, metric=METRIC, noise=Noise(), span=(0, 2))
    with pytest.raises(ValueError, match="exactly one corruption"):
        attribution_patching(model, IDS, metric=METRIC)
    with pytest.raises(ValueError, match="same positions"):
        attribution_patching(model, IDS, OTHER[:, :5], metric=METRIC)
    with pytest.raises(ValueError, match="span must be"):
        attribution_patching(model, IDS, noise=Noise(), span=(3, 20), metric=METRIC)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(model, IDS, OTHER, metric=METRIC, method="atp*")
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(model, IDS, OTHER, metric=lambda logits: logits[:, -1, :3])
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(model, IDS, OTHER, metric=METRIC, method="ig", steps=0)


def test_graddrop_scores_what_dropping_each_block_changes():
    """GradDrop (AtP*): the score of block L-2's MLP is |AtP through the direct path only - AtP|, the direct
    gradient computed here by detaching the last block's outputs; nothing comes after the last block."""
    model = make_family("llama")
    arch = reslens.adapter(model)
    r = attribution_patching(model, IDS, OTHER, metric=METRIC, graddrop=True, verify=3, sample=1)
    gd, last = r.graddrop, arch.n_layer - 1
    assert all((getattr(gd, k) >= 0).all() for k in KINDS)
    assert float(gd.heads[last].abs().max()) == 0.0 and float(gd.mlp[last]) == 0.0
    assert float(gd.resid[last + 1].abs().max()) == 0.0
    assert float(gd.heads[0].sum()) > 0 and float(gd.resid[last].sum()) > 0
    held = {}

    def hold(x):
        held["x"] = x
        return x

    edits = {("mlp_out", last - 1): hold, ("attn_out", last): lambda x: x.detach(),
             ("mlp_out", last): lambda x: x.detach()}
    with reslens.patch(model, edits):
        value = METRIC(model(input_ids=IDS).logits.float())
    (g,) = torch.autograd.grad(value, [held["x"]])
    delta = (reslens.capture(model, OTHER, sites="mlp_out").get("mlp_out", last - 1)
             - reslens.capture(model, IDS, sites="mlp_out").get("mlp_out", last - 1))
    direct = float((g * delta).sum())
    assert float(gd.mlp[last - 1]) == pytest.approx(abs(direct - float(r.mlp[last - 1])), rel=1e-4, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="graddrop"):
        attribution_patching(model, IDS, OTHER, metric=METRIC, method="ig", graddrop=True)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gpt_neox_seq", "phi3", "mixtral"])
@pytest.mark.parametrize("method", ["atp", "ig"])
def test_edges_sum_to_node_estimates(family, method, tmp_path):
    """Each upstream's edges sum to its node estimate (the residual's gradient is the sum of its readers');
    the last MLP feeds only the logits; a reader never comes before its writer."""
    from reslens.atp import EdgeResult, edge_attribution

    model = make_family(family)
    arch = reslens.adapter(model)
    edges = edge_attribution(model, IDS, OTHER, metric=METRIC, method=method, steps=3)
    nodes = attribution_patching(model, IDS, OTHER, metric=METRIC, kinds=("heads", "mlp", "resid"),
                                 method=method, steps=3, verify=0, sample=0)
    totals = dict(zip(edges.upstream, edges.node_totals.tolist()))
    scale = float(nodes.heads.abs().max())
    for layer in range(arch.n_layer):
        for head in range(arch.n_head):
            node = float(nodes.heads[layer, head])
            assert totals[f"{layer}.{head}"] == pytest.approx(node, abs=1e-4 * scale)
        assert totals[f"mlp {layer}"] == pytest.approx(float(nodes.mlp[layer]), rel=1e-4, abs=1e-6)
    assert totals["embed"] == pytest.approx(float(nodes.resid[0].sum()), rel=1e-4, abs=1e-6)
    last = edges.upstream.index(f"mlp {arch.n_layer - 1}")
    assert edges.scores[last, :-1].isnan().all() and not edges.scores[last, -1].isnan()
    assert edges.scores[edges.upstream.index("1.0"), edges.downstream.index("attn 1")].isnan()
    assert not edges.scores[edges.upstream.index("1.0"), edges.downstream.index("mlp 1")].isnan()
    edges.save(tmp_path / "edges.safetensors")
    loaded = EdgeResult.load(tmp_path / "edges.safetensors")
    assert torch.equal(loaded.scores.isnan(), edges.scores.isnan())
    assert loaded.model_fingerprint == arch.fingerprint != ""
    assert edges.table().splitlines()[-1].startswith("Read:")


@pytest.mark.parametrize("family", ["gpt_neox", "gemma2", "olmo2"])
def test_edges_refused_where_the_reader_split_or_head_writes_are_not_linear(family):
    from reslens.atp import edge_attribution

    with pytest.raises(ValueError, match="refused"):
        edge_attribution(make_family(family), IDS, OTHER, metric=METRIC)
