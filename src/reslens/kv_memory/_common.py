"""Neuron indices, checked once for every key-value memory module, and a memory's label."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from reslens._checks import check_int

__all__ = ["check_neurons", "d_expert_of", "memory_label"]


def check_neurons(neurons: Any, d_mlp: int, name: str = "neurons") -> torch.Tensor:
    """Neuron indices ``[N]`` (long) in ``0..d_mlp - 1``.

    From an int, a sequence of ints, an integer tensor, or ``None`` (every neuron). Floats and
    bools are refused, also inside a sequence.
    """
    if neurons is None:
        return torch.arange(d_mlp)
    if isinstance(neurons, torch.Tensor):
        if neurons.dtype.is_floating_point or neurons.dtype.is_complex or neurons.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer neuron indices; got a tensor of dtype {neurons.dtype}")
        if neurons.ndim > 1:
            raise ValueError(f"{name} must be 0-D or 1-D; got shape {tuple(neurons.shape)}")
        items: list[Any] = [int(i) for i in neurons.reshape(-1).tolist()]
    elif isinstance(neurons, (str, bytes)) or not isinstance(neurons, (int, Iterable)):
        raise TypeError(
            f"{name} must be an int, a sequence of ints or None; got {neurons!r} ({type(neurons).__name__})"
        )
    elif isinstance(neurons, Iterable):
        items = list(neurons)
    else:
        items = [neurons]
    if not items:
        raise ValueError(f"{name} is empty; pass None for every neuron")
    for i, item in enumerate(items):
        label = name if len(items) == 1 and not isinstance(neurons, Iterable) else f"{name}[{i}]"
        check_int(item, label, low=0, high=d_mlp - 1)
    return torch.tensor(items, dtype=torch.long)



def memory_label(layer: int, neuron: int, d_expert: int = 0) -> str:
    """``"L2N5"``; in a mixture of experts (``d_expert`` memories per expert) ``"L2 E1 N5"``.

    A routed memory ``i`` of ``mlp_act`` is neuron ``i % d_expert`` of expert ``i // d_expert``;
    ``d_expert=0`` means a dense MLP.
    """
    if not d_expert:
        return f"L{layer}N{neuron}"
    return f"L{layer} E{neuron // d_expert} N{neuron % d_expert}"


def d_expert_of(arch: Any, layer: int) -> int:
    """Memories per expert of block ``layer`` in a mixture of experts; 0 for a dense MLP."""
    n_expert = arch.mlp_weights(layer).n_expert
    return arch.d_mlp // n_expert if n_expert > 1 else 0
