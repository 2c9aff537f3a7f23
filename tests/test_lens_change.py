"""reslens.lens.change (why the lens changed) against plain HuggingFace computations, on every family."""

from __future__ import annotations

import dataclasses

import matplotlib
import pytest
import torch

from helpers import FAMILIES, VOCAB, make_family, make_model
from reslens import kv_memory as kv
from reslens.attribution import logit_attribution
from reslens.hooks import capture
from reslens.lens import (CHANGE_KINDS, LensChange, TunedLens, lens_change, lens_change_of, lens_changes,
                          logit_lens)

matplotlib.use("Agg")

IDS = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
TARGET, AGAINST = 5, 11


def _same(a: LensChange, b: LensChange) -> bool:
    """Every field equal (tensors exactly)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            return False
    return True


def _final_norm(model):
    """The model's own final norm module, found by its HuggingFace name."""
    body = model.base_model
    for name in ("ln_f", "norm", "final_layer_norm"):
        if hasattr(body, name):
            return getattr(body, name)
    raise AssertionError(f"no final norm on {type(body).__name__}")


def _hf_rows(model, ids, target, against=None, position=-1):
    """Plain HF: the lens's logit (difference) at every row, as the lens shows it (after a soft-cap).

    Rows ``l < n_layer``: ``hidden_states[l]`` (the raw residual) -> the model's final norm module ->
    ``lm_head``; row ``n_layer``: the model's own logits (``hidden_states[-1]`` is already normed).
    """
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[:-1])[:, 0, position]  # [n_layer, d_model]
        logits = model.lm_head(_final_norm(model)(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        logits = torch.cat([logits, out.logits[0, position][None]]).float()  # [n_layer + 1, V]
    return logits[:, target] - (logits[:, against] if against is not None else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pieces_sum_to_the_change_hf_computes_on_every_family(family):
    model = make_family(family)
    n = model.config.num_hidden_layers if family != "gpt2" else model.config.n_layer
    for against in (None, AGAINST):
        hf = _hf_rows(model, IDS, TARGET, against)
        changes = lens_changes(model, IDS, TARGET, against=against, memories=2)
        assert len(changes) == n
        # row n_layer is the model's own output, every row the HF reading of that layer
        torch.testing.assert_close(changes[0].logit, hf, atol=2e-5, rtol=1e-5)
        for layer, change in enumerate(changes):
            assert (change.start, change.stop) == (layer, layer + 1)
            expected = float(hf[layer + 1] - hf[layer])
            assert change.change == pytest.approx(expected, abs=2e-5)
            assert change.total == pytest.approx(expected, abs=2e-5), (layer, change.table())
        for layers in ((0, n), (1, n), (0, 2)):
            change = lens_change(model, IDS, TARGET, against=against, layers=layers, memories=0)
            expected = float(hf[layers[1]] - hf[layers[0]])
            assert change.total == pytest.approx(expected, abs=2e-5), (layers, change.table())
            assert ("softcap" in change.kind) == (getattr(model.config, "final_logit_softcapping", None)
                                                  is not None)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "olmo2", "gpt_neox", "qwen3_moe"])
def test_a_spans_heads_are_the_attribution_heads_at_the_output(family):
    """Over 0 -> n_layer the pieces are read at the final scale, as direct logit attribution reads them."""
    model = make_family(family)
    change = lens_change(model, IDS, TARGET, against=AGAINST, memories=0)
    dla = logit_attribution(model, IDS, TARGET, against=AGAINST)
    mine = dict(zip(change.labels, change.contributions.tolist()))
    theirs = dict(zip(dla.labels, dla.contributions[0].tolist()))
    per_layer = [label for label in theirs if label in mine]
    assert len(per_layer) == len(change.kind) - 1 - ("softcap" in change.kind)  # all but norm scale / cap
    for label in per_layer:
        assert mine[label] == pytest.approx(theirs[label], abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_memories_and_the_rest_are_the_mlp_piece(family):
    model = make_family(family)
    whole = lens_change(model, IDS, TARGET, against=AGAINST, layers=(0, 3), memories=0)
    split = lens_change(model, IDS, TARGET, against=AGAINST, layers=(0, 3), memories=4)
    mlp = {int(layer): v for k, layer, v in zip(whole.kind, whole.layer, whole.contributions) if k == "mlp"}
    for block, value in mlp.items():
        mine = [v for k, layer, v in zip(split.kind, split.layer.tolist(), split.contributions.tolist())
                if k in ("memory", "mlp_rest") and layer == block]
        assert len(mine) == 5
        assert sum(mine) == pytest.approx(float(value), abs=1e-6)
        memories = [abs(v) for k, layer, v in zip(split.kind, split.layer, split.contributions.tolist())
                    if k == "memory" and layer == block]
        assert memories == sorted(memories, reverse=True)
    others = [(label, v) for label, k, v in zip(whole.labels, whole.kind, whole.contributions.tolist())
              if k != "mlp"]
    kept = zip(split.labels, split.kind, split.contributions.tolist())
    assert others == [(label, v) for label, k, v in kept if k not in ("memory", "mlp_rest")]
    if kv.contributions_of(capture(model, IDS, sites="mlp_act"), model, 0).d_expert:
        assert " E" in split.labels[split.kind.index("memory")]  # "L0 E1 N5"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_memory_piece_is_its_coefficient_times_the_read_value(family):
    """Plain torch: ``m_i (v_i · γ ⊙ (W_U[t] - W_U[a])) / σ(h_2)``, ``m`` hooked at the output projection."""
    model = make_family(family)
    mlp = model.transformer.h[1].mlp.c_proj if family == "gpt2" else model.model.layers[1].mlp.down_proj
    values = mlp.weight if family == "gpt2" else mlp.weight.T  # [d_mlp, d_model]
    seen = {}
    handle = mlp.register_forward_hook(lambda _m, args, _out: seen.update(m=args[0][0, -1]))
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states[2][0, -1]
    handle.remove()
    norm = _final_norm(model)
    direction = (model.lm_head.weight[TARGET] - model.lm_head.weight[AGAINST]) * norm.weight
    if family == "gpt2":
        direction, sigma = direction - direction.mean(), torch.sqrt(hidden.var(unbiased=False) + norm.eps)
    else:
        sigma = torch.sqrt(hidden.pow(2).mean() + norm.variance_epsilon)
    expected = (seen["m"] * (values @ direction) / sigma).detach()
    change = lens_change(model, IDS, TARGET, against=AGAINST, layers=1, memories=3)
    for neuron, value in zip(change.neuron.tolist(), change.contributions.tolist()):
        if neuron >= 0:
            assert value == pytest.approx(float(expected[neuron]), abs=1e-6)
    top = expected.abs().topk(3).indices.tolist()
    assert sorted(change.neuron[change.neuron >= 0].tolist()) == sorted(top)


def test_the_last_row_is_the_models_prediction_and_the_lens_agrees(model):
    change = lens_change(model, IDS, TARGET, against=AGAINST)
    with torch.no_grad():
        logp = model(IDS).logits[0, -1].log_softmax(-1)
    assert float(change.logit[-1]) == pytest.approx(float(logp[TARGET] - logp[AGAINST]), abs=1e-5)
    torch.testing.assert_close(change.prob[-1], logp[TARGET].exp(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(change.against_prob[-1], logp[AGAINST].exp(), atol=1e-6, rtol=1e-5)
    lens = logit_lens(model, IDS, targets=TARGET)
    torch.testing.assert_close(change.prob.log(), lens.target_logprob[:, 0, -1], atol=1e-5, rtol=1e-5)


def test_the_overtake_layer_is_where_the_target_stays_ahead():
    model = make_model()
    change = lens_change(model, IDS, TARGET, against=AGAINST, layers=0)
    cases = (([-1, 2, -1, 3], 3), ([1, 2, 3, 4], 0), ([1, 2, 3, -1], None), ([-1, -2, 0, 1], 3))
    for logit, expected in cases:
        other = dataclasses.replace(change, logit=torch.tensor(logit, dtype=torch.float32))
        assert other.overtake_layer == expected
    assert dataclasses.replace(change, against=None, against_prob=None).overtake_layer is None


def test_the_pure_form_reads_one_capture_and_a_position(model):
    res = capture(model, IDS, sites=("resid", "attn_z", "mlp_out", "mlp_act"))
    pure = lens_change_of(res, model, TARGET, against=AGAINST, layers=(1, 3), position=4)
    assert _same(pure, lens_change(model, IDS, TARGET, against=AGAINST, layers=(1, 3), position=4))
    assert pure.position == 4 and pure.total == pytest.approx(pure.change, abs=2e-5)
    hf = _hf_rows(model, IDS, TARGET, AGAINST, position=4)
    assert pure.change == pytest.approx(float(hf[3] - hf[1]), abs=2e-5)
    with pytest.raises(ValueError, match="mlp_act"):
        lens_change_of(capture(model, IDS, sites=("resid", "attn_z", "mlp_out")), model, TARGET)
    assert lens_change_of(capture(model, IDS, sites=("resid", "attn_z", "mlp_out")), model, TARGET,
                          memories=0).kind.count("mlp") == 3
    with pytest.raises(ValueError, match="every resid layer"):
        few = capture(model, IDS, sites=("resid", "attn_z", "mlp_out"), layers=[0, 1])
        lens_change_of(few, model, TARGET, memories=0)


def test_padding_and_a_second_sequence():
    model = make_family("llama")
    ids = torch.cat([IDS, IDS.flip(1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second sequence
    res = capture(model, {"input_ids": ids, "attention_mask": mask}, sites=("resid", "attn_z", "mlp_out"))
    alone = lens_change(model, IDS.flip(1)[:, 2:], TARGET, against=AGAINST, layers=(0, 3), memories=0)
    padded = lens_change_of(res, model, TARGET, against=AGAINST, layers=(0, 3), seq=1, memories=0)
    assert padded.position == 8 and padded.total == pytest.approx(alone.total, abs=1e-5)
    with pytest.raises(ValueError, match="padding"):
        lens_change_of(res, model, TARGET, position=0, seq=1, memories=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=3), ValueError, "layers=3"),
    (dict(layers=(0, 4)), ValueError, r"layers\[1\]=4"),
    (dict(layers=(2, 2)), ValueError, "l < l'"),
    (dict(layers=(2, 1)), ValueError, "l < l'"),
    (dict(layers=(0, 1, 2)), ValueError, "two rows"),
    (dict(layers=1.5), TypeError, "layers must be"),
    (dict(layers=True), TypeError, "layers must be"),
    (dict(position=9), ValueError, "position=9"),
    (dict(seq=1), ValueError, "seq=1"),
    (dict(target=VOCAB), ValueError, f"target={VOCAB}"),
    (dict(against=-1), ValueError, "against=-1"),
    (dict(target=" Paris"), TypeError, "tokenizer"),
    (dict(against=TARGET), ValueError, "the target itself"),
    (dict(memories=-1), ValueError, "memories=-1"),
    (dict(index="index.safetensors"), TypeError, "index must be"),
    (dict(lens=TunedLens.identity(3, 16)), ValueError, "only for the logit lens"),
])
def test_bad_input_is_refused_before_the_forward(model, kwargs, error, match):
    args = {"target": TARGET, **kwargs}
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=match):
        lens_change(model, IDS, **args)
    handle.remove()
    assert not calls


def test_results_round_trip_and_show(model, tmp_path):
    change = lens_change(model, IDS, TARGET, against=AGAINST, layers=(0, 3), memories=2)
    change.save(tmp_path / "change.safetensors")
    loaded = LensChange.load(tmp_path / "change.safetensors")
    assert _same(loaded, change) and loaded.labels == change.labels and loaded.triggers == change.triggers
    frame = change.to_frame()
    assert list(frame.columns) == ["label", "kind", "layer", "head", "neuron", "contribution", "triggers"]
    assert frame.contribution.sum() == pytest.approx(change.total, abs=1e-5)
    assert set(change.kind) <= set(CHANGE_KINDS) and change.kind[-1] == "norm_scale"
    table = change.table(k=4)
    assert "lens row 0 -> 3" in table and "other" in table and f"{change.change:+.4f}" in table
    assert "LensChange" in change._repr_html_() and "LensChange(" in repr(change)
    fig = change.plot(k=3)
    assert len(fig.axes[0].patches) == 3 + 3  # row 0, three pieces, the other pieces, row 3
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "row 0" and labels[-1] == "row 3" and labels[-2].startswith("other")
    with pytest.raises(ValueError, match="inconsistent"):
        dataclasses.replace(change, layer=change.layer.clone().fill_(5))
    with pytest.raises(ValueError, match="unknown piece kinds"):
        dataclasses.replace(change, kind=("ln_f",) + change.kind[1:])


class _CharTokenizer:
    """One token per character (ids mod the tiny vocabulary), enough to mine triggers."""

    pad_token_id, eos_token_id = None, 0

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [[ord(c) % VOCAB for c in t] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_memory_pieces_carry_their_trigger_examples(model):
    texts = ["The cat sat on the mat and looked out", "A dog ran far away from home, never back"]
    index = kv.mine_triggers(model, _CharTokenizer(), texts, unit="window", window=8, top_k=3, layers=[1],
                             progress=False)
    tokenizer = _CharTokenizer()
    change = lens_change(model, IDS, TARGET, layers=(0, 3), memories=2, index=index, tokenizer=tokenizer)
    for kind, layer, neuron, lines in zip(change.kind, change.layer.tolist(), change.neuron.tolist(),
                                          change.triggers):
        if kind == "memory" and layer == 1:
            assert lines and list(lines) == index.format(1, neuron, 3, tokenizer=tokenizer).splitlines()[1:]
        else:
            assert lines == ()
    assert "[[" in change.table(k=len(change.kind))
    other = make_family("llama")
    with pytest.raises(ValueError, match="index was mined"):
        lens_change(other, IDS, TARGET, index=index)
