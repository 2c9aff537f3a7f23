"""Fixtures: tiny seeded random GPT-2 models for fast CPU tests."""

import pytest
import torch
from transformers import GPT2LMHeadModel, GPT2Model

from helpers import FAMILIES, VOCAB, make_family, make_model


@pytest.fixture
def model() -> GPT2LMHeadModel:
    return make_model()


@pytest.fixture
def base_model() -> GPT2Model:
    return make_model(cls=GPT2Model)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """A tiny random model of every supported family (GPT-2, Llama/GQA, Mistral/window, Qwen2/biases)."""
    return make_family(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (the real model), or a skip with the reason (a failure in CI)."""
    from real_model import smollm2 as load

    return load()


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M (the second real model), or a skip with the reason (a failure in CI)."""
    from real_model import gemma3 as load

    return load()
