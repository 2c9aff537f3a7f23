"""Helpers shared by the tests: tiny seeded random GPT-2 models and state checks."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 97
N_POSITIONS = 40


def make_config(**overrides) -> GPT2Config:
    kwargs = dict(
        n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=N_POSITIONS, bos_token_id=0, eos_token_id=0
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def make_model(seed: int = 0, cls=GPT2LMHeadModel, **overrides):
    torch.manual_seed(seed)
    return cls(make_config(**overrides)).eval()


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
