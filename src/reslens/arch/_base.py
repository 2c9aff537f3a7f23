"""The role-named interface every family adapter implements, and the small values it returns.

Analyses ask an :class:`Arch` for modules by role (blocks, final norm, the attention output
projection, the MLP output projection), norms as data (:class:`~reslens.arch.Norm`), weights in
one orientation (row-vector convention ``x @ W``, every MLP matrix ``[d_mlp, d_model]``) and the
partial forwards causal tracing needs. Only ``arch/`` names HuggingFace modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from reslens.arch._norm import Norm

__all__ = ["Arch", "MLPWeights", "ForwardInputs", "PatternHook"]


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

    @property
    def gated(self) -> bool:
        return self.W_gate is not None

    def coefficients(self, x_normed: torch.Tensor) -> torch.Tensor:
        """``m [..., d_mlp]`` of normed MLP inputs ``x̂ [..., d_model]``, in float32."""
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


class Arch:
    """A read-only, role-named view of one HuggingFace decoder-only LM.

    Subclasses set the class attributes and implement every method that raises
    ``NotImplementedError`` here. Weights come back as views of what HuggingFace stores.
    """

    family: str = ""
    positional: Literal["learned", "rotary"] = "learned"
    gated_mlp: bool = False
    prepend_bos: bool = False
    model: nn.Module

    # --- sizes -------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.mlp_weights(0).W_out.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    n_head: int
    n_kv_head: int
    d_head: int
    n_ctx: int

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_head // self.n_kv_head)

    # --- modules: hook points ----------------------------------------------------------------

    body: nn.Module
    blocks: nn.ModuleList
    final_norm_module: nn.Module

    @property
    def lm_head(self) -> nn.Module | None:
        raise NotImplementedError

    def attn(self, layer: int) -> nn.Module:  # attn_out = output[0]
        raise NotImplementedError

    def attn_norm(self, layer: int) -> nn.Module:  # its input is resid[layer]
        raise NotImplementedError

    def attn_out_proj(self, layer: int) -> nn.Module:  # attn_z = its input
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:  # mlp_out = output
        raise NotImplementedError

    def mlp_norm(self, layer: int) -> nn.Module:  # resid_mid = its input
        raise NotImplementedError

    def mlp_in_proj(self, layer: int) -> nn.Module:  # mlp_up = its output (GPT-2: c_fc, the only key)
        raise NotImplementedError

    def mlp_gate_proj(self, layer: int) -> nn.Module | None:  # mlp_gate = its output; None without a gate
        return None

    def mlp_out_proj(self, layer: int) -> nn.Module:  # mlp_act = its input
        raise NotImplementedError

    def pattern_hook(self, layer: int) -> PatternHook:
        raise NotImplementedError

    def forward_inputs(self, args: tuple, kwargs: dict) -> ForwardInputs:
        raise NotImplementedError

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

    # --- norms, embedding, unembedding -------------------------------------------------------

    def norm(self, which: Literal["attn", "mlp", "final"], layer: int | None = None) -> Norm:
        raise NotImplementedError

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]
        raise NotImplementedError

    @property
    def W_pos(self) -> torch.Tensor | None:  # [n_ctx, d_model]; None under rotary
        return None

    @property
    def W_U(self) -> torch.Tensor:  # [d_vocab, d_model]
        raise NotImplementedError

    @property
    def b_U(self) -> torch.Tensor | None:  # [d_vocab]
        head = self.lm_head
        return None if head is None else getattr(head, "bias", None)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` of final-norm outputs ``[..., d_model]``, as the LM head does."""
        return torch.nn.functional.linear(x, self.W_U, self.b_U)

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output ``[batch, pos, d_model]`` of unpadded ids (no cache, no LM head)."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def embedding_components(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """The pieces of ``resid[0]`` outside any block, ``[(kind, [..., d_model] float32)]``."""
        raise NotImplementedError

    # --- MLP and attention weights -----------------------------------------------------------

    def mlp_weights(self, layer: int) -> MLPWeights:
        raise NotImplementedError

    def W_Q(self, layer: int) -> torch.Tensor:  # [n_head, d_model, d_head]
        raise NotImplementedError

    def W_K(self, layer: int) -> torch.Tensor:  # [n_head, d_model, d_head]
        raise NotImplementedError

    def W_V(self, layer: int) -> torch.Tensor:  # [n_head, d_model, d_head]
        raise NotImplementedError

    def W_O(self, layer: int) -> torch.Tensor:  # [n_head, d_head, d_model]
        raise NotImplementedError

    def b_Q(self, layer: int) -> torch.Tensor | None:  # [n_head, d_head]
        return None

    def b_K(self, layer: int) -> torch.Tensor | None:
        return None

    def b_V(self, layer: int) -> torch.Tensor | None:
        return None

    def b_O(self, layer: int) -> torch.Tensor | None:  # [d_model], added once per layer
        return None

    def attn_scale(self, layer: int) -> float:
        raise NotImplementedError

    def rotation(self, layer: int, offset: int) -> torch.Tensor:
        """``R [d_head, d_head]`` with score ``= q · R · k`` for a key ``offset`` positions back.

        The identity for learned positions, where the offset changes nothing).
        """
        return torch.eye(self.d_head)

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``attn_z [..., n_head * d_head]`` -> ``[..., n_head, d_head]``."""
        return z.reshape(*z.shape[:-1], self.n_head, self.d_head)

    # --- partial forwards (causal tracing) ---------------------------------------------------

    def attention_kv(
        self, layer: int, hidden: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def run_block_suffix(
        self, layer: int, hidden: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- weight edits and the keys of cached statistics --------------------------------------

    def mlp_out_param(self, layer: int) -> nn.Parameter:
        raise NotImplementedError

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The delta of :meth:`mlp_out_param` in its stored orientation.

        From ``u [d_mlp]`` (the key side) and ``v [d_model]`` (the value side).
        """
        raise NotImplementedError

    def key_parameters(self, layer: int) -> list[torch.Tensor]:
        """Every weight that shapes ``mlp_act`` at ``layer`` (not the MLP output projection)."""
        raise NotImplementedError

    def start_token(self, tokenizer: Any) -> int | None:
        """The id a document starts after (GPT-2: end-of-text; Llama: BOS), or ``None``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}: {self.n_layer} layers, "
            f"d_model {self.d_model}, "
            f"{self.n_head} heads, d_vocab {self.d_vocab})"
        )
