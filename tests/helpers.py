"""Helpers shared by the tests: tiny seeded random GPT-2 models, state checks, the project's corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 97
N_POSITIONS = 40


def make_config(**overrides) -> GPT2Config:
    kwargs = dict(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def make_model(seed: int = 0, cls=GPT2LMHeadModel, **overrides):
    torch.manual_seed(seed)
    return cls(make_config(**overrides)).eval()


#: every family reslens reads, one tiny random config each (see make_family)
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "gpt_neox",
            "gpt_neox_seq", "phi3", "mixtral", "olmoe", "qwen3_moe")


def _family_classes(family: str):
    """(config class, causal LM class, body class, config overrides) of a rotary family."""
    import transformers as tf

    experts = dict(num_experts=4, num_experts_per_tok=2)
    specific = {
        "llama": ("Llama", dict(tie_word_embeddings=False)),
        "mistral": ("Mistral", dict(sliding_window=4, tie_word_embeddings=False)),
        "qwen2": ("Qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
        "qwen3": ("Qwen3", dict(head_dim=8, tie_word_embeddings=False)),
        "gemma": ("Gemma", dict(head_dim=8, hidden_activation="gelu_pytorch_tanh")),
        "gemma2": ("Gemma2", dict(head_dim=8, query_pre_attn_scalar=6, sliding_window=4,
                                  attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
        "gemma3": ("Gemma3Text", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0}},
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
        "olmo2": ("Olmo2", dict(tie_word_embeddings=False)),
        "gpt_neox": ("GPTNeoX", dict(rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False,
                                    layer_norm_eps=1e-5, attention_bias=True)),
        "gpt_neox_seq": ("GPTNeoX", dict(rotary_pct=0.25, use_parallel_residual=False,
                                        tie_word_embeddings=False, layer_norm_eps=1e-5)),
        "phi3": ("Phi3", dict(partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0)),
        "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
        "olmoe": ("Olmoe", dict(**experts, tie_word_embeddings=False)),
        "qwen3_moe": ("Qwen3Moe", dict(**experts, head_dim=8, moe_intermediate_size=16, decoder_sparse_step=1,
                                      mlp_only_layers=[], norm_topk_prob=True)),
    }
    name, extra = specific[family]
    model_name = name.removesuffix("Text")
    return (getattr(tf, f"{name}Config"), getattr(tf, f"{model_name}ForCausalLM"),
            getattr(tf, f"{name}Model"), extra)


def make_family(family: str, seed: int = 0, bare: bool = False, **overrides):
    """A tiny seeded random model of ``family`` (:data:`FAMILIES`): GPT-2; Llama with grouped-query attention
    and an untied head; Mistral with a small sliding window; Qwen2 with q/k/v biases and a tied head; Qwen3
    (QK-norm); Gemma 1/2/3 (sandwich norms, soft-caps, local/global rotary); OLMo 2; GPT-NeoX parallel and
    sequential (partial rotary); Phi-3 (fused projections, partial rotary); Mixtral, OLMoE, Qwen3-MoE."""
    family = {"gemma3_text": "gemma3"}.get(family, family)  # a config's model_type works too
    if family == "gpt2":
        from transformers import GPT2Model

        return make_model(seed, cls=GPT2Model if bare else GPT2LMHeadModel, **overrides)
    common = dict(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=N_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    config_cls, lm_cls, body_cls, extra = _family_classes(family)
    kwargs = {**common, **extra, **overrides}
    if family == "gemma3":
        lm_cls = __import__("transformers").Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = (body_cls if bare else lm_cls)(config_cls(**kwargs)).eval()
    with (
        torch.no_grad()
    ):  # random norm weights and biases, so RMSNorm's gamma and Qwen2's q/k/v biases matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0, 0.1)
    return model


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Number of hooks of each kind on every submodule, for cleanup checks."""
    counts = {}
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"):
            n = len(getattr(module, kind, {}))
            if n:
                counts[f"{name}.{kind}"] = n
    return counts


def model_state(model: torch.nn.Module) -> dict:
    """Weights, training flags and requires_grad, copied, to check nothing changed."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["weights"].keys() == after["weights"].keys()
    for key, value in before["weights"].items():
        assert torch.equal(value, after["weights"][key]), key


#: where the project's corpus lives beside a checkout (``../shared/corpus``); ``$RESLENS_CORPUS`` overrides it
SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def shared_corpus() -> Path:
    """The project's corpus folder, or a skip saying where it was looked for (a plain clone has none).

    The one way a test reads ``../shared``: ``$RESLENS_CORPUS`` if set, else ``../shared/corpus`` beside
    the repository.
    """
    path = Path(os.environ.get("RESLENS_CORPUS") or SHARED_CORPUS)
    if not path.is_dir():
        pytest.skip(f"no corpus at {path} (a plain clone has no ../shared/corpus; set RESLENS_CORPUS to a "
                    "folder of the project's books)")
    return path


def fake_convert(gguf_path, out, source):
    """Stands in for the hub's GGUF conversion in download tests: the GGUF's bytes as the "weights"."""
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(gguf_path.read_bytes())
    (out / "reslens-source.txt").write_text(source)


def count_calls(monkeypatch, targets, *, qualified: bool = False) -> dict[str, int]:
    """Count the calls of functions ``[(module, names)]`` through each module's own reference to them.

    Keys: the function's name, or ``"module.name"`` (the module's last dotted part) with ``qualified``;
    names a module does not have are skipped.
    """
    calls: dict[str, int] = {}

    def counted(key, check):
        def wrapper(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return check(*args, **kwargs)
        return wrapper

    for module, names in targets:
        for name in names:
            if hasattr(module, name):
                key = f"{module.__name__.rsplit('.', 1)[-1]}.{name}" if qualified else name
                monkeypatch.setattr(module, name, counted(key, getattr(module, name)))
    return calls
