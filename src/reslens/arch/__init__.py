"""The only code that names HuggingFace modules: one role-named adapter per model family."""

from __future__ import annotations

from typing import Any

from reslens.arch._base import Arch
from reslens.arch._layout import Layout
from reslens.arch._norm import Norm
from reslens.arch._values import ForwardInputs, MLPWeights, PatternHook
from reslens.arch.decoder import Decoder
from reslens.arch.families import FAMILY_ADAPTERS
from reslens.arch.gpt2 import GPT2
from reslens.arch.llama import Llama

__all__ = [
    "Arch",
    "ForwardInputs",
    "Layout",
    "MLPWeights",
    "Norm",
    "PatternHook",
    "Decoder",
    "GPT2",
    "Llama",
    "adapter",
    "FAMILIES",
]

#: ``config.model_type`` -> adapter class.
FAMILIES: dict[str, type[Arch]] = {"gpt2": GPT2, "llama": Llama, "mistral": Llama, "qwen2": Llama,
                                   **FAMILY_ADAPTERS}


#: what to do instead, for families reslens knows it does not read
_HINTS = {
    "gemma3": "; pass its text model (model.model.language_model, a Gemma3TextModel) or load the checkpoint "
    "with Gemma3ForCausalLM",
}


def adapter(model: Any) -> Arch:
    """The adapter of ``model`` (an :class:`Arch` is passed through unchanged).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> arch = adapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)))
    >>> arch.family, adapter(arch) is arch
    ('gpt2', True)
    """
    if isinstance(model, Arch):
        return model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        hint = _HINTS.get(model_type, "") if isinstance(model_type, str) else ""
        raise TypeError(
            f"model must be a HuggingFace model of a supported family ({', '.join(sorted(FAMILIES))}); got "
            f"{type(model).__name__}" + (f" with config.model_type={model_type!r}" if model_type else "")
            + hint
        )
    return cls(model)
