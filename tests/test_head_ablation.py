"""Per-head interventions: the attn_z patch site and head_ablation, against plain torch hooks on HF."""

import pytest
import torch
from helpers import FAMILIES, make_family

import reslens
from reslens.heads import head_ablation

IDS = torch.tensor([[5, 9, 14, 3, 7, 11, 4, 8], [2, 6, 10, 12, 1, 9, 13, 3]])
OTHER = torch.tensor([[7, 3, 3, 9, 12, 5, 6, 1], [4, 4, 8, 2, 11, 10, 7, 5]])
HEADS = [(1, 0), (1, 3), (2, 1)]


def _o_proj(model, layer):
    """The attention output projection of ``layer``, found by HF's own module name (not through reslens)."""
    names = (f"layers.{layer}.self_attn.o_proj", f"h.{layer}.attn.c_proj", f"layers.{layer}.attention.dense")
    found = [m for name, m in model.named_modules() if name.endswith(names)]
    assert len(found) == 1, names
    return found[0]


def _plain(model, ids, heads, replace):
    """Logits with each head's slice of the o_proj input set by ``replace(layer, cols, z)`` (torch hooks)."""
    d = reslens.adapter(model).d_head
    handles = []
    for layer in sorted({lay for lay, _ in heads}):
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for lay, h in heads if lay == layer])

        def hook(module, args, layer=layer, cols=cols):
            z = args[0].clone()
            z[..., cols] = replace(layer, cols, z)
            return (z, *args[1:])

        handles.append(_o_proj(model, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def _plain_z(model, ids, layer):
    """The o_proj input of ``layer`` on ``ids``, by a plain torch hook."""
    seen = {}
    handle = _o_proj(model, layer).register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["z"]


def _patched(model, ids, edits):
    with reslens.patch(model, edits), torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_mean_and_resample_ablation_equal_plain_hooks(family):
    model = make_family(family)
    want = _plain(model, IDS, HEADS, lambda layer, cols, z: 0.0)
    got = _patched(model, IDS, head_ablation(model, HEADS))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, _patched(model, IDS, {}))
    mean = {layer: _plain_z(model, OTHER, layer).reshape(-1, _plain_z(model, OTHER, layer).shape[-1]).mean(0)
            for layer in (1, 2)}
    want = _plain(model, IDS, HEADS, lambda layer, cols, z: mean[layer][cols])
    got = _patched(model, IDS, head_ablation(model, HEADS, how="mean", reference=OTHER))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other = {layer: _plain_z(model, OTHER, layer) for layer in (1, 2)}
    want = _plain(model, IDS, HEADS, lambda layer, cols, z: other[layer][..., cols])
    got = _patched(model, IDS, head_ablation(model, HEADS, how="resample", reference=OTHER))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ablation_at_positions_leaves_the_earlier_positions_alone():
    model = make_family("llama")
    plain = _patched(model, IDS, {})
    got = _patched(model, IDS, head_ablation(model, ["1.2", "2.0"], positions=[5, 6]))
    assert torch.equal(got[:, :5], plain[:, :5]) and not torch.allclose(got[:, 5:], plain[:, 5:])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "qwen3_moe"])
def test_ablation_in_generation_equals_the_ablated_full_forward(family):
    model = make_family(family)
    edits = head_ablation(model, HEADS, how="mean", reference=OTHER)
    out = reslens.generate(model, IDS[:1, :5], max_new_tokens=4, stop=[], patches=edits, sites=("resid",))
    with reslens.patch(model, edits):
        full = reslens.capture(model, out.sequences, sites="resid")
    torch.testing.assert_close(out.residuals.resid, full.resid, atol=1e-4, rtol=1e-4)


def test_bad_heads_and_references_are_refused():
    model = make_family("llama")
    with pytest.raises(ValueError, match="out of range"):
        head_ablation(model, [(9, 0)])
    with pytest.raises(ValueError, match="layer.head"):
        head_ablation(model, ["one.two"])
    with pytest.raises(ValueError, match="reference"):
        head_ablation(model, HEADS, how="mean")
    with pytest.raises(ValueError, match="how"):
        head_ablation(model, HEADS, how="noise")
    with pytest.raises(ValueError, match="positions"):
        head_ablation(model, HEADS, positions=[-1])
    edits = head_ablation(model, HEADS, how="resample", reference=OTHER[:, :4])
    with pytest.raises(ValueError, match="resample"), reslens.patch(model, edits):
        model(input_ids=IDS)
    assert all(not m._forward_pre_hooks for m in model.modules())
