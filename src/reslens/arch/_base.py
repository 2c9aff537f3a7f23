"""The role-named interface every family adapter implements, and the small values it returns.

Analyses ask an :class:`Arch` for modules by role (blocks, final norm, the attention output
projection, the MLP output projection), norms as data (:class:`~reslens.arch.Norm`), weights in
one orientation (row-vector convention ``x @ W``, every MLP matrix ``[d_mlp, d_model]``) and the
partial forwards causal tracing needs. Only ``arch/`` names HuggingFace modules.

Models dispatched by accelerate (``device_map=``, with layers on several devices, in CPU memory or
on disk) are read the same way: :attr:`Arch.device` is where analyses run (where the embedding
runs); weights come back there with their values (offloaded ones read from accelerate's weights
map, :mod:`reslens.arch._offload`) and the partial forwards return their results there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from reslens.arch import _offload
from reslens.arch._norm import Norm
from reslens.arch._offload import StoredParam

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
    #: patterns (``re.search``) of checkpoint keys that older saves of the family hold and that carry
    #: no weight (buffers since dropped); any other key the model does not use makes loading refuse
    legacy_checkpoint_keys: tuple[str, ...] = ()
    model: nn.Module

    @property
    def checkpoint_name(self) -> str:
        """The checkpoint's name or path as the model's config records it (``""`` when unknown)."""
        config = getattr(self.model, "config", None)
        return str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")

    # --- sizes -------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embed_module.weight.shape[1]

    @property
    def d_vocab(self) -> int:
        head = self.lm_head
        return (head if head is not None else self.embed_module).weight.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.mlp_weights(0).W_out.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_module.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where analyses run: the token embedding's device (accelerate's execution device for it)."""
        return _offload.execution_device(self.model, self.embed_module, "weight")

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
    embed_module: nn.Module  # the token embedding (an nn.Embedding)

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
        return None if head is None or not hasattr(head, "bias") else self._real(head, "bias")

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` (on :attr:`device`) of final-norm outputs ``[..., d_model]``."""
        w_u = self.W_U
        return torch.nn.functional.linear(x.to(w_u.device), w_u, self.b_U)

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output ``[batch, pos, d_model]`` (on :attr:`device`) of unpadded ids, no cache."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state.to(self.device)

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

    def mlp_out_store(self, layer: int) -> StoredParam:
        """:meth:`mlp_out_param` as a weight edit reads and writes it, offloaded by accelerate or not.

        On a layer accelerate offloads (CPU memory or disk), the parameter is a meta placeholder and
        the values live in accelerate's weights map; :class:`~reslens.arch._offload.StoredParam` writes
        an edit there, in memory (never into a file), and puts the original entry back.
        """
        return StoredParam(self.model, self.mlp_out_proj(layer), "weight")

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

    # --- reading weights of a dispatched model -----------------------------------------------

    def _real(self, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        """``module``'s tensor ``name`` with its values, on :attr:`device` (``None`` if it has none).

        The module's own tensor (what HuggingFace stores, so views stay views) unless accelerate
        dispatched the model: an offloaded tensor is read from accelerate's weights map, one on
        another device is copied to :attr:`device`.
        """
        t = _offload.real(self.model, module, name)
        if t is None:
            return None
        device = self.device
        return t if t.device == device else t.to(device)

    def _real_parameters(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every parameter under ``module`` (``named_parameters``), with values."""
        out = []
        for prefix, sub in module.named_modules():
            for name, _ in sub.named_parameters(recurse=False):
                out.append((f"{prefix}.{name}" if prefix else name, self._real(sub, name)))
        return out

    def _device_of(self, module: nn.Module, name: str = "weight") -> torch.device:
        """The device ``module`` computes on (its execution device when accelerate offloads it)."""
        return _offload.execution_device(self.model, module, name)

    def loaded(self, module: nn.Module) -> Any:
        """A context in which ``module``'s submodules can be called directly on a dispatched model.

        Needed only where accelerate loads a whole module's weights for its own forward
        (``place_submodules``); elsewhere (and without accelerate) it does nothing.
        """
        return _offload.loaded(self.model, module)

    def release_offloaded(self) -> None:
        """Offload again whatever a forward stopped midway (``capture``'s early stop) left loaded."""
        _offload.release(self.model)

    @property
    def offloaded(self) -> bool:
        """Whether accelerate keeps some of the model's weights off device (on the meta device)."""
        return any(p.device.type == "meta" for p in self.model.parameters())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}: {self.n_layer} layers, "
            f"d_model {self.d_model}, "
            f"{self.n_head} heads, d_vocab {self.d_vocab})"
        )
