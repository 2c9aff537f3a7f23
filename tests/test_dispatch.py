"""Models dispatched by accelerate: blocks in CPU memory and offloaded to disk give the undispatched numbers.

A real accelerate dispatch on CPU (``from_pretrained(device_map=...)`` with ``"disk"`` entries,
``dispatch_model``, ``cpu_offload``): offloaded weights are on the meta device outside the forward and
live in accelerate's weights map. Capture, the lens, head scores and circuits, causal tracing and the
rank-one edit must equal the undispatched model, leave no reslens hook behind and keep accelerate's.

The reference is the same checkpoint loaded without a ``device_map``: a model whose tensors come from
elsewhere (another allocation) can differ in the last bit of a backward pass on CPU (the alignment of
its memory changes the vectorised kernels), dispatched or not.
"""

import copy
import dataclasses
import hashlib
import types
import warnings

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel  # noqa: E402

import reslens  # noqa: E402
from helpers import hook_counts, make_config, make_family  # noqa: E402
from reslens import heads, rome, tracing  # noqa: E402
from reslens.arch import adapter  # noqa: E402
from reslens.hooks import SITES  # noqa: E402
from reslens.models import embedded_model_dir  # noqa: E402

#: every top-level module of each family on "cpu" or "disk": block 1 (the edited one) is on disk in both
DEVICE_MAPS = {
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
             "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
             "transformer.ln_f": "disk", "lm_head": "cpu"},
    "llama": {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "disk"},
}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
VOCAB = 50257  # the embedded GPT-2 tokenizer's, for the string APIs
PROMPT, SUBJECT = "The capital city of Dracula is", "Dracula"
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module", params=sorted(DEVICE_MAPS))
def pair(request, tmp_path_factory):
    """``(family, undispatched reference, dispatched model, checkpoint folder)`` of one tiny seeded model."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    make_family(family, vocab_size=VOCAB).save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=DEVICE_MAPS[family], offload_folder=folder / "offload"
    ).eval()
    return types.SimpleNamespace(family=family, reference=reference, model=model, folder=folder)


def assert_same(a, b, name="result"):
    """Bit-equal tensors (NaN where the other has NaN), field by field through result dataclasses."""
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{name}.{f.name}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    else:
        assert a == b, name


def snapshot(model):
    """What an analysis must leave as it was: meta (offloaded) parameters, accelerate's hooks, no others."""
    return {
        "meta": {n for n, p in model.named_parameters() if p.device.type == "meta"},
        "accelerate": {n: m._hf_hook for n, m in model.named_modules() if hasattr(m, "_hf_hook")},
        "torch hooks": hook_counts(model),
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["torch hooks"] == {}, "a reslens hook was left on the model"
    assert after["meta"] == before["meta"], "offloaded weights were left loaded (or a loaded one offloaded)"
    assert after["accelerate"].keys() == before["accelerate"].keys()
    assert all(after["accelerate"][n] is hook for n, hook in before["accelerate"].items())


def digest(folder):
    """SHA-1 of every file under ``folder`` (checkpoint and offload folder): nothing may write there."""
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


# --- the dispatch is real ------------------------------------------------------------------------


def test_the_dispatch_really_offloads_blocks_to_disk(pair):
    model, blocks = pair.model, BLOCKS[pair.family]
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for n, p in params.items() if n.startswith(f"{blocks}.1."))
    assert not any(p.device.type == "meta" for n, p in params.items() if n.startswith(f"{blocks}.0."))
    hook = model.get_submodule(f"{blocks}.1.mlp").get_submodule(
        "c_proj" if pair.family == "gpt2" else "down_proj")._hf_hook
    assert hook.offload and isinstance(hook.weights_map.dataset, OffloadedWeightsLoader)
    assert hook.weights_map.dataset.state_dict == {}  # read from the files on every forward
    arch = adapter(model)
    assert arch.offloaded and not adapter(pair.reference).offloaded and arch.device == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, pair.reference(IDS).logits)


def test_adapter_weights_of_offloaded_layers_are_the_stored_values(pair):
    arch, ref = adapter(pair.model), adapter(pair.reference)
    before = snapshot(pair.model)
    assert_same(arch.W_E, ref.W_E, "W_E")
    assert_same(arch.W_U, ref.W_U, "W_U")
    assert_same(arch.norm("final").weight, ref.norm("final").weight, "final norm")
    for layer in range(arch.n_layer):
        for role in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            assert_same(getattr(arch, role)(layer), getattr(ref, role)(layer), f"{role}({layer})")
        for which in ("attn", "mlp"):
            assert_same(arch.norm(which, layer), ref.norm(which, layer), f"norm({which!r}, {layer})")
        mine, theirs = arch.mlp_weights(layer), ref.mlp_weights(layer)
        for f in ("W_in", "b_in", "W_gate", "b_gate", "W_out", "b_out"):
            assert_same(getattr(mine, f), getattr(theirs, f), f"mlp_weights({layer}).{f}")
    for p, q in zip(arch.key_parameters(2), ref.key_parameters(2), strict=True):
        assert torch.equal(p, q)
    assert_untouched(pair.model, before)


# --- the analyses equal the undispatched model ---------------------------------------------------


def test_capture_of_every_site_equals_the_undispatched_model(pair):
    sites = tuple(s for s in SITES if pair.family != "gpt2" or s != "mlp_gate")
    before = snapshot(pair.model)
    res = reslens.capture(pair.model, IDS, sites=sites)
    assert_same(res, reslens.capture(pair.reference, IDS, sites=sites))
    assert res.resid.device == torch.device("cpu")
    one = reslens.capture(pair.model, IDS, sites=("mlp_act", "attn_pattern"), layers=1)  # stops in block 1
    assert_same(one, reslens.capture(pair.reference, IDS, sites=("mlp_act", "attn_pattern"), layers=1))
    assert_untouched(pair.model, before)


def test_logit_lens_equals_the_undispatched_model(pair, tokenizer):
    before = snapshot(pair.model)
    assert_same(reslens.lens.logit_lens(pair.model, IDS), reslens.lens.logit_lens(pair.reference, IDS))
    text = reslens.lens.logit_lens(pair.model, PROMPT, tokenizer=tokenizer, top_k=3)
    assert_same(text, reslens.lens.logit_lens(pair.reference, PROMPT, tokenizer=tokenizer, top_k=3))
    assert_untouched(pair.model, before)


def test_head_scores_and_circuits_equal_the_undispatched_model(pair):
    before = snapshot(pair.model)
    for fn in (
        lambda m: heads.induction_scores(m, seq_len=6, n=2),
        lambda m: heads.previous_token_scores(m, IDS),
        lambda m: heads.ov_circuit(m, 1, 3, fold_ln=True),
        lambda m: heads.qk_circuit(m, 1, 2, offset=2),
        lambda m: heads.ov_eigen_summary(m, fold_ln=True),
        lambda m: heads.composition_scores(m, "k", n_baseline=5),
    ):
        assert_same(fn(pair.model), fn(pair.reference))
    assert_untouched(pair.model, before)


@pytest.mark.parametrize("kind", ["resid", "mlp"])
def test_causal_trace_equals_the_undispatched_model(pair, tokenizer, kind):
    before = snapshot(pair.model)
    kwargs = dict(kind=kind, window=2, noise=tracing.Noise(samples=3))
    result = tracing.causal_trace(pair.model, tokenizer, PROMPT, SUBJECT, **kwargs)
    assert_same(result, tracing.causal_trace(pair.reference, tokenizer, PROMPT, SUBJECT, **kwargs))
    assert_untouched(pair.model, before)


# --- the rank-one edit reaches offloaded weights and restores them --------------------------------


def test_rank_one_edit_of_a_disk_layer_equals_the_undispatched_edit_and_restores(pair, tokenizer):
    model, reference = pair.model, pair.reference
    before, files = snapshot(model), digest(pair.folder)
    corpus = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    stats = rome.SecondMoment.compute(model, 1, corpus)  # key statistics through the offloaded block 1
    ref_stats = rome.SecondMoment.compute(reference, 1, corpus)
    assert torch.equal(stats.mom2, ref_stats.mom2) and stats.weights == ref_stats.weights
    kwargs = dict(second_moment=stats, context_templates=["It is said that {}"], steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the statistics are recognised as this model's
        edit = rome.rank_one_edit(model, tokenizer, PROMPT, SUBJECT, " London", 1, **kwargs)
    ref_edit = rome.rank_one_edit(reference, tokenizer, PROMPT, SUBJECT, " London", 1,
                                  **{**kwargs, "second_moment": ref_stats})
    assert torch.equal(edit.u, ref_edit.u) and torch.equal(edit.v, ref_edit.v)

    stored = adapter(model).mlp_out_store(1)
    loader = stored.source.hook.weights_map.dataset
    original = stored.values().clone()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        clean = model(ids).logits
        with edit, ref_edit:
            assert edit.weight.device.type == "meta" and len(loader.state_dict) == 1  # in memory, not on disk
            edited = model(ids).logits
            assert torch.equal(edited, reference(ids).logits) and not torch.equal(edited, clean)
        assert loader.state_dict == {} and torch.equal(stored.values(), original)
        assert torch.equal(model(ids).logits, clean) and torch.equal(reference(ids).logits, clean)
    assert digest(pair.folder) == files  # neither the checkpoint nor the offload folder was written
    assert_untouched(model, before)


def offload_to_memory(model, how, folder):
    """``model`` with block 1 offloaded to CPU memory, by ``cpu_offload`` or ``dispatch_model``.

    ``cpu_offload`` keeps every weight in one dict; ``dispatch_model`` keeps the embeddings and blocks
    0 and 1 in an ``OffloadedWeightsLoader``'s in-memory entries, block 2 on disk.
    """
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    # a torch.device main device (not the string "cpu") makes accelerate offload the "cpu" entries to CPU
    # memory, as it does under a GPU main device
    device_map = {**DEVICE_MAPS["gpt2"], "transformer.h.1": "cpu"}  # block 2 and the final norm on disk
    return accelerate.dispatch_model(model, device_map, main_device=torch.device("cpu"), offload_dir=folder)


@pytest.mark.parametrize("how", ["cpu_offload", "dispatch_model"])
def test_edits_of_a_layer_offloaded_to_cpu_memory_stack_and_restore_the_same_tensor(how, tmp_path):
    reference = make_family("gpt2")
    model = offload_to_memory(make_family("gpt2"), how, tmp_path)
    before = snapshot(model)
    assert "transformer.h.1.mlp.c_proj.weight" in before["meta"]
    stored = adapter(model).mlp_out_store(1)
    entries = stored.source.hook.weights_map.dataset
    entries = entries if how == "cpu_offload" else entries.state_dict
    original = entries["transformer.h.1.mlp.c_proj.weight"]
    ids = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(3))
    mom2 = rome.SecondMoment.compute(reference, 1, ids[None]).mom2
    a, b = (rome.rank_one_edit_ids(model, x, (5, 8), [t], 1, second_moment=mom2, steps=3)
            for x, t in ((ids, 3), (ids.flip(0), 9)))
    ref_a = rome.rank_one_edit_ids(reference, ids, (5, 8), [3], 1, second_moment=mom2, steps=3)
    assert_same(a.v, ref_a.v)
    a.apply()
    b.apply()
    with pytest.raises(RuntimeError, match="was applied to the same weight after it"):
        a.restore()
    b.restore()
    with ref_a:
        assert_same(reslens.capture(model, ids[None], sites="mlp_out"),
                    reslens.capture(reference, ids[None], sites="mlp_out"))
        assert entries["transformer.h.1.mlp.c_proj.weight"] is not original
    a.restore()
    assert entries["transformer.h.1.mlp.c_proj.weight"] is original  # the very tensor accelerate had
    assert_same(reslens.capture(model, ids[None]), reslens.capture(reference, ids[None]))
    assert_untouched(model, before)


# --- one hook loading a whole block (place_submodules) ------------------------------------------


def test_a_block_loaded_whole_by_one_hook_is_offloaded_again_after_an_early_stop(tmp_path, tokenizer):
    reference = make_family("gpt2", vocab_size=VOCAB)
    model = accelerate.dispatch_model(
        copy.deepcopy(reference), DEVICE_MAPS["gpt2"], main_device="cpu", offload_dir=tmp_path,
        preload_module_classes=["GPT2Block"],
    )
    hook = model.transformer.h[1]._hf_hook
    assert hook.offload and hook.place_submodules and not hasattr(model.transformer.h[1].mlp.c_fc, "_hf_hook")
    before = snapshot(model)
    assert "transformer.h.1.mlp.c_fc.weight" in before["meta"]
    res = reslens.capture(model, IDS, sites="mlp_act", layers=1)  # stops inside block 1's forward
    assert_same(res, reslens.capture(reference, IDS, sites="mlp_act", layers=1))
    assert_untouched(model, before)
    # causal tracing calls block 1's norm and attention projection directly
    kwargs = dict(noise=tracing.Noise(samples=2))
    result = tracing.causal_trace(model, tokenizer, PROMPT, SUBJECT, **kwargs)
    assert_same(result, tracing.causal_trace(reference, tokenizer, PROMPT, SUBJECT, **kwargs))
    assert_untouched(model, before)


# --- what cannot work says so ---------------------------------------------------------------------


def test_weights_no_hook_holds_are_refused_with_their_name():
    with accelerate.init_empty_weights():
        model = GPT2LMHeadModel(make_config()).eval()
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn\.weight is on the meta device and "
                                         r"no accelerate hook holds its values; load the model's weights"):
        heads.ov_circuit(model, 1, 0)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight is on the meta device"):
        reslens.capture(model, IDS % 97)
    assert hook_counts(model) == {}


def test_an_edit_of_a_weights_map_reslens_cannot_write_is_refused_and_changes_nothing():
    model = make_family("gpt2")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    hook = model.transformer.h[1].mlp.c_proj._hf_hook
    read_only = types.MappingProxyType(hook.weights_map.dataset)
    hook.weights_map = PrefixedDataset(read_only, hook.weights_map.prefix)
    ids = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(3))
    clean = reslens.capture(model, ids[None], sites="logits").logits
    edit = rome.rank_one_edit_ids(model, ids, (5, 8), [3], 1, second_moment=torch.eye(128), steps=1)
    with pytest.raises(ValueError, match=r"cannot edit transformer\.h\.1\.mlp\.c_proj\.weight: accelerate "
                                         r"keeps its values in a mappingproxy.*device_map that puts it on a"):
        edit.apply()
    assert not edit.applied
    assert torch.equal(reslens.capture(model, ids[None], sites="logits").logits, clean)
