"""reslens.lens.patchscopes: the batched patchscope against per-cell plain HuggingFace forwards, every family.

The reference never uses reslens's hooks: the target prompt runs through the model's own forward with a
raw torch forward pre-hook on the decoder block (or the final norm) that overwrites the patched
position's hidden state; source vectors come from ``output_hidden_states``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, count_calls, make_family

import reslens
from reslens.lens import PROMPTS, Patchscope, PatchscopeResult, logit_lens, patchscope
from reslens.lens import _scope_forward

SOURCE = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4], [6, 2, 9, 9, 1, 3, 5, 7]])
TARGET = torch.tensor([3, 7, 11, 5, 9, 4])
CLOSE = dict(atol=2e-4, rtol=2e-4)


def _blocks_and_norm(model):
    """The decoder blocks and the final norm, found by the model's own attribute names."""
    base = model.base_model
    blocks = next(getattr(base, n) for n in ("layers", "h") if hasattr(base, n))
    norm = next(getattr(base, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(base, n))
    return blocks, norm


def _replace_at(position: int, h: torch.Tensor):
    """A forward pre-hook (with kwargs) writing ``h [N, d]`` into the hidden states at ``position``."""
    def hook(module, args, kwargs):
        if args:
            x = args[0].clone()
            x[:, position] = h.to(x.dtype)
            return (x, *args[1:]), kwargs
        x = kwargs["hidden_states"].clone()
        x[:, position] = h.to(x.dtype)
        return args, {**kwargs, "hidden_states": x}
    return hook


def reference(model, target: torch.Tensor, position: int, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, d_vocab]`` at the target's last token, each row of ``h [N, d]`` written into the hidden
    state entering block ``layer`` (the final norm for ``layer == n_layer``) at ``position``: one plain
    forward of the target prompt per row (the rows of a batch are independent: no padding)."""
    blocks, norm = _blocks_and_norm(model)
    module = blocks[layer] if layer < len(blocks) else norm
    handle = module.register_forward_pre_hook(_replace_at(position, h), with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=target[None].expand(h.shape[0], -1)).logits[:, -1].float()
    finally:
        handle.remove()


def source_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """``resid`` layers ``0..n_layer`` of ``ids`` from HF: hidden states, and the final norm's input."""
    _, norm = _blocks_and_norm(model)
    seen = {}
    handle = norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return [*hidden[:-1], seen["x"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cell_equals_a_plain_forward_with_a_hook(family):
    model = make_family(family)
    arch = reslens.adapter(model)
    n_layer, pos = arch.n_layer, 5
    states = source_states(model, SOURCE[:1])
    cells = [(0, 0), (1, 1), (2, 2), (0, 2), (2, 0), (1, n_layer), (n_layer, 1), (n_layer, n_layer)]
    for position in (TARGET.shape[0] - 1, 2):  # read where patched (token identity), and patched earlier
        out = patchscope(model, SOURCE[0], pos, target=TARGET, target_position=position, top_k=4,
                         layers=sorted({s for s, _ in cells}), target_layers=list(range(n_layer + 1)))
        scope = Patchscope(model, TARGET, position=position)
        h = torch.stack([states[s][0, pos] for s, _ in cells])
        ours = arch.logits(scope._forward([t for _, t in cells], h)).float()
        for c, (s, t) in enumerate(cells):
            ref = reference(model, TARGET, position, t, states[s][0, pos][None])[0]
            torch.testing.assert_close(ours[c], ref, **CLOSE)
            top = ref.softmax(-1).topk(4)
            cell = out.cell(s, t)
            assert out.top_ids[cell].tolist() == top.indices.tolist(), (family, s, t)
            torch.testing.assert_close(out.top_probs[cell], top.values, **CLOSE)
    assert out.output_id == int(model(input_ids=SOURCE[:1]).logits[0, pos].argmax())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lens_rows_equal_the_reference_and_the_last_row_is_the_output(family):
    model = make_family(family)
    n_layer = reslens.adapter(model).n_layer
    states = source_states(model, SOURCE)
    shifted = {s: (s + 1) % (n_layer + 1) for s in range(n_layer)}  # cross-layer: into the next layer
    shifted_scope = Patchscope(model, TARGET, position=1, target_layer=shifted)
    for scope, position, into in ((Patchscope(model, TARGET), TARGET.shape[0] - 1, lambda s: s),
                                  (shifted_scope, 1, shifted.get)):
        result = logit_lens(model, SOURCE, lens=scope, top_k=3)
        assert result.lens_name == "patchscope (ids)"
        for s in range(n_layer):
            h = states[s].reshape(-1, states[s].shape[-1])  # [batch * pos, d]
            ref = reference(model, TARGET, position, into(s), h).softmax(-1).topk(3)
            row = result.row(s)
            assert result.top_ids[row].reshape(-1, 3).tolist() == ref.indices.tolist(), (family, s)
            torch.testing.assert_close(result.top_probs[row].reshape(-1, 3), ref.values, **CLOSE)
        logits = model(input_ids=SOURCE).logits.float()
        last = result.row(n_layer)
        assert torch.equal(result.top_ids[last], logits.topk(3, dim=-1).indices)
        assert float(result.kl_final_layer[last].abs().max()) == 0.0


def test_all_rows_run_in_one_staged_forward_and_batches_agree(monkeypatch):
    model = make_family("llama")
    arch = reslens.adapter(model)
    calls = count_calls(monkeypatch, [(_scope_forward.TargetRun, ("run",)),
                                      (type(arch), ("run_block_suffix",))])
    one = logit_lens(model, SOURCE, lens=Patchscope(model, TARGET), top_k=3)
    # one forward for every (layer, position) row: each block runs once, on the rows that reached it
    assert calls == {"run": 1, "run_block_suffix": arch.n_layer}
    chunked = logit_lens(model, SOURCE, lens=Patchscope(model, TARGET, batch_size=5), top_k=3)
    assert torch.equal(one.top_ids, chunked.top_ids)
    torch.testing.assert_close(one.top_probs, chunked.top_probs, **CLOSE)


def test_other_lenses_get_one_translate_call_per_row():
    model = make_family("gpt2")
    lens = reslens.lens.LogitLens()
    seen = []

    class Counting(type(lens)):
        def translate(self, layer, h):
            seen.append(layer)
            return h

    logit_lens(model, SOURCE, lens=Counting(), layers=[0, 2])
    assert seen == [3, 0, 2]  # the final layer first (the reference), then each row


def test_the_grid_cells_and_their_outputs(tmp_path):
    model = make_family("qwen2")
    n_layer = reslens.adapter(model).n_layer
    diagonal = patchscope(model, SOURCE[0], -1, target=TARGET, layers=[0, 2])
    assert diagonal.source_layer.tolist() == [0, 2] and diagonal.target_layer.tolist() == [0, 2]
    mapped = patchscope(model, SOURCE[0], 3, target=TARGET, target_layers={0: 3, 1: 0}, layers=[0, 1])
    assert mapped.target_layer.tolist() == [3, 0] and mapped.source_position == 3
    one = patchscope(model, SOURCE[0], 3, target=TARGET, target_layers=lambda s: 0, layers=[1, 2], top_k=2)
    assert one.target_layer.tolist() == [0, 0] and one.top_ids.shape == (2, 2)
    grid = patchscope(model, SOURCE[0], 3, target=TARGET, target_layers=[1, n_layer])
    assert len(grid.source_layer) == (n_layer + 1) * 2
    top = zip(grid.top_ids[1].tolist(), grid.top_probs[1].tolist())
    assert grid.top(0, n_layer) == [(str(i), p) for i, p in top]
    lines = grid.table().splitlines()
    assert lines[0].startswith("patchscope (ids): source token '3' at position 3") and len(lines) == 2 + 8
    frame = grid.to_frame()
    assert len(frame) == 8 * 5
    assert set(frame.columns) >= {"source_layer", "target_layer", "rank", "token", "prob"}
    assert "<table>" in grid._repr_html_()
    grid.save(tmp_path / "scope.safetensors")
    back = PatchscopeResult.load(tmp_path / "scope.safetensors")
    for name in ("source_layer", "target_layer", "top_ids", "top_probs", "source_ids", "target_ids"):
        assert torch.equal(getattr(back, name), getattr(grid, name)), name
    assert (back.source_position, back.target_position, back.output_id, back.lens_name) == (
        grid.source_position, grid.target_position, grid.output_id, grid.lens_name)
    with pytest.raises(ValueError, match="2 cells"):
        grid.cell(0)


class BosChars:
    """A toy tokenizer: one id per character, and a BOS (id 1) first, as Llama's and Gemma's put one."""

    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False, **_):
        def one(t):
            return ([1] if add_special_tokens else []) + [ord(c) % 90 + 5 for c in t]
        return {"input_ids": one(texts) if isinstance(texts, str) else [one(t) for t in texts]}

    def decode(self, ids):
        return "".join("?" if i == 1 else chr(i - 5 + 32) for i in ids)


def test_text_prompts_follow_the_tokenizer_and_named_prompts_patch_their_placeholder():
    model = make_family("gemma3", max_position_embeddings=64)  # room for the identity prompt
    scope = Patchscope(model, "ab?cd", tokenizer=BosChars(), position="?")
    assert scope.target_ids.tolist() == [1, *(ord(c) % 90 + 5 for c in "ab?cd")] and scope.position == 3
    assert Patchscope(model, "ab?cd", tokenizer=BosChars()).position == 5  # the last token by default
    named = Patchscope(model, tokenizer=BosChars())
    text, placeholder = PROMPTS["token_identity"]
    assert text == "cat -> cat\n1135 -> 1135\nhello -> hello\n?" and placeholder == "?"
    assert named.position == len(text) and named.target_ids.shape[0] == len(text) + 1  # "?" after the BOS
    assert named.name == "patchscope (token_identity)"
    city = Patchscope(model, "city", tokenizer=BosChars())
    assert city.position == 1 + PROMPTS["city"][0].rfind("x")
    found = patchscope(model, "the cat sat", "cat", target="ab?", tokenizer=BosChars(), layers=[1])
    assert found.source_position == 1 + len("the cat") - 1 and found.source_ids[0] == 1


def test_the_embedded_model_reads_the_token_identity_prompt():
    model, tokenizer = reslens.load_model()
    scope = Patchscope(model, tokenizer=tokenizer)
    assert tokenizer.decode(scope.target_ids) == PROMPTS["token_identity"][0]
    assert tokenizer.decode(scope.target_ids[scope.position]) == "?"
    result = logit_lens(model, "The cat sat on the mat", tokenizer=tokenizer, lens=scope)
    assert result.table().startswith("patchscope (token_identity): top-1 token per layer")


def test_bad_input_is_refused_naming_the_parameter():
    model = make_family("llama")
    for kwargs, error, match in (
        (dict(position=6), ValueError, "position=6 is out of range"),
        (dict(position="zz"), TypeError, "given as ids"),
        (dict(target_layer=4), ValueError, "target_layer=4 is out of range"),
        (dict(target_layer="next"), TypeError, "target_layer must be 'same'"),
        (dict(target_layer={0: 9}), ValueError, r"target_layer\[0\]=9"),
        (dict(batch_size=0), ValueError, "batch_size=0"),
    ):
        with pytest.raises(error, match=match):
            Patchscope(model, TARGET, **kwargs)
    with pytest.raises(TypeError, match="target is text, so tokenizer= is required"):
        Patchscope(model, "hello ?")
    with pytest.raises(ValueError, match="'!' does not occur in the prompt"):
        Patchscope(model, "hello ?", tokenizer=BosChars(), position="!")
    with pytest.raises(ValueError, match="target: .*outside the vocabulary"):
        Patchscope(model, [3, 500])
    with pytest.raises(ValueError, match="target_layer has no entry for source layer 1"):
        logit_lens(model, SOURCE, lens=Patchscope(model, TARGET, target_layer={0: 1}))
    with pytest.raises(ValueError, match="translates resid layers only"):
        logit_lens(model, SOURCE, lens=Patchscope(model, TARGET), sites=("resid", "resid_mid"))
    with pytest.raises(ValueError, match="target_layers contains 7"):
        patchscope(model, SOURCE[0], target=TARGET, target_layers=[7])
    with pytest.raises(ValueError, match="position=8 is out of range"):
        patchscope(model, SOURCE[0], 8, target=TARGET)
    with pytest.raises(ValueError, match="top_k=0"):
        patchscope(model, SOURCE[0], target=TARGET, top_k=0)


def test_a_patchscope_made_for_one_model_refuses_another():
    made_for, other = make_family("llama"), make_family("llama", seed=1)  # the same shape, other weights
    scope = Patchscope(made_for, TARGET)
    with pytest.raises(ValueError, match="a patchscope reads residuals of the model it runs"):
        logit_lens(other, SOURCE, lens=scope)
    with pytest.raises(ValueError, match="a patchscope reads residuals of the model it runs"):
        reslens.lens.lens_stats(other, [SOURCE], lens=scope, progress=False)
    logit_lens(made_for, SOURCE, lens=scope)  # its own model is fine
    assert scope.fingerprint == Patchscope(made_for, TARGET).fingerprint
    assert scope.fingerprint != Patchscope(made_for, TARGET, position=2).fingerprint
    assert scope.fingerprint != Patchscope(other, TARGET).fingerprint
