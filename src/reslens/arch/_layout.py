"""Where a family keeps its modules, as data: :class:`Layout`, and the modules by role it gives.

:class:`Modules` reads every hook point an analysis asks for (blocks, norms, projections, the LM
head) from the adapter's :class:`Layout` of attribute paths, and one call's inputs from the body's
positional arguments; :class:`~reslens.arch.Arch` builds on it. A family whose modules differ from
another's only in name is a new :class:`Layout`, not new code.
"""

from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reslens.arch._values import ForwardInputs

__all__ = ["Layout", "Modules"]


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its modules, and its body's positional arguments: data, not code.

    Attribute paths (``"attn.c_proj"``): ``body`` under the model (the model itself is the body when it
    has no such attribute), ``blocks``, ``embed``, ``pos_embed`` and ``final_norm`` under the body, the
    roles of one block under that block, ``lm_head`` under the model. :class:`~reslens.arch.Arch` reads
    its modules by role from these, so a family whose modules differ only in name needs no code for
    them. The rest of what makes a family is data here too: the block (``parallel``; pre-norms that may
    be absent; ``attn_out_norm`` / ``mlp_out_norm`` on the sublayers' outputs), the norm's style,
    separate or fused (``qkv_proj``, ``qkv_per_head``) projections, QK-norm, gated, fused
    (``mlp_gate_up_proj``) or routed (``experts``, ``router``) MLPs, the block's cache keyword.
    Rotary positions, embedding scales and soft-caps are read from the model itself
    (:mod:`reslens.arch.decoder`).
    """

    body: str
    blocks: str
    embed: str
    final_norm: str
    attn: str  # attn_out = output[0]
    attn_norm: str | None  # its input is resid[layer]; None: the attention reads the residual (OLMo 2)
    attn_key_proj: str  # its output holds the keys (GPT-2: the fused q/k/v projection)
    attn_out_proj: str  # attn_z = its input
    mlp: str  # mlp_out = its output
    mlp_norm: str | None  # resid_mid = its input (sequential blocks); None: the MLP reads the residual
    mlp_in_proj: str  # mlp_up = its output (the up keys; GPT-2's only keys)
    mlp_out_proj: str  # mlp_act = its input (the values)
    body_args: tuple[str, ...] = ()  # the body forward's leading positional parameters (): read its signature
    mlp_gate_proj: str | None = None  # mlp_gate = its output; None without a gate
    pos_embed: str | None = None  # learned position embeddings; None when positions are not added
    lm_head: str = "lm_head"
    attn_out_norm: str | None = None  # a norm on the attention output before it is added (Gemma 2/3)
    mlp_out_norm: str | None = None  # a norm on the MLP's output before it is added
    parallel: bool = False  # both sublayers read the block's input (GPT-NeoX, GPT-J); else sequential
    cache_arg: str = "cache"  # the block forward's keyword for its KV cache
    # "layernorm"; "rms" (cast, then γ: Llama); "rms_upcast" (γ in float32: OLMo 2); "rms_gemma" (1 + w)
    norm_style: str = "rms"
    q_proj: str | None = None  # separate q/k/v projections (under the block) ...
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None  # ... or one fused projection: [q; k; v] (Phi-3) or per head (qkv_per_head)
    qkv_per_head: bool = False  # GPT-NeoX: the fused output is [q_h k_h v_h] for each head h in turn
    q_norm: str | None = None  # QK-norm modules, per head (Qwen3, Gemma 3) or over the projection (OLMo 2)
    k_norm: str | None = None
    qk_norm_per_head: bool = True
    mlp_gate_up_proj: str | None = None  # a fused [gate; up] projection (Phi-3)
    experts: str | None = None  # routed experts with 3-D gate_up_proj / down_proj (Mixtral, OLMoE, Qwen3-MoE)
    router: str | None = None  # their router: returns (logits, top-k weights, top-k indices)
    mlp_act_fn: str = "act_fn"  # the MLP's (or the experts') activation attribute


@functools.lru_cache(maxsize=None)
def _parameters(body_type: type) -> tuple[str, ...]:
    """The body forward's parameters in order, a cache under either of its names called ``"cache"``."""
    names = list(inspect.signature(body_type.forward).parameters)[1:]
    return tuple("cache" if name in ("past_key_values", "cache") else name for name in names)


class Modules:
    """The modules of one model by role, from its family's :attr:`layout` (the hook points)."""

    model: nn.Module
    layout: Layout

    def _in_block(self, layer: int, path: str) -> nn.Module:
        return operator.attrgetter(path)(self.blocks[layer])

    @property
    def body(self) -> nn.Module:
        """The decoder body (the model itself when it has no LM head)."""
        return getattr(self.model, self.layout.body, self.model)

    @property
    def lm_head(self) -> nn.Module | None:
        """The LM head (tied to the embedding or not), or ``None`` for a bare body."""
        return getattr(self.model, self.layout.lm_head, None)

    @property
    def blocks(self) -> nn.ModuleList:
        return operator.attrgetter(self.layout.blocks)(self.body)

    @property
    def final_norm_module(self) -> nn.Module:
        return operator.attrgetter(self.layout.final_norm)(self.body)

    @property
    def embed_module(self) -> nn.Module:
        """The token embedding (an ``nn.Embedding``)."""
        return operator.attrgetter(self.layout.embed)(self.body)

    @property
    def pos_embed_module(self) -> nn.Module | None:
        """The learned position embedding, or ``None`` where positions are not added to ``resid[0]``."""
        path = self.layout.pos_embed
        return None if path is None else operator.attrgetter(path)(self.body)

    def attn(self, layer: int) -> nn.Module:
        """The attention module: ``attn_out`` is its ``output[0]``."""
        return self._in_block(layer, self.layout.attn)

    def attn_norm(self, layer: int) -> nn.Module | None:
        """The norm before attention (its input is ``resid[layer]``), or ``None`` where there is none."""
        path = self.layout.attn_norm
        return None if path is None else self._in_block(layer, path)

    def attn_key_proj(self, layer: int) -> nn.Module:
        """The projection whose output holds the keys (GPT-2's fused q/k/v projection)."""
        return self._in_block(layer, self.layout.attn_key_proj)

    def attn_out_proj(self, layer: int) -> nn.Module:
        """The attention output projection: ``attn_z`` is its input."""
        return self._in_block(layer, self.layout.attn_out_proj)

    def mlp(self, layer: int) -> nn.Module:
        """The MLP: ``mlp_out`` is its output."""
        return self._in_block(layer, self.layout.mlp)

    def mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm before the MLP, or ``None`` where there is none."""
        path = self.layout.mlp_norm
        return None if path is None else self._in_block(layer, path)

    def mlp_in_proj(self, layer: int) -> nn.Module:
        """The MLP's (up) key projection: ``mlp_up`` is its output (GPT-2's only keys)."""
        return self._in_block(layer, self.layout.mlp_in_proj)

    def mlp_gate_proj(self, layer: int) -> nn.Module | None:
        """The MLP's gate projection (``mlp_gate`` is its output), or ``None`` without a gate."""
        path = self.layout.mlp_gate_proj
        return None if path is None else self._in_block(layer, path)

    def attn_out_norm(self, layer: int) -> nn.Module | None:
        """The norm the attention's output passes before it joins the residual, or ``None``."""
        path = self.layout.attn_out_norm
        return None if path is None else self._in_block(layer, path)

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        """The norm the MLP's output passes before it joins the residual, or ``None``."""
        path = self.layout.mlp_out_norm
        return None if path is None else self._in_block(layer, path)

    def mlp_out_proj(self, layer: int) -> nn.Module:
        """The MLP's value projection: ``mlp_act`` is its input."""
        return self._in_block(layer, self.layout.mlp_out_proj)

    def forward_inputs(self, args: tuple, kwargs: dict) -> ForwardInputs:
        """The inputs of one call of the body, by keyword or by the positions ``layout.body_args`` gives."""
        order = self.layout.body_args or _parameters(type(self.body))

        def arg(name: str) -> Any:
            index = order.index(name)
            return kwargs.get(name, args[index] if len(args) > index else None)

        cache = arg("cache") if "past_key_values" not in kwargs else kwargs["past_key_values"]
        return ForwardInputs(arg("input_ids"), arg("attention_mask"), arg("position_ids"), cache)

    @staticmethod
    def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``hidden_states`` input of a block, norm or projection call (by position or keyword)."""
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the same call with ``hidden_states`` replaced."""
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
