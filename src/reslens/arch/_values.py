"""The small values an :class:`~reslens.arch.Arch` returns.

:class:`Layout` (where a family keeps its modules: data, not code), :class:`MLPWeights` (one MLP in
Geva's terms), :class:`ForwardInputs` (one body call's inputs), :class:`PatternHook` (where
``attn_pattern`` is recomputed) and :class:`PrefixCache` (a fixed prefix of keys and values for
the partial forwards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["MLPWeights", "ForwardInputs", "PatternHook", "PrefixCache"]


@dataclass(frozen=True, eq=False)
class MLPWeights:
    """One MLP in Geva's terms, every matrix ``[d_mlp, d_model]`` with row ``i`` = neuron ``i``.

    ``m = act(x̂ @ W_gate.T + b_gate) * (x̂ @ W_in.T + b_in)`` when gated, else
    ``m = act(x̂ @ W_in.T + b_in)``; ``mlp_out = m @ W_out + b_out``. Views of the stored
    weights (never copied, folded or centred); biases may be ``None``.
    """

    W_in: torch.Tensor  # [d_mlp, d_model]: GPT-2's keys (c_fc columns); Llama's up keys
    b_in: torch.Tensor | None  # [d_mlp]
    W_gate: torch.Tensor | None  # [d_mlp, d_model]: Llama's gate keys; None for GPT-2
    b_gate: torch.Tensor | None  # [d_mlp]
    W_out: torch.Tensor  # [d_mlp, d_model]: the values
    b_out: torch.Tensor | None  # [d_model]
    act: Callable[[torch.Tensor], torch.Tensor]
    #: MoE: the router's weight on each expert ``[..., n_expert]`` of ``x̂``; memory ``i`` belongs to
    #: expert ``i // (d_mlp / n_expert)`` and its coefficient includes that weight
    route: Callable[[torch.Tensor], torch.Tensor] | None = None
    n_expert: int = 1

    @property
    def gated(self) -> bool:
        return self.W_gate is not None

    def coefficients(self, x_normed: torch.Tensor, route: bool = True) -> torch.Tensor:
        """``m [..., d_mlp]`` of normed MLP inputs ``x̂ [..., d_model]``, in float32.

        For experts, times the router's weight on each memory's expert (``route=False``: without it).
        """
        m = self._keys(x_normed)
        if self.route is None or not route:
            return m
        weights = self.route(x_normed).float()  # [..., n_expert]
        return m * weights.repeat_interleave(m.shape[-1] // self.n_expert, dim=-1)

    def _keys(self, x_normed: torch.Tensor) -> torch.Tensor:
        x = x_normed.float()
        pre = x @ self.W_in.float().T
        if self.b_in is not None:
            pre = pre + self.b_in.float()
        if self.W_gate is None:
            return self.act(pre)
        gate = x @ self.W_gate.float().T
        if self.b_gate is not None:
            gate = gate + self.b_gate.float()
        return self.act(gate) * pre

    def forward(self, x_normed: torch.Tensor) -> torch.Tensor:
        """``mlp_out [..., d_model]`` of normed inputs, in float32, from these weights alone."""
        out = self.coefficients(x_normed) @ self.W_out.float()
        return out if self.b_out is None else out + self.b_out.float()


@dataclass(frozen=True)
class ForwardInputs:
    """The inputs of one call of the model body, read by keyword or position by the adapter."""

    input_ids: torch.Tensor | None  # [batch, pos]
    attention_mask: torch.Tensor | None  # [batch, pos] (2-D) or whatever the caller passed
    position_ids: torch.Tensor | None  # [batch, pos]
    cache: Any  # a KV cache object or None


@dataclass(frozen=True)
class PatternHook:
    """Where and how ``attn_pattern`` is recomputed for one layer.

    A hook of ``kind`` on ``module`` whose payload (the output for ``"post"``, ``(args, kwargs)`` for
    ``"pre"``) and the batch's key mask ``[batch, pos]`` (or ``None``) give ``[batch, head, query, key]``
    float32.
    """

    module: nn.Module
    kind: Literal["pre", "post"]
    pattern: Callable[[Any, torch.Tensor | None], torch.Tensor]


class PrefixCache:
    """The cache interface HF attention uses (``update``), with a fixed prefix.

    It prepends prefix keys/values ``[batch, head, start, d_head]`` to the ones the block computes.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
