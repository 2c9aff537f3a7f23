"""reslens.lenses: the logit lens, the linear shortcut and the tuned lens as values read by the same lens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, make_family

import reslens
from reslens.lens import lens_of, logit_lens
from reslens.lens_stats import lens_stats
from reslens.lenses import (
    LinearShortcut,
    LogitLens,
    TunedLens,
    compare_lenses,
    fit_shortcut,
    load_lens,
    train_tuned_lens,
)
from reslens.lenses import tuned as tuned_module

FIXTURES = Path(__file__).parent / "fixtures" / "tuned_lens"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4], [6, 2, 9, 9, 1, 3, 5, 7]])


class Chars:
    """A toy tokenizer: one id per character (enough for the corpus pass)."""

    def __call__(self, texts, add_special_tokens=False, **_):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 97 for c in texts]}
        return {"input_ids": [[ord(c) % 97 for c in t] for t in texts]}


def _text(seed: int, words: int = 1500) -> str:
    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "slept"]
    return " ".join(rng.choice(vocab) for _ in range(words))


def _random_lens(cls, model, seed: int = 1, scale: float = 0.1):
    arch = reslens.adapter(model)
    g = torch.Generator().manual_seed(seed)
    weight = scale * torch.randn(arch.n_layer, arch.d_model, arch.d_model, generator=g)
    if cls is LinearShortcut:
        weight = weight + torch.eye(arch.d_model)
    return cls(weight, scale * torch.randn(arch.n_layer, arch.d_model, generator=g), {"model": "tiny"})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lens_reads_the_last_layer_as_the_model_logits(family):
    model = make_family(family)
    logits = model(input_ids=IDS).logits.float()
    log_probs = torch.log_softmax(logits, -1)
    for lens in (None, _random_lens(TunedLens, model), _random_lens(LinearShortcut, model)):
        result = logit_lens(model, IDS, lens=lens, top_k=3)
        last = result.row(reslens.adapter(model).n_layer)
        assert torch.equal(result.top_ids[last], logits.topk(3, dim=-1).indices)
        torch.testing.assert_close(result.top_probs[last], log_probs.exp().topk(3, dim=-1).values)
        nxt = result.targets[:, :-1]
        torch.testing.assert_close(
            result.target_logprob[last, :, :-1], log_probs[:, :-1].gather(-1, nxt[..., None])[..., 0]
        )
        assert float(result.kl_final_layer[last].nan_to_num().abs().max()) == 0.0


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_a_learned_lens_translates_each_layer_before_the_final_norm(family):
    model = make_family(family)
    arch = reslens.adapter(model)
    res = reslens.capture(model, IDS, sites=("resid",))
    for lens in (_random_lens(TunedLens, model), _random_lens(LinearShortcut, model)):
        result = lens_of(res, model, lens=lens, top_k=2)
        assert result.lens_name == lens.name and result.table().startswith(lens.name)
        layer = 1
        h = res.resid[layer]
        mapped = h @ lens.weight[layer].T + lens.bias[layer]
        expected = arch.unembed(arch.norm("final")(h + mapped if isinstance(lens, TunedLens) else mapped))
        probs = torch.softmax(expected.float(), -1).topk(2, dim=-1)
        assert torch.equal(result.top_ids[layer], probs.indices)
        torch.testing.assert_close(result.top_probs[layer], probs.values)
    # the logit lens is a lens too, and zero translators are the logit lens
    plain = lens_of(res, model)
    assert plain.lens_name == "logit lens" and torch.equal(
        lens_of(res, model, lens=LogitLens()).top_ids, plain.top_ids
    )
    zero = TunedLens.identity(arch.n_layer, arch.d_model)
    torch.testing.assert_close(lens_of(res, model, lens=zero).top_probs, plain.top_probs)


def test_the_shortcut_equals_a_brute_force_least_squares_solve():
    model = make_family("llama")
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(33, 127)) for _ in range(1600))  # ~94 distinct ids: a full-rank design
    shortcut = fit_shortcut(
        model, [text], tokenizer=Chars(), max_tokens=1500, max_length=32, ridge=0.0, progress=False
    )
    assert shortcut.config["n_tokens"] == 1500
    ids = Chars()([text])["input_ids"][0][:1500]
    windows = [ids[i : i + 32] for i in range(0, 1500, 32)]
    resid = torch.cat(
        [reslens.capture(model, torch.tensor([w]), sites=("resid",)).resid[:, 0] for w in windows], 1
    )
    y = resid[-1].double()
    for layer in (0, 2):
        x = torch.cat([resid[layer].double(), torch.ones(resid.shape[1], 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(x, y, driver="gelsd").solution  # [d + 1, d]
        torch.testing.assert_close(shortcut.weight[layer].double(), solution[:-1].T, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(shortcut.bias[layer].double(), solution[-1], atol=2e-4, rtol=1e-3)


def test_the_solve_survives_smollm2_sized_moments_on_two_threads():
    from reslens.lenses import ShortcutMoments

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the oneMKL batched-solve failure needed 2 threads and 30 x 576 x 576
    try:
        moments = ShortcutMoments(30, 576)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            moments.add(torch.randn(31, 700, 576, generator=g))
        weight, bias = moments.solve(1e-6)
    finally:
        torch.set_num_threads(threads)
    assert weight.shape == (30, 576, 576)
    assert bool(torch.isfinite(weight).all() and torch.isfinite(bias).all())


def test_training_the_tuned_lens_lowers_its_kl_and_leaves_the_model_alone():
    model = make_family("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = _text(1)
    lens = train_tuned_lens(
        model, [text], tokenizer=Chars(), max_tokens=2048, tokens_per_step=256, max_length=32, progress=False
    )
    assert isinstance(lens, TunedLens) and lens.config["steps"] == 8 and len(lens.config["loss"]) == 8
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scores = compare_lenses(
        model, [text], [None, lens], tokenizer=Chars(), max_tokens=2048, max_length=32, progress=False
    )
    logit_kl, tuned_kl = scores.kl_final_layer[:, :-1]
    assert bool((tuned_kl < logit_kl).all()), scores.table()
    assert float(scores.kl_final_layer[:, -1].abs().max()) == 0.0


def test_an_interrupted_training_resumes_to_the_same_lens(tmp_path, monkeypatch):
    model = make_family("llama")
    kwargs = dict(
        tokenizer=Chars(), max_tokens=1024, tokens_per_step=128, max_length=32, progress=False, save_every=2
    )
    whole = train_tuned_lens(model, [_text(2)], **kwargs)
    step_loss, calls = tuned_module._step_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return step_loss(*args)

    checkpoint = tmp_path / "tuned.ckpt.safetensors"
    monkeypatch.setattr(tuned_module, "_step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(model, [_text(2)], checkpoint=checkpoint, **kwargs)
    monkeypatch.setattr(tuned_module, "_step_loss", step_loss)
    assert checkpoint.exists() and not list(tmp_path.glob(".*.tmp"))
    resumed = train_tuned_lens(model, [_text(2)], checkpoint=checkpoint, **kwargs)
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    assert resumed.config["loss"] == whole.config["loss"]
    with pytest.raises(ValueError, match="another corpus"):
        train_tuned_lens(model, [_text(3)], checkpoint=checkpoint, **kwargs)


@pytest.mark.parametrize("cls", (TunedLens, LinearShortcut))
def test_save_and_load_round_trip_bit_exactly(tmp_path, cls):
    model = make_family("qwen2")
    lens = _random_lens(cls, model)
    lens.save(tmp_path / "lens.safetensors")
    back = load_lens(tmp_path / "lens.safetensors", model=model)
    assert type(back) is cls and back.config == lens.config
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert (tmp_path / "lens.safetensors").stat().st_mode & 0o044  # the usual permissions, not 0600


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_a_lens_saved_by_the_tuned_lens_package_reads_the_same(family):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = FIXTURES / family
    config = AutoConfig.for_model(**json.loads((folder / "model_config.json").read_text()))
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    expected = load_file(folder / "expected.safetensors")
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # the unembedding hash matches: no warning
        lens = load_lens(folder, model=model)
    assert isinstance(lens, TunedLens) and lens.n_layer == 2
    arch = reslens.adapter(model)
    res = reslens.capture(model, expected["input_ids"], sites=("resid",))
    result = lens_of(res, model, lens=lens, top_k=5)
    for layer in range(2):
        # the package's own output for the hidden state it was given, from reslens's reading of its files
        ours = arch.unembed(arch.norm("final")(lens.translate(layer, expected[f"hidden_{layer}"])))
        torch.testing.assert_close(ours, expected[f"logits_{layer}"], atol=1e-6, rtol=1e-5)
        # and the same through the lens on reslens's own capture (HF's hidden states, sdpa vs eager aside)
        torch.testing.assert_close(res.resid[layer], expected[f"hidden_{layer}"], atol=1e-6, rtol=1e-5)
        package = torch.softmax(expected[f"logits_{layer}"], -1).topk(5, dim=-1)
        assert torch.equal(result.top_ids[layer], package.indices)
        torch.testing.assert_close(result.top_probs[layer], package.values, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="made for 2 layers of d_model 16"):
        load_lens(folder, model=make_family(family))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # another model now, by the package's hash of the unembedding
    refused = "fitted on .*hash of the unembedding .*; it is used with"
    with pytest.raises(ValueError, match=f"{folder.name}: this tuned lens .*{refused}"):
        load_lens(folder, model=model)
    with pytest.raises(ValueError, match=refused):  # loaded without model=: refused where it is used
        lens_of(res, model, lens=lens)
    with pytest.raises(ValueError, match=refused):
        logit_lens(model, expected["input_ids"], lens=lens)


def test_a_lens_fitted_on_another_model_of_the_same_shape_is_refused_wherever_it_is_used(tmp_path):
    import copy

    fitted_on, other = make_family("llama"), make_family("llama", seed=1)  # the same shape, other weights
    shortcut = fit_shortcut(fitted_on, [_text(5, 300)], tokenizer=Chars(), progress=False)
    made, used = reslens.adapter(fitted_on).fingerprint[:12], reslens.adapter(other).fingerprint[:12]
    assert shortcut.config["model_fingerprint"][:12] == made
    shortcut.save(tmp_path / "lens.safetensors")
    lens = load_lens(tmp_path / "lens.safetensors")
    refused = (f"this linear shortcut was fitted on LlamaForCausalLM \\(fingerprint {made}\\); it is used "
               f"with LlamaForCausalLM \\(fingerprint {used}\\)")
    with pytest.raises(ValueError, match="lens.safetensors: " + refused):
        load_lens(tmp_path / "lens.safetensors", model=other)
    res = reslens.capture(other, IDS, sites=("resid",))
    data = dict(tokenizer=Chars(), progress=False)
    for use in (lambda: logit_lens(other, IDS, lens=lens), lambda: lens_of(res, other, lens=lens),
                lambda: lens_stats(other, [_text(4, 100)], lens=lens, **data),
                lambda: compare_lenses(other, [_text(4, 100)], [None, lens], **data)):
        with pytest.raises(ValueError, match=refused):
            use()
    # the model it was fitted on, in float32 or bfloat16, reads it; a lens built by hand has no fingerprint
    load_lens(tmp_path / "lens.safetensors", model=fitted_on)
    logit_lens(copy.deepcopy(fitted_on).to(torch.bfloat16), IDS, lens=lens)
    logit_lens(other, IDS, lens=LinearShortcut(lens.weight, lens.bias, {"model": "mine"}))


def test_a_tuned_lens_checkpoint_resumes_only_on_the_model_that_wrote_it(tmp_path):
    model_a, model_b = make_family("gpt2"), make_family("gpt2", seed=1)  # the same shape, other weights
    kwargs = dict(tokenizer=Chars(), max_tokens=256, tokens_per_step=64, max_length=32, progress=False,
                  checkpoint=tmp_path / "a.ckpt.safetensors")
    lens = train_tuned_lens(model_a, [_text(6)], **kwargs)
    assert lens.config["model_fingerprint"] == reslens.adapter(model_a).fingerprint
    made, used = reslens.adapter(model_a).fingerprint[:12], reslens.adapter(model_b).fingerprint[:12]
    with pytest.raises(ValueError, match=f"was trained on GPT2LMHeadModel \\(fingerprint {made}\\); this run "
                                         f"trains GPT2LMHeadModel \\(fingerprint {used}\\)"):
        train_tuned_lens(model_b, [_text(6)], **kwargs)
    again = train_tuned_lens(model_a, [_text(6)], **kwargs)  # the model that wrote it resumes (all done)
    assert torch.equal(again.weight, lens.weight)


def test_a_tuned_lens_folder_is_read_without_unpickling_objects(tmp_path):
    import os

    marker = tmp_path / "unpickling-ran-code"

    class Payload:  # unpickling this would call os.mkdir(marker)
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = tmp_path / "lens"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 16, "num_hidden_layers": 2, "bias": True}))
    torch.save({"0.weight": Payload()}, folder / "params.pt")
    with pytest.raises(ValueError, match="tensors-only state dict"):
        load_lens(folder)
    assert not marker.exists()
    torch.save({"0.weight": torch.zeros(16, 16)}, folder / "params.pt")
    with pytest.raises(ValueError, match="holds \\['0.weight'\\]"):
        load_lens(folder)
    (folder / "params.pt").unlink()
    with pytest.raises(ValueError, match="no params.pt"):
        load_lens(folder)


def test_bad_lenses_are_refused_with_clear_errors(tmp_path):
    model = make_family("llama")
    res = reslens.capture(model, IDS, sites=("resid", "resid_mid"))
    tuned = _random_lens(TunedLens, model)
    with pytest.raises(ValueError, match="resid layers only"):
        lens_of(res, model, lens=tuned, sites=("resid", "resid_mid"))
    with pytest.raises(ValueError, match="resid layers only"):
        logit_lens(model, IDS, lens=tuned, sites=("resid_mid",))
    with pytest.raises(TypeError, match="lens must be None"):
        logit_lens(model, IDS, lens="tuned")
    with pytest.raises(ValueError, match="made for 3 layers of d_model 32"):
        logit_lens(make_family("llama", hidden_size=16, intermediate_size=32), IDS, lens=tuned)
    with pytest.raises(ValueError, match="weight must be"):
        TunedLens(torch.zeros(3, 4, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="two of the same kind.*mapping"):
        compare_lenses(model, ["some text here"], [None, "logit"], tokenizer=Chars())
    with pytest.raises(ValueError, match="ridge=-1.0 is out of range"):
        fit_shortcut(model, ["text"], tokenizer=Chars(), ridge=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        train_tuned_lens(model, ["text"], tokenizer=Chars(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="needs more than d_model=32"):
        fit_shortcut(model, ["a few words"], tokenizer=Chars(), progress=False)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="x.safetensors"):
        load_lens(tmp_path / "x.safetensors")
    res.save(tmp_path / "res.safetensors")
    with pytest.raises(ValueError, match="not a reslens lens file"):
        load_lens(tmp_path / "res.safetensors")


def test_lens_stats_and_the_comparison_name_their_lens(tmp_path):
    model = make_family("mistral")
    shortcut = _random_lens(LinearShortcut, model)
    stats = lens_stats(model, [_text(4, 200)], tokenizer=Chars(), lens=shortcut, progress=False)
    assert stats.lens_name == "linear shortcut" and stats.table().startswith("linear shortcut:")
    assert "linear shortcut" in repr(stats)
    scores = compare_lenses(model, [_text(4, 200)], [None, shortcut], tokenizer=Chars(), progress=False)
    assert scores.lenses == ("logit lens", "linear shortcut") and scores.layers == (0, 1, 2, 3)
    plain = lens_stats(model, [_text(4, 200)], tokenizer=Chars(), progress=False)
    torch.testing.assert_close(scores.kl_final_layer[0], plain.mean.kl_final_layer)
    torch.testing.assert_close(scores.cross_entropy[0], -plain.mean.target_logprob)
    frame = scores.to_frame()
    assert list(frame.columns) == ["lens", "layer", "kl_final_layer", "kl_layer_final", "cross_entropy",
                                   "top1_agreement", "calibration"]
    assert len(frame) == 8 and "linear shortcut" in scores.table() and "<table>" in scores._repr_html_()
    assert scores.plot().axes
    scores.save(tmp_path / "cmp.safetensors")
    back = type(scores).load(tmp_path / "cmp.safetensors")
    assert back.lenses == scores.lenses and torch.equal(back.kl_final_layer, scores.kl_final_layer)


def test_the_shortcut_refuses_a_layer_that_is_constant_over_the_corpus():
    class Chars:  # one id per character
        def __call__(self, texts, add_special_tokens=False, **kwargs):
            return {"input_ids": [[3 + ord(c) % 20 for c in text] for text in texts]}

    llama = make_family("llama")  # no position embedding: one repeated token is one embedding row
    with pytest.raises(ValueError, match=r"residual at layer\(s\) \[0\] is the same at all 200 tokens"):
        fit_shortcut(llama, ["a" * 200], tokenizer=Chars(), max_tokens=200, progress=False)
    fitted = fit_shortcut(llama, ["abcdefghijklmnopqrstuvwxyz" * 10], tokenizer=Chars(), max_tokens=200,
                          progress=False)
    assert all(bool(w.isfinite().all()) for w in fitted.weight)


def test_the_wing_keeps_its_former_module_names_through_its_own_init_alone():
    import subprocess
    import sys

    code = (
        "import sys, reslens; cheap = 'torch' not in sys.modules\n"
        "import reslens.lens_stats, reslens.lenses\n"
        "from reslens.lens_stats import lens_stats, LensStats, MetricStats, QUANTILES\n"
        "from reslens.lenses import fit_shortcut, train_tuned_lens, compare_lenses, load_lens, TunedLens\n"
        "import reslens.lens as lens\n"
        "assert reslens.lens_stats is reslens.lenses is lens and lens.lens_stats is lens_stats\n"
        "assert lens_stats.__module__ == 'reslens.lens.stats'\n"
        "assert TunedLens.__module__ == 'reslens.lens.values'\n"
        "print(cheap)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out  # importing reslens (and the wing's table) loads no torch
    src = Path(reslens.__file__).parent
    assert not (src / "lens_stats.py").exists() and not (src / "lenses").exists()  # no shim modules


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_a_warm_start_from_the_shortcut_reads_as_the_shortcut_before_training(family):
    model = make_family(family)
    arch = reslens.adapter(model)
    shortcut = fit_shortcut(model, [_text(3)], tokenizer=Chars(), max_tokens=1024, max_length=32,
                            progress=False)
    translators = tuned_module._translators(arch, shortcut)
    start = TunedLens(torch.stack([t.weight.detach() for t in translators]),
                      torch.stack([t.bias.detach() for t in translators]))
    a = logit_lens(model, IDS, lens=shortcut, top_k=3)
    b = logit_lens(model, IDS, lens=start, top_k=3)
    assert torch.equal(a.top_ids[..., 0], b.top_ids[..., 0])
    torch.testing.assert_close(a.kl_final_layer, b.kl_final_layer, atol=1e-4, rtol=1e-4)


def test_a_warm_started_tuned_lens_trains_from_the_shortcut_and_decays_towards_it():
    model = make_family("llama")
    kwargs = dict(tokenizer=Chars(), max_tokens=1024, max_length=32, progress=False)
    shortcut = fit_shortcut(model, [_text(3)], **kwargs)
    kwargs["tokens_per_step"] = 256
    warm = train_tuned_lens(model, [_text(4)], init=shortcut, **kwargs)
    cold = train_tuned_lens(model, [_text(4)], **kwargs)
    assert warm.config["init"].startswith("linear shortcut ") and "init" not in cold.config
    # the warm start begins far below the cold start's loss (the logit lens's), and stays below
    assert warm.config["loss"][0][1] < cold.config["loss"][0][1]
    eye = torch.eye(shortcut.d_model)
    drift = (warm.weight - (shortcut.weight - eye)).abs().max()
    assert 0 < float(drift) < float((shortcut.weight - eye).abs().max())
    # pure weight decay (no gradient) moves the translators towards where they started, not to zero
    p, p0 = torch.nn.Parameter(torch.tensor([2.0])), torch.tensor([1.0])
    p.grad = torch.zeros(1)
    tuned_module._decay_towards([p], [p0], 0.5)
    assert float(p.grad.detach()) == 0.5
    with pytest.raises(TypeError, match="init"):
        train_tuned_lens(model, [_text(4)], init="shortcut", **kwargs)
    with pytest.raises(ValueError, match="fitted on"):
        train_tuned_lens(make_family("llama", seed=1), [_text(4)], init=shortcut, **kwargs)


def test_a_lens_says_what_its_training_leaves_in_doubt_when_it_is_used():
    model = make_family("gpt2")
    short = train_tuned_lens(model, [_text(5)], tokenizer=Chars(), max_tokens=256, tokens_per_step=64,
                             max_length=32, progress=False, held_out=[_text(6)], held_out_tokens=256)
    held = short.config["held_out"]
    assert len(held["kl_lens"]) == len(held["kl_logit"]) == reslens.adapter(model).n_layer + 1
    assert held["n_tokens"] > 0
    assert any("too few" in c for c in short.caveats)
    with pytest.warns(UserWarning, match="too few to tell"):
        logit_lens(model, IDS, lens=short)
    falling = TunedLens(short.weight, short.bias, {"loss": [[10.0 - i, 10.0 - i] for i in range(8)]})
    assert any("still falling fast" in c for c in falling.caveats)
    flat = TunedLens(short.weight, short.bias, {"loss": [[1.0, 1.0]] * 8})
    assert flat.caveats == []
    # a loss that rose (Gemma 3 under the paper's SGD step: 2.29 -> 5.13 nats in two steps)
    rose = TunedLens(short.weight, short.bias, {"loss": [[2.0, 2.6], [5.0, 5.3]]})
    assert any("training loss rose" in c and "2.3 -> 5.15" in c for c in rose.caveats), rose.caveats
    assert not any("rose" in c for c in falling.caveats)
    held = {"kl_lens": [1.0, 3.0, 0.0, 0.0], "kl_logit": [2.0, 2.0, 0.0, 0.0], "n_tokens": 9}
    worse = TunedLens(short.weight, short.bias, {"held_out": held})
    assert worse.caveats == ["its held-out KL is worse than the logit lens's at layers [1]"]
