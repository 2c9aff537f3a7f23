"""The Jacobian lens: its fit against brute-force autograd on every family; TransformerLens's artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, make_family
from safetensors import safe_open
from safetensors.torch import load_file

import reslens
from reslens.hooks import patch
from reslens.lens import (
    JacobianLens,
    fit_jacobian_lens,
    lens_of,
    load_jacobian_lens,
    load_lens,
    logit_lens,
)
from reslens.lens import jacobian as jacobian_module

FIXTURES = Path(__file__).parent / "fixtures" / "jacobian_lens"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4], [6, 2, 9, 9, 1, 3, 5, 7]])
TEXTS = ["the cat sat on a mat", "a dog ran"]  # windows of 12 tokens: 12 and 8, then 9


class Chars:
    """One id per character (mod 97), no special token: the fixture's tokenizer (its ids exactly)."""

    def __call__(self, texts, add_special_tokens=False, **_):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 97 for c in texts]}
        return {"input_ids": [[ord(c) % 97 for c in t] for t in texts]}


class CharsWithBos(Chars):
    """The same, led by a BOS (id 1) where special tokens are asked for: start tokens in every window."""

    def __call__(self, texts, add_special_tokens=False, **_):
        out = super().__call__(texts)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [1, *ids] if isinstance(texts, str) else [[1, *i] for i in ids]
        return out


def _brute_force(model, rows: list[list[int]], skip_first: int, n_start: int) -> tuple:
    """The lens's definition written out: ``(J [L, d, d], windows, tokens)``.

    The full Jacobian of each window's last residual with respect to each layer's
    (``torch.autograd.functional.jacobian``), summed over source and target positions in V.
    """
    arch = reslens.adapter(model)
    n_layer, d = arch.n_layer, arch.d_model
    total, n_windows, n_tokens = torch.zeros(n_layer, d, d, dtype=torch.float64), 0, 0
    for row in rows:
        ids = torch.tensor([row])
        valid = [p for p in range(max(skip_first, n_start), len(row) - 1)]
        if not valid:
            continue
        resid = reslens.capture(model, ids, sites="resid").resid[:, 0]  # [L + 1, pos, d]
        for layer in range(n_layer):
            def last_resid(h, layer=layer):
                out = {}
                with patch(model, {("resid", layer): lambda _: h[None],
                                   ("resid", n_layer): lambda t: out.setdefault("y", t)}):
                    arch.body(input_ids=ids, use_cache=False)
                return out["y"][0]  # [pos, d]

            jac = torch.autograd.functional.jacobian(last_resid, resid[layer], vectorize=True)  # [P, d, P, d]
            block = jac[valid][:, :, valid].double()  # [t', d_out, t, d_in]
            total[layer] += block.sum((0, 2)) / len(valid)
        n_windows, n_tokens = n_windows + 1, n_tokens + len(valid)
    return (total / n_windows).float(), n_windows, n_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fit_is_the_average_jacobian_of_a_brute_force_autograd(family):
    model = make_family(family)
    lens = fit_jacobian_lens(model, TEXTS, tokenizer=CharsWithBos(), max_length=12, batch_size=2,
                             skip_first=0, progress=False)
    windows = [[ord(c) % 97 for c in t] for t in TEXTS]
    rows = [[1, *w[i : i + 12]] for w in windows for i in range(0, len(w), 12)]  # BOS first: never a source
    want, n_windows, n_tokens = _brute_force(model, rows, skip_first=0, n_start=1)
    assert (lens.config["n_windows"], lens.config["n_tokens"]) == (n_windows, n_tokens) == (3, 11 + 7 + 8)
    assert isinstance(lens, JacobianLens) and not lens.bias.any()
    scale = float(want.abs().max())
    torch.testing.assert_close(lens.weight, want, rtol=1e-5, atol=2e-6 * scale)
    assert float((lens.weight - torch.eye(32)).abs().max()) > 0.05  # not the logit lens


def test_skip_first_counts_from_the_row_start_and_the_chunked_and_one_by_one_products_agree(monkeypatch):
    model = make_family("qwen3")
    kwargs = dict(tokenizer=Chars(), max_length=12, batch_size=2, skip_first=4, progress=False)
    lens = fit_jacobian_lens(model, TEXTS, **kwargs)
    windows = [[ord(c) % 97 for c in t] for t in TEXTS]
    rows = [w[i : i + 12] for w in windows for i in range(0, len(w), 12)]
    want, n_windows, n_tokens = _brute_force(model, rows, skip_first=4, n_start=0)
    assert (lens.config["n_windows"], lens.config["n_tokens"]) == (n_windows, n_tokens) == (3, 7 + 3 + 4)
    torch.testing.assert_close(lens.weight, want, rtol=1e-5, atol=2e-6 * float(want.abs().max()))
    grad, passes = torch.autograd.grad, []

    def counted(*args, **kw):
        passes.append(len(args[2]) if kw.get("is_grads_batched") else 1)  # output directions in this pass
        return grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    monkeypatch.setattr(jacobian_module, "_GRADIENT_BUDGET", 2 * 12 * 32 * 3 * 5)  # 5 directions a pass
    chunked = fit_jacobian_lens(model, TEXTS, **kwargs)
    assert passes[:7] == [5, 5, 5, 5, 5, 5, 2] and sum(passes) == 2 * 32  # two batches, d_model rows each
    torch.testing.assert_close(chunked.weight, lens.weight, rtol=1e-6, atol=1e-7)

    def no_batching(*args, **kw):
        if kw.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    one_by_one = fit_jacobian_lens(model, TEXTS, **kwargs)
    torch.testing.assert_close(one_by_one.weight, lens.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lens_reads_J_h_through_the_final_norm_and_its_last_row_is_the_model_logits(family):
    model = make_family(family)
    arch = reslens.adapter(model)
    g = torch.Generator().manual_seed(3)
    weight = torch.eye(32) + 0.2 * torch.randn(3, 32, 32, generator=g)
    lens = JacobianLens(weight, torch.zeros(3, 32))
    result = logit_lens(model, IDS, lens=lens, top_k=3)
    logits = model(input_ids=IDS).logits.float()
    assert result.lens_name == "Jacobian lens" and result.table().startswith("Jacobian lens")
    assert torch.equal(result.top_ids[3], logits.topk(3, dim=-1).indices)
    torch.testing.assert_close(result.top_probs[3], torch.softmax(logits, -1).topk(3, dim=-1).values)
    res = reslens.capture(model, IDS, sites="resid")
    with torch.no_grad():
        expected = arch.logits(res.resid[1] @ weight[1].T).float()  # W_U norm(J_1 h_1), soft-cap included
    probs = torch.softmax(expected, -1).topk(3, dim=-1)
    assert torch.equal(result.top_ids[1], probs.indices)
    torch.testing.assert_close(result.top_probs[1], probs.values)


def test_save_and_load_round_trip_bit_exactly_and_another_model_is_refused(tmp_path):
    model = make_family("llama")
    lens = fit_jacobian_lens(model, TEXTS, tokenizer=Chars(), max_length=12, skip_first=2, progress=False)
    lens.save(tmp_path / "jlens.safetensors")
    back = load_lens(tmp_path / "jlens.safetensors", model=model)
    assert type(back) is JacobianLens and back.config == lens.config
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.fingerprint == lens.fingerprint
    with pytest.raises(ValueError, match="this Jacobian lens was fitted on LlamaForCausalLM .*; it is used"):
        load_lens(tmp_path / "jlens.safetensors", model=make_family("llama", seed=1))
    with pytest.raises(ValueError, match="made for 3 layers of d_model 32; the model has 2 layers"):
        logit_lens(make_family("llama", num_hidden_layers=2), IDS, lens=back)


def test_bad_fits_are_refused_with_clear_errors():
    model = make_family("gpt2")
    with pytest.raises(ValueError, match="no window of the corpus has a position past skip_first=12"):
        fit_jacobian_lens(model, TEXTS, tokenizer=Chars(), max_length=12, skip_first=12, progress=False)
    with pytest.raises(ValueError, match="skip_first=-1 is out of range"):
        fit_jacobian_lens(model, TEXTS, tokenizer=Chars(), skip_first=-1, progress=False)
    with pytest.raises(ValueError, match="training mode"):
        fit_jacobian_lens(model.train(), TEXTS, tokenizer=Chars(), progress=False)


def _fixture(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = FIXTURES / family
    config = AutoConfig.for_model(**json.loads((folder / "model_config.json").read_text()))
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    with safe_open(folder / "expected.safetensors", "pt") as f:
        meta = f.metadata()
    return folder, model, load_file(folder / "expected.safetensors"), meta


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_an_artifact_saved_by_transformer_lens_reads_the_same_and_the_fit_is_its_estimator(family):
    folder, model, expected, meta = _fixture(family)
    lens = load_jacobian_lens(folder / "lens.pt", model=model)
    assert isinstance(lens, JacobianLens) and lens.config["layers"] == [1, 2]
    assert lens.config["model"] == f"reslens-tiny-{family}" and lens.config["n_prompts"] == 5
    raw = torch.load(folder / "lens.pt", weights_only=True)["J"]
    for s in (0, 1):  # the artifact's block output s is resid s + 1, its float16 read exactly
        assert raw[s].dtype == torch.float16 and torch.equal(lens.weight[s + 1], raw[s].float())
    assert not lens.weight[0].any() and type(load_lens(folder / "lens.pt")) is JacobianLens
    # TransformerLens's own readout of the reloaded artifact, from reslens's lens on reslens's capture
    result = logit_lens(model, expected["probe_ids"][None], lens=lens, layers=range(1, 4), top_k=5)
    for row, key in enumerate(("0", "1", "final")):
        package = torch.softmax(expected[f"logits_{key}"], -1).topk(5, dim=-1)
        assert torch.equal(result.top_ids[row, 0], package.indices)
        torch.testing.assert_close(result.top_probs[row, 0], package.values, atol=1e-6, rtol=1e-5)
    # reslens's fit on the same prompts is TransformerLens's estimator (its float32 matrices, before saving)
    prompts = json.loads(meta["prompts"])
    for i, prompt in enumerate(prompts):
        assert expected[f"prompt_ids_{i}"].tolist() == Chars()(prompt)["input_ids"]
    ours = fit_jacobian_lens(model, prompts, tokenizer=Chars(), max_length=40, batch_size=2,
                             skip_first=int(meta["skip_first_positions"]), progress=False)
    assert ours.config["n_windows"] == 5
    for s in (0, 1):
        torch.testing.assert_close(ours.weight[s + 1], expected[f"J_{s}"], rtol=1e-5, atol=1e-6)


def test_a_reference_artifact_has_no_embedding_row_and_is_refused_on_another_model(tmp_path):
    folder, model, expected, _ = _fixture("gpt2")
    lens = load_jacobian_lens(folder / "lens.pt")  # without model=: its depth from its target layer
    assert lens.n_layer == 3 and lens.config["layers"] == [1, 2]
    with pytest.raises(ValueError, match=r"no Jacobian for resid layer 0 .*layers=range\(1, 4\)"):
        logit_lens(model, expected["probe_ids"][None], lens=lens)
    lens.save(tmp_path / "kept.safetensors")  # a reslens file keeps which layers it holds
    back = load_lens(tmp_path / "kept.safetensors")
    assert back.config["layers"] == [1, 2] and torch.equal(back.weight, lens.weight)
    with pytest.raises(ValueError, match="fitted for d_model=16; the model has d_model=32"):
        load_jacobian_lens(folder / "lens.pt", model=make_family("gpt2"))
    deeper = make_family("gpt2", n_embd=16, n_head=2, n_layer=4)
    with pytest.raises(ValueError, match="output of block 2; the 4-layer model's last block is 3"):
        load_lens(folder / "lens.pt", model=deeper)
    shallow = make_family("gpt2", n_embd=16, n_head=2, n_layer=2)
    with pytest.raises(ValueError, match=r"block outputs \[1\], outside 0..0 of a 2-layer model"):
        load_jacobian_lens(folder / "lens.pt", model=shallow)


class Payload:
    """An object a tensors-only read must refuse to unpickle."""


def test_a_torch_file_is_read_as_tensors_only_and_other_contents_are_refused(tmp_path):
    torch.save({"J": {0: torch.eye(4)}, "d_model": 4, "hidden": Payload()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="cannot read .* as a tensors-only torch file"):
        load_jacobian_lens(tmp_path / "code.pt")
    torch.save({"weights": torch.eye(4)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds \['weights'\]; a Jacobian-lens artifact holds 'J'"):
        load_lens(tmp_path / "other.pt")
    torch.save({"J": {0: torch.eye(4), 1: torch.eye(5)}, "d_model": 4}, tmp_path / "widths.pt")
    with pytest.raises(ValueError, match=r"disagree on the width \(\[4, 5\]\)"):
        load_jacobian_lens(tmp_path / "widths.pt")
    torch.save({"J": {0: torch.eye(4)}, "metadata": {"estimator": "other"}}, tmp_path / "est.pt")
    with pytest.raises(ValueError, match="fitted by the estimator 'other'"):
        load_jacobian_lens(tmp_path / "est.pt")
    # a reference fit checkpoint: its running sum over n_done prompts
    torch.save({"jacobian_sum": {0: 4 * torch.eye(4)}, "n_done": 2, "target_layer": 1}, tmp_path / "ckpt.pt")
    lens = load_jacobian_lens(tmp_path / "ckpt.pt")
    assert lens.n_layer == 2 and torch.equal(lens.weight[1], 2 * torch.eye(4))


def test_lens_of_reads_a_capture_with_the_jacobian_lens_as_logit_lens_does():
    model = make_family("gemma2")
    lens = fit_jacobian_lens(model, TEXTS, tokenizer=Chars(), max_length=12, skip_first=2, progress=False)
    res = reslens.capture(model, IDS, sites="resid")
    assert torch.equal(lens_of(res, model, lens=lens).top_ids, logit_lens(model, IDS, lens=lens).top_ids)
