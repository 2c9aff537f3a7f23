"""Rotary decoder families as data: one adapter, :class:`Decoder`, read through each family's :class:`Layout`.

Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo 2, GPT-NeoX (Pythia), Phi-3 and the sparse mixtures of
experts (Mixtral, OLMoE, Qwen3-MoE) differ in data, not behaviour, and that data is their layout:

- **where** the modules are (``self_attn.q_proj`` or a fused ``qkv_proj`` / ``query_key_value``);
- **the block** (``parallel``: GPT-NeoX's sublayers both read the block input; ``attn_norm`` /
  ``mlp_norm`` ``None``: OLMo 2 has no norm before a sublayer; ``attn_out_norm`` / ``mlp_out_norm``:
  Gemma 2/3 and OLMo 2 norm a sublayer's output before it is added);
- **the norm** (``norm_style``: LayerNorm; RMSNorm cast before ``γ`` (Llama) or after it (OLMo 2);
  Gemma's ``1 + w``); **QK-norm** (per head: Qwen3, Gemma 3; over the whole projection: OLMo 2);
- **the MLP** (gated with separate or fused gate/up, plain, or routed experts).

Behaviour common to all is code, written once here: rotary positions come from the model's own
``rotary_emb`` (per layer type for Gemma 3's local/global bases) and rotate through the
``apply_rotary_pos_emb`` of the attention module's own modeling file (partial rotary included);
grouped-query K/V are expanded to query heads; attention logit soft-capping (Gemma 2) enters the
recomputed pattern; the embedding scale (Gemma's ``√d_model``) is read from the embedding module.
A new family of a known layout is a :class:`Layout` and a registry entry.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from reslens.arch._base import Arch
from reslens.arch._norm import Norm
from reslens.arch._values import MLPWeights, PatternHook

__all__ = ["Decoder"]


@functools.lru_cache(maxsize=None)
def _takes_layer_type(rotary_type: type) -> bool:
    return "layer_type" in inspect.signature(rotary_type.forward).parameters


@dataclass(frozen=True, eq=False, repr=False)
class Decoder(Arch):
    """A read-only view of a HuggingFace rotary decoder whose family's :attr:`layout` says how it is built."""

    model: nn.Module
    positional = "rotary"
    #: the ``config.model_type`` values this adapter reads
    model_types: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        body = getattr(self.model, self.layout.body, self.model)
        if model_type not in self.model_types or not hasattr(body, self.layout.blocks) or not hasattr(
            body, "rotary_emb"
        ):
            raise TypeError(
                f"model must be a HuggingFace {' / '.join(self.model_types)} causal LM or body; "
                f"got {type(self.model).__name__}"
                + (f" with config.model_type={model_type!r}" if model_type else "")
            )

    # --- sizes -----------------------------------------------------------------------------

    @property
    def n_head(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_head

    @property
    def d_head(self) -> int:
        attn = self.attn(0)
        width = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
        return width or self.d_model // self.n_head

    @property
    def n_ctx(self) -> int:
        return self.config.max_position_embeddings

    @property
    def d_mlp(self) -> int:
        """Memories per layer: the value projection's inputs (every expert's, for a mixture of experts)."""
        if self.layout.experts is None:
            return self.mlp_out_proj(0).in_features
        down = self._in_block(0, self.layout.experts).down_proj  # [E, d_model, m]
        return down.shape[0] * down.shape[2]

    @property
    def n_expert(self) -> int:
        """Experts per MoE layer (1 when dense): memory ``i`` is neuron ``i % m`` of expert ``i // m``."""
        if self.layout.experts is None:
            return 1
        return self._in_block(0, self.layout.experts).down_proj.shape[0]

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (query ``i`` sees key ``j`` iff ``i - j < window``) or ``None``."""
        attn = self.attn(layer)
        if hasattr(attn, "sliding_window"):  # per layer (Qwen2/3, Gemma 2/3)
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)  # every layer (Mistral, Mixtral, Phi-3)

    @property
    def attn_softcap(self) -> float | None:
        """Gemma 2's attention logit soft-cap ``c`` (scores become ``c · tanh(scores / c)``), or ``None``."""
        return getattr(self.config, "attn_logit_softcapping", None)

    # --- norms -----------------------------------------------------------------------------

    def norm_of(self, module: nn.Module) -> Norm:
        """The family's norm module as data (:attr:`Layout.norm_style`)."""
        style = self.layout.norm_style
        weight = self._real(module).detach()
        if style == "layernorm":
            return Norm(weight, self._real(module, "bias").detach(), float(module.eps), centred=True)
        eps = float(getattr(module, "variance_epsilon", None) or module.eps)
        if style == "rms_gemma":
            return Norm(weight, None, eps, centred=False, offset=1.0, upcast=True)
        return Norm(weight, None, eps, centred=False, upcast=style == "rms_upcast")

    # --- the attention pattern's hook point -----------------------------------------------

    def pattern_hook(self, layer: int) -> PatternHook:
        """A pre-hook on the attention module: the pattern from its input and rotary embeddings."""

        def pattern(payload: Any, key_mask: torch.Tensor | None) -> torch.Tensor:
            args, kwargs = payload
            hidden = self.hidden_of(args, kwargs)
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is None:
                raise RuntimeError(f"the attention of layer {layer} got no position_embeddings")
            return self.attention_pattern(layer, hidden, cos_sin, key_mask)

        return PatternHook(self.attn(layer), "pre", pattern)

    def _qkv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[batch, heads, pos, d_head]`` of the attention input: QK-normed, not yet rotated."""
        layout, d = self.layout, self.d_head
        batch, n_pos, _ = hidden.shape
        if layout.qkv_proj is not None:
            qkv = self._in_block(layer, layout.qkv_proj)(hidden)
            if layout.qkv_per_head:  # GPT-NeoX: [q_h k_h v_h] per head
                q, k, v = qkv.view(batch, n_pos, -1, 3 * d).transpose(1, 2).chunk(3, dim=-1)
                return q, k, v
            q, k, v = qkv.split([self.n_head * d, self.n_kv_head * d, self.n_kv_head * d], dim=-1)
        else:
            paths = (layout.q_proj, layout.k_proj, layout.v_proj)
            q, k, v = (self._in_block(layer, path)(hidden) for path in paths)
        if layout.q_norm is not None and not layout.qk_norm_per_head:  # OLMo 2: over the whole projection
            q, k = self._in_block(layer, layout.q_norm)(q), self._in_block(layer, layout.k_norm)(k)
        q, k, v = (t.view(batch, n_pos, -1, d) for t in (q, k, v))
        if layout.q_norm is not None and layout.qk_norm_per_head:  # Qwen3, Gemma 3
            q, k = self._in_block(layer, layout.q_norm)(q), self._in_block(layer, layout.k_norm)(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention_pattern(
        self,
        layer: int,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Softmax attention ``[batch, head, query, key]`` (float32) from the attention module's input.

        q/k projections and QK-norm as the model computes them, the model's rotary, repeated KV heads,
        scaling, the soft-cap, causal + window + key masks. Rows that see no real key are zero.
        """
        q, k, _ = self._qkv(layer, hidden)
        cos, sin = cos_sin
        q, k = self._rotate(layer, q.float(), k.float(), cos.float(), sin.float())
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale(layer)  # [batch, head, query, key]
        cap = self.attn_softcap
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        return self._masked_softmax(scores, layer, key_mask)

    # --- per-head weights --------------------------------------------------------------------

    def _rows(self, layer: int, which: int, name: str = "weight") -> torch.Tensor | None:
        """Rows of q (0), k (1) or v (2) ``[heads, d_head, ...]`` (views) of separate or fused projections."""
        layout, d = self.layout, self.d_head
        n = self.n_head if which == 0 else self.n_kv_head
        if layout.qkv_proj is None:
            t = self._real(self._in_block(layer, (layout.q_proj, layout.k_proj, layout.v_proj)[which]), name)
            return None if t is None else t.view(n, d, *t.shape[1:])
        t = self._real(self._in_block(layer, layout.qkv_proj), name)
        if t is None:
            return None
        if layout.qkv_per_head:
            return t.view(self.n_head, 3, d, *t.shape[1:])[:, which]
        start = (0, self.n_head * d, (self.n_head + self.n_kv_head) * d)[which]
        return t[start : start + n * d].view(n, d, *t.shape[1:])

    def _expand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        rep = self.n_head // self.n_kv_head
        return t if t is None or rep == 1 else t.repeat_interleave(rep, dim=0)

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_head, d_model, d_head]`` (a view of the stored projection)."""
        return self._rows(layer, 0).transpose(1, 2)

    def W_K_kv(self, layer: int) -> torch.Tensor:
        """Key weights per key/value head ``[n_kv_head, d_model, d_head]`` (a view)."""
        return self._rows(layer, 1).transpose(1, 2)

    def W_V_kv(self, layer: int) -> torch.Tensor:
        """Value weights per key/value head ``[n_kv_head, d_model, d_head]`` (a view)."""
        return self._rows(layer, 2).transpose(1, 2)

    def W_K(self, layer: int) -> torch.Tensor:
        """Key weights expanded to query heads ``[n_head, d_model, d_head]`` (a copy under GQA)."""
        return self._expand(self.W_K_kv(layer))

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights expanded to query heads ``[n_head, d_model, d_head]`` (a copy under GQA)."""
        return self._expand(self.W_V_kv(layer))

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights ``[n_head, d_head, d_model]`` (a view of the output projection's weight)."""
        w_o = self._real(self.attn_out_proj(layer))  # [d_model, n_head * d_head]
        return w_o.view(self.d_model, self.n_head, self.d_head).permute(1, 2, 0)

    def b_Q(self, layer: int) -> torch.Tensor | None:
        return self._rows(layer, 0, "bias")

    def b_K(self, layer: int) -> torch.Tensor | None:
        return self._expand(self._rows(layer, 1, "bias"))

    def b_V(self, layer: int) -> torch.Tensor | None:
        return self._expand(self._rows(layer, 2, "bias"))

    def b_O(self, layer: int) -> torch.Tensor | None:
        return self._real(self.attn_out_proj(layer), "bias")

    # --- the MLP ---------------------------------------------------------------------------

    def mlp_weights(self, layer: int) -> MLPWeights:
        """Keys and values as ``[d_mlp, d_model]`` rows: views for dense MLPs, every expert's rows for MoE."""
        layout = self.layout
        if layout.experts is not None:
            return self._expert_weights(layer)
        act = getattr(self.mlp(layer), layout.mlp_act_fn, None)
        w_out = self.mlp_out_proj(layer)
        if layout.mlp_gate_up_proj is not None:  # Phi-3: gate rows first, then up rows
            fused = self._in_block(layer, layout.mlp_gate_up_proj)
            gate, up = self._real(fused).chunk(2, dim=0)
            b = self._real(fused, "bias")
            b_gate, b_up = (None, None) if b is None else b.chunk(2)
        else:
            up_proj, gate_proj = self.mlp_in_proj(layer), self.mlp_gate_proj(layer)
            up, b_up = self._real(up_proj), self._real(up_proj, "bias")
            gate = None if gate_proj is None else self._real(gate_proj)
            b_gate = None if gate_proj is None else self._real(gate_proj, "bias")
        return MLPWeights(W_in=up, b_in=b_up, W_gate=gate, b_gate=b_gate, W_out=self._real(w_out).T,
                          b_out=self._real(w_out, "bias"), act=act)

    def _expert_weights(self, layer: int) -> MLPWeights:
        """Every expert's memories in one list (copies), the router's weight on each in ``route``."""
        experts = self._in_block(layer, self.layout.experts)
        gate_up = self._real(experts, "gate_up_proj")  # [E, 2 * m, d_model], gate rows first
        n_expert, two_m, d_model = gate_up.shape
        gate, up = gate_up.view(n_expert, 2, two_m // 2, d_model).unbind(1)
        down = self._real(experts, "down_proj")  # [E, d_model, m]
        return MLPWeights(
            W_in=up.reshape(-1, d_model), b_in=None, W_gate=gate.reshape(-1, d_model), b_gate=None,
            W_out=down.transpose(1, 2).reshape(-1, d_model), b_out=None, act=experts.act_fn,
            route=functools.partial(self.router_weights, layer), n_expert=n_expert,
        )

    def router_weights(self, layer: int, x_normed: torch.Tensor) -> torch.Tensor:
        """The router's weight on each expert ``[..., n_expert]`` (0 where unrouted), as the model routes."""
        router = self._in_block(layer, self.layout.router)
        flat = x_normed.reshape(-1, x_normed.shape[-1]).to(self.dtype)
        _, scores, indices = router(flat)
        dense = torch.zeros(flat.shape[0], self.n_expert, dtype=torch.float32, device=flat.device)
        dense.scatter_(1, indices, scores.float())
        return dense.view(*x_normed.shape[:-1], self.n_expert)

    def mlp_act_hook(self, layer: int) -> PatternHook:
        """Dense: the input of the value projection. MoE: from the experts' inputs (tokens, routing)."""
        if self.layout.experts is None:
            return super().mlp_act_hook(layer)
        experts = self._in_block(layer, self.layout.experts)

        def coefficients(payload: Any, key_mask: torch.Tensor | None) -> torch.Tensor:
            """``[tokens, E * m]`` float32: every expert's keys on every token, times the router's weight."""
            args, kwargs = payload
            hidden, index, weight = (list(args) + [None] * 3)[:3]
            hidden = kwargs.get("hidden_states", hidden)
            index, weight = kwargs.get("top_k_index", index), kwargs.get("top_k_weights", weight)
            route = torch.zeros(hidden.shape[0], self.n_expert, dtype=torch.float32, device=hidden.device)
            route.scatter_(1, index, weight.float())
            # the stored [E, 2m, d_model] weight read in place (no per-forward copy of every expert's rows)
            gate_up = self._real(experts, "gate_up_proj").float()
            gate, up = torch.einsum("td,ekd->tek", hidden.float(), gate_up).chunk(2, dim=-1)  # [tokens, E, m]
            return (experts.act_fn(gate) * up * route[..., None]).flatten(1)

        return PatternHook(self._in_block(layer, self.layout.experts), "pre", coefficients)

    # --- rotary ------------------------------------------------------------------------------

    def _rotate(self, layer: int, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The model's own ``apply_rotary_pos_emb`` (from the attention module's modeling file)."""
        apply = sys.modules[type(self.attn(layer)).__module__].apply_rotary_pos_emb
        return apply(q, k, cos, sin)

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[batch, pos, rot]`` from the model's ``rotary_emb`` (on ``hidden``'s device).

        Per layer type where the model has several (Gemma 3's local and global bases).
        """
        rotary = self.body.rotary_emb
        extra = {}
        if _takes_layer_type(type(rotary)):
            extra["layer_type"] = self.config.layer_types[layer]
        cos, sin = rotary(hidden, position_ids=position_ids, **extra)
        return cos.to(hidden.device), sin.to(hidden.device)

    def rotation(self, layer: int, offset: int) -> torch.Tensor:
        """``R [d_head, d_head]`` (float32): score ``q · R · k`` for a key ``offset`` positions back.

        ``q``/``k`` unrotated (after QK-norm), before scaling: the model's rotation applied to the identity.
        """
        eye = torch.eye(self.d_head, device=self.device, dtype=torch.float32)[None, None]  # [1, 1, d, d]
        positions = torch.tensor([[offset, 0]], device=self.device)
        cos, sin = self.position_embeddings(eye.to(self.dtype), positions, layer)
        a, _ = self._rotate(layer, eye, eye, cos[:, :1].float(), sin[:, :1].float())
        b, _ = self._rotate(layer, eye, eye, cos[:, 1:].float(), sin[:, 1:].float())
        return a[0, 0] @ b[0, 0].T

    # --- partial forwards ------------------------------------------------------------------

    def attention_kv(
        self, layer: int, hidden: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (QK-normed, rotated at positions ``start ..``) and values ``[batch, n_kv_head, pos, d_head]``.

        What block ``layer`` computes from its input ``hidden [batch, pos, d_model]``: what its cache would
        hold. Returned on :attr:`device`.
        """
        with self.loaded(self.blocks[layer]):
            norm = self.attn_norm(layer)
            _, k, v = self._qkv(layer, hidden if norm is None else norm(hidden))
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        cos, sin = self.position_embeddings(hidden, positions, layer)
        _, k = self._rotate(layer, k, k, cos.to(k.device), sin.to(k.device))
        return k.to(self.device), v.to(self.device)

    def block_kwargs(self, layer: int, hidden: torch.Tensor, start: int) -> dict[str, Any]:
        """The absolute positions and the model's rotary ``(cos, sin)`` at them."""
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        return {"position_ids": positions,
                "position_embeddings": self.position_embeddings(hidden, positions, layer)}

    # --- weight edits and start tokens --------------------------------------------------------

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``outer(v, u) [d_model, d_mlp]``: the value projection is stored ``[out, in]``."""
        self.require("rank_one_edit")
        return torch.outer(v, u)

    def start_token(self, tokenizer: Any) -> int | None:
        """Documents start after BOS."""
        return getattr(tokenizer, "bos_token_id", None)
