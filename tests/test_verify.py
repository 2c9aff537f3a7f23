"""reslens.verify: every identity reslens relies on, checked on a model; failures named, the model as found.

Tiny seeded random models of every family in helpers.FAMILIES (so a family added there is covered), a
deliberately miswired adapter, a model changed outside its weights, the command line on a saved model,
and SmolLM2 in the real-model tier."""

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import BertConfig, BertModel

import reslens
from helpers import FAMILIES, assert_same_state, hook_counts, make_family, make_model, model_state
from reslens._identities import CHECKS
from reslens.arch.llama import Llama
from reslens.cli import main
from reslens.models import embedded_model_dir
from reslens.verification import ROWS, TOLERANCES, Verification, _tolerances, verify


@dataclass(frozen=True, eq=False, repr=False)
class NormBeforeAttention(Llama):
    """A wrong Llama adapter: resid_mid read at the attention's norm (the block's input), not the MLP's."""

    layout = dataclasses.replace(Llama.layout, mlp_norm="input_layernorm")


@dataclass(frozen=True, eq=False, repr=False)
class MLPIsAttention(Llama):
    """A wrong Llama adapter: the MLP's output read at the attention module."""

    layout = dataclasses.replace(Llama.layout, mlp="self_attn")


@dataclass(frozen=True, eq=False, repr=False)
class MLPWeightsRaise(Llama):
    """A broken Llama adapter: reading the MLP's weights raises."""

    def mlp_weights(self, layer):
        raise RuntimeError("the MLP's weights cannot be read")


def _rows_ok(result: Verification) -> None:
    assert [row.check for row in result.rows] == list(ROWS)
    bad = [row for row in result.rows if row.passed is not True]
    assert not bad, result.table()
    assert all(math.isfinite(row.error) and row.error <= row.tolerance for row in result.rows)


def test_every_row_has_a_check_and_tolerances_for_each_dtype():
    assert list(CHECKS) == list(ROWS)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert set(TOLERANCES[dtype]) == set(ROWS)
    assert reslens.verify is verify


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes_on_every_family_in_float32(family):
    model = make_family(family)
    result = verify(model)
    _rows_ok(result)
    assert result.passed and result.failed == () and result.dtype == "float32"
    assert result.inputs == ("ids", "padded ids")
    assert result.row("attn_pattern").tolerance == TOLERANCES[torch.float32]["attn_pattern"]


@pytest.mark.parametrize("family, dtype", [("llama", torch.bfloat16), ("qwen2", torch.float16)])
def test_verify_passes_in_half_precision_with_that_dtypes_tolerances(family, dtype):
    result = verify(make_family(family).to(dtype))
    _rows_ok(result)
    assert result.dtype == str(dtype).removeprefix("torch.")
    assert {row.check: row.tolerance for row in result.rows} == TOLERANCES[dtype]
    # rounding shows in half precision (the float32 tolerance would be too tight), within the dtype's own
    assert result.row("resid_next").error > TOLERANCES[torch.float32]["resid_next"]


def test_verify_reads_texts_with_a_tokenizer():
    model, tokenizer = reslens.load_model()  # the embedded GPT-2 and its tokenizer
    result = verify(model, tokenizer)
    _rows_ok(result)
    assert result.inputs == ("ids", "text", "padded texts")


def test_a_miswired_adapter_fails_the_check_it_breaks_and_only_that():
    model = make_family("llama")
    result = verify(NormBeforeAttention(model))
    assert not result.passed and result.failed == ("resid_mid",)
    row = result.row("resid_mid")
    assert row.error > 0.05 and "block" in row.detail
    assert "FAILED: resid_mid" in repr(result) and "FAIL" in result.table()
    assert hook_counts(model) == {}


def test_a_misread_sublayer_fails_the_rows_that_read_it():
    result = verify(MLPIsAttention(make_family("llama")))  # mlp_out read at the attention's output
    assert {"resid_next", "mlp_output"} <= set(result.failed)
    for check in ("hidden_states", "resid_mid", "attn_output", "attn_pattern", "lens_logits"):
        assert result.row(check).passed, result.table()


def test_a_check_that_raises_is_a_failed_row_and_the_others_still_run():
    model = make_family("llama")
    before = model_state(model)
    result = verify(MLPWeightsRaise(model))
    assert result.failed == ("mlp_output",), result.table()
    assert math.isnan(result.row("mlp_output").error) and "RuntimeError" in result.row("mlp_output").detail
    assert hook_counts(model) == {}
    assert_same_state(before, model_state(model))


def test_a_model_changed_outside_its_weights_fails_the_lens():
    model = make_family("gpt2")
    arch = reslens.adapter(model)
    handle = arch.final_norm_module.register_forward_hook(lambda module, args, out: out + 1.0)
    try:
        result = verify(model)
    finally:
        handle.remove()
    assert result.row("hidden_states").passed  # capture and HuggingFace both see the changed output
    assert not result.row("lens_logits").passed and not result.row("dla_sum").passed
    assert hook_counts(model) == {}


def test_the_model_is_left_as_found():
    model = make_family("mistral").train()  # dropout would be on: verify runs in eval mode
    before = model_state(model)
    result = verify(model)
    assert result.passed, result.table()
    assert hook_counts(model) == {}  # reslens's hooks and HuggingFace's output recorders
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "_output_capturing_hooks_installed")
    assert_same_state(before, model_state(model))  # weights, training flags, requires_grad
    with torch.no_grad():  # HuggingFace installs its recorders again when asked
        assert len(model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states) == 4


def test_attention_comes_back_when_the_eager_forward_raises():
    model = make_family("qwen2")

    def refuse_eager(module, args, kwargs):
        if model.config._attn_implementation == "eager":
            raise RuntimeError("no eager here")

    handle = model.model.register_forward_pre_hook(refuse_eager, with_kwargs=True)
    try:
        result = verify(model)
    finally:
        handle.remove()
    assert result.failed == ("attn_pattern",)
    assert result.row("attn_pattern").detail == "RuntimeError: no eager here"
    assert model.config._attn_implementation == "sdpa"
    assert hook_counts(model) == {}


def test_an_unknown_family_is_refused_naming_it():
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16))
    with pytest.raises(TypeError, match="supported family.*model_type='bert'"):
        verify(bert)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=4), "n_tokens=4"),
    (dict(texts=["only one"]), "texts must be two"),
    (dict(tolerances={"nope": 1.0}), "unknown checks"),
    (dict(tolerances={"dla_sum": -1.0}), r"tolerances\['dla_sum'\]"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        verify(make_family("gpt2"), **kwargs)


def test_tolerances_can_be_replaced_and_the_display_shows_the_rows():
    result = verify(make_family("gpt2"), tolerances={"attn_pattern": 0.0, "dla_sum": 0.5})
    assert result.row("dla_sum").tolerance == 0.5
    assert result.row("attn_pattern").passed is (result.row("attn_pattern").error == 0.0)
    html = result._repr_html_()
    assert html.startswith("<div><b>reslens verify") and all(f"<td>{name}</td>" in html for name in ROWS)
    with pytest.raises(ValueError, match="check='nope' is not a row"):
        result.row("nope")


def test_a_bare_body_has_no_logit_rows():
    result = verify(make_family("llama", bare=True))
    assert result.passed
    not_applicable = {row.check for row in result.rows if row.passed is None}
    assert not_applicable == {"lens_logits", "lens_probs", "dla_sum"}
    assert "n/a" in result.table()


# --- the command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify-gpt2")
    make_model(vocab_size=50257, n_positions=32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    return path


def test_cli_prints_the_table_and_exits_0(saved_dir, capsys):
    assert main(["verify", str(saved_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: ") and "all passed" in out and "padded texts" in out
    assert all(f"  {name} " in out for name in ROWS)


def test_cli_exits_1_when_a_check_fails(saved_dir, capsys, monkeypatch):
    monkeypatch.setitem(TOLERANCES[torch.float32], "lens_probs", -1.0)  # no error is below it
    assert main(["verify", str(saved_dir), "--n-tokens", "8"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: lens_probs" in out


def test_cli_in_bfloat16(saved_dir, capsys):
    assert main(["verify", str(saved_dir), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_verify_passes_on_smollm2(smollm2):
    model, tokenizer = smollm2
    before = hook_counts(model)  # the session's model may carry HF's output recorders from earlier tests
    result = verify(model, tokenizer)
    _rows_ok(result)
    assert result.family == "llama" and result.inputs[-1] == "padded texts"
    assert hook_counts(model) == before and model.config._attn_implementation == "sdpa"


def test_float64_uses_float32_tolerances_and_another_dtype_needs_every_check_named():
    result = verify(make_family("gpt2").double())
    assert result.passed and result.dtype == "float64"
    assert {row.check: row.tolerance for row in result.rows} == TOLERANCES[torch.float32]
    with pytest.raises(ValueError, match="tolerances for float32, bfloat16 and float16"):
        _tolerances(torch.int8, {"dla_sum": 1.0})
    assert _tolerances(torch.int8, dict.fromkeys(ROWS, 1.0)) == dict.fromkeys(ROWS, 1.0)
