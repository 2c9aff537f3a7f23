"""The lens bench (compare_lenses): every score equals a plain per-position computation, the calibration a
brute-force one, the causal check a hand-written patched forward; mappings, patchscopes, errors, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAMILIES, make_family
from test_lenses import Chars, _random_lens, _text

import reslens
from reslens._stream import units
from reslens.lens import LensComparison, LinearShortcut, Patchscope, TunedLens, compare_lenses, lens_stats
from reslens.lens._causal import _scope_final, sample_positions

TEXT = [_text(7, 120)]
KW = dict(tokenizer=Chars(), max_tokens=90, max_length=30, batch_size=2, progress=False)


def _windows():
    return list(units(Chars(), TEXT, max_length=30, max_tokens=90))


def _plain_scores(model, lens):
    """Per lens row, every score from HF hidden states and logits, one window at a time, every position."""
    arch = reslens.adapter(model)
    names = ("klf", "kll", "ce", "agree", "conf", "hit")
    rows = {name: [[] for _ in range(arch.n_layer + 1)] for name in names}
    for window in _windows():
        ids = torch.tensor([window])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            final = out.logits[0].float().log_softmax(-1)  # [P, vocab]: the model's own output
            for layer in range(arch.n_layer + 1):
                if layer == arch.n_layer:
                    logp = final
                else:
                    h = out.hidden_states[layer][0]
                    logp = arch.logits(lens.translate(layer, h)).float().log_softmax(-1)
                r = {k: v[layer] for k, v in rows.items()}
                r["klf"] += (final.exp() * (final - logp)).sum(-1).tolist()
                r["kll"] += (logp.exp() * (logp - final)).sum(-1).tolist()
                r["agree"] += (logp.argmax(-1) == final.argmax(-1)).tolist()
                nxt = ids[0, 1:]
                r["ce"] += (-logp[:-1].gather(1, nxt[:, None])[:, 0]).tolist()
                r["conf"] += logp[:-1].exp().max(-1).values.tolist()
                r["hit"] += (logp[:-1].argmax(-1) == nxt).tolist()
    return rows


def _ece(conf, hit, bins=10):
    conf, hit = np.asarray(conf), np.asarray(hit, dtype=float)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() / len(conf) * abs(hit[inside].mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_every_score_equals_a_plain_per_position_computation(family):
    model = make_family(family)
    shortcut = _random_lens(LinearShortcut, model)
    scores = compare_lenses(model, TEXT, [None, shortcut], **KW)
    for k, lens in enumerate([reslens.lens.LogitLens(), shortcut]):
        plain = _plain_scores(model, lens)
        for r in range(len(scores.layers)):
            want = torch.tensor([np.mean(plain["klf"][r]), np.mean(plain["kll"][r]), np.mean(plain["ce"][r]),
                                 np.mean(plain["agree"][r]), _ece(plain["conf"][r], plain["hit"][r])])
            got = torch.stack([getattr(scores, name)[k, r] for name in (
                "kl_final_layer", "kl_layer_final", "cross_entropy", "top1_agreement", "calibration")])
            torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4, msg=f"{family} {k} row {r}")
        bins = scores.calibration_bins[k]  # [R, 10, 3]: every scored position with a next token, once
        assert bins[..., 0].sum(-1).tolist() == [float(len(plain["conf"][0]))] * len(scores.layers)
    assert scores.n_tokens == sum(map(len, _windows()))


def test_calibration_is_the_brute_force_expected_calibration_error_of_chosen_bins():
    from reslens.lens._bench import expected_calibration_error

    bins = torch.zeros(10, 3, dtype=torch.float64)
    conf = [0.05, 0.07, 0.55, 0.95, 0.99, 0.999]
    hit = [0, 1, 1, 1, 0, 1]
    for c, h in zip(conf, hit):
        b = min(int(c * 10), 9)
        bins[b] += torch.tensor([1.0, c, h], dtype=torch.float64)
    assert float(expected_calibration_error(bins)) == pytest.approx(_ece(conf, hit))
    assert float(expected_calibration_error(bins)) == pytest.approx(
        (abs(1 - 0.12) + abs(1 - 0.55) + abs(2 - (0.95 + 0.99 + 0.999))) / 6)


def _edited_logprob(model, ids, layer, p, delta):
    """log p_out at ``p`` of a full HF forward with ``delta`` added to block ``layer``'s input at ``p``."""
    arch = reslens.adapter(model)

    def hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}
            kwargs["hidden_states"][0, p] += delta
            return args, kwargs
        hidden = args[0].clone()
        hidden[0, p] += delta
        return (hidden, *args[1:]), kwargs

    handle = arch.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(ids).logits[0, p].float().log_softmax(-1)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox", "olmo2", "mixtral"])
def test_the_causal_check_equals_a_hand_written_patched_forward(family):
    model = make_family(family)
    arch = reslens.adapter(model)
    shortcut = _random_lens(LinearShortcut, model)
    scale, seed = 0.5, 3
    scores = compare_lenses(model, TEXT, [None, shortcut], causal_positions=1, causal_scale=scale, seed=seed,
                            **KW)
    assert scores.causal_positions == 1
    ((w, p),) = sample_positions(_windows(), (), 1, seed)
    ids = torch.tensor([_windows()[w][: p + 1]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    clean = out.logits[0, p].float().log_softmax(-1)
    noise = torch.randn((arch.n_layer + 1, arch.d_model), generator=torch.Generator().manual_seed(seed))
    for k, lens in enumerate([reslens.lens.LogitLens(), shortcut]):
        for layer in range(arch.n_layer):  # the blocks' inputs; resid n_layer is read by the final norm
            h = out.hidden_states[layer][0, p].detach().clone().requires_grad_(True)
            logp = arch.logits(lens.translate(layer, h)).float().log_softmax(-1)
            top2 = logp.topk(2).indices
            t = int(top2[0]) if int(top2[0]) != int(clean.argmax()) else int(top2[1])
            (g,) = torch.autograd.grad(logp[t], h)
            size = scale * h.detach().norm()
            if float(size) == 0:  # a zero residual (a zero embedding row): no edit to make, none counted
                assert bool(scores.causal_lens[k, layer].isnan())
                continue
            d_lens = _edited_logprob(model, ids, layer, p, size * g / g.norm())[t] - clean[t]
            r = noise[layer] / noise[layer].norm()
            d_rand = _edited_logprob(model, ids, layer, p, size * r)[t] - clean[t]
            got = (scores.causal_lens[k, layer], scores.causal_random[k, layer], scores.causal_win[k, layer])
            torch.testing.assert_close(got[0], d_lens, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(got[1], d_rand, atol=1e-4, rtol=1e-3)
            if abs(float(d_lens - d_rand)) > 1e-4:  # a near tie may fall either way in float32
                assert float(got[2]) == float(d_lens > d_rand)


def test_the_patchscope_is_a_bench_lens_and_its_gradient_run_reads_as_its_translation():
    model = make_family("llama")
    scope = Patchscope(model, torch.tensor([5, 6, 7, 8]), position=1)
    scores = compare_lenses(model, TEXT, {"logit": None, "scope": scope}, causal_positions=2, **KW)
    alone = lens_stats(model, [_text(7, 18)], tokenizer=Chars(), max_length=30, lens=scope, progress=False)
    short = compare_lenses(model, [_text(7, 18)], [scope], **{**KW, "max_tokens": 10_000})
    assert short.n_tokens == alone.n_tokens
    torch.testing.assert_close(short.kl_final_layer[0], alone.mean.kl_final_layer)
    assert scores.lenses == ("logit", "scope") and scores.lens_kinds == ("logit", "patchscope")
    assert bool(scores.causal_lens[1].isfinite().all())
    assert "gradient through the target" in scores.causal_notes[1]
    assert alone.lens_name == scope.name
    arch = reslens.adapter(model)
    h = torch.randn(arch.n_layer + 1, arch.d_model, generator=torch.Generator().manual_seed(0))
    layers = list(range(arch.n_layer + 1))
    want = torch.stack(scope.translate_rows([(layer, h[layer]) for layer in layers]))
    torch.testing.assert_close(_scope_final(scope, layers, h), want, atol=1e-5, rtol=1e-5)


def test_two_lenses_of_one_kind_under_labels_and_the_refusals():
    model = make_family("mistral")
    cold, warm = _random_lens(TunedLens, model, seed=1), _random_lens(TunedLens, model, seed=2)
    scores = compare_lenses(model, TEXT, {"tuned, cold": cold, "tuned, warm": warm}, **KW)
    assert scores.lenses == ("tuned, cold", "tuned, warm")
    assert not torch.equal(scores.kl_final_layer[0], scores.kl_final_layer[1])
    with pytest.raises(ValueError, match=r"two of the same kind .*give a mapping \{label: lens\}"):
        compare_lenses(model, TEXT, [cold, warm], **KW)
    with pytest.raises(TypeError, match="non-empty str labels; got 3"):
        compare_lenses(model, TEXT, {3: cold}, **KW)
    with pytest.raises(ValueError, match="lenses is empty"):
        compare_lenses(model, TEXT, {}, **KW)
    with pytest.raises(ValueError, match="causal_positions"):
        compare_lenses(model, TEXT, [None], causal_positions=-1, **KW)
    with pytest.raises(ValueError, match="causal_scale"):
        compare_lenses(model, TEXT, [None], causal_scale=0.0, **KW)
    with pytest.raises(TypeError, match="mapping"):
        compare_lenses(model, TEXT, "logit", **KW)


def test_the_bench_saves_reads_back_and_shows_itself(tmp_path):
    model = make_family("gpt2")
    shortcut = _random_lens(LinearShortcut, model)
    scores = compare_lenses(model, TEXT, [None, shortcut], causal_positions=2, **KW)
    path = tmp_path / "bench.safetensors"
    scores.save(path)
    back = LensComparison.load(path)
    for name in ("kl_final_layer", "kl_layer_final", "cross_entropy", "top1_agreement", "calibration",
                 "calibration_bins", "causal_lens", "causal_random", "causal_win"):
        assert torch.equal(getattr(back, name), getattr(scores, name)), name
    assert (back.lenses, back.model, back.model_fingerprint, back.causal_positions, back.causal_scale) == (
        scores.lenses, "GPT2LMHeadModel", reslens.adapter(model).fingerprint, 2, 0.25)
    table = scores.table()
    assert "ECE" in table and "Δlens" in table and "What to read from it" in table
    assert table.rstrip().endswith("equal for every lens")
    assert "lenses: logit lens, linear shortcut" in scores._repr_html_()
    frame = scores.to_frame()
    assert list(frame.columns)[:2] == ["lens", "layer"] and "causal_win" in frame.columns and len(frame) == 8
    fig = scores.plot()
    assert len(fig.axes) == 5 and fig.axes[0].get_yscale() == "log"
    old = LensComparison(("logit lens",), (0, 1), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 5)
    assert "KL(f‖l)" in old.table() and "ECE" not in old.table()  # a bench saved before these scores


@pytest.mark.slow
def test_under_torchrun_the_bench_equals_one_process(tmp_path):
    import importlib.util

    from test_distributed import WORKERS, _ranks, _torchrun, needs_gloo

    if needs_gloo.args[0]:
        pytest.skip("torch.distributed with gloo is not available")
    spec = importlib.util.spec_from_file_location("reslens_bench_worker", WORKERS / "lens_bench.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: the same kernels' blocking
    try:
        want = worker.lens_bench_case()
    finally:
        torch.set_num_threads(threads)
    ranks = _ranks(_torchrun("lens_bench", tmp_path))
    assert int(want["causal_positions"]) == 5 and bool(want["causal_win"].isfinite().all())
    for got in ranks:
        assert got.keys() == want.keys()
        for key in ("n_tokens", "causal_positions"):  # counts: exact
            assert torch.equal(got[key], want[key]), key
        for column in (0, 2):  # the calibration bins' positions and hits: counts, exact
            assert torch.equal(got["calibration_bins"][..., column], want["calibration_bins"][..., column])
        for key in want:  # float64 sums in another order: equal to float32 rounding
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in want)  # every rank returns the same
