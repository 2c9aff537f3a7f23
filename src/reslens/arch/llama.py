"""The Llama family: one adapter for HuggingFace Llama, SmolLM2 (``model_type="llama"``), Mistral and Qwen2.

All four share the module layout ``model.embed_tokens``, ``model.layers[i].{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``,
``model.rotary_emb`` and ``lm_head`` (tied to ``embed_tokens`` or not). Differences handled here:

- **RMSNorm** (no centring, no bias): ``Norm(centred=False, bias=None)``.
- **Rotary positions**: never re-derived. ``(cos, sin)`` come from the model's own ``rotary_emb`` and
  rotate through the ``apply_rotary_pos_emb`` of the attention module's own modeling file, so
  ``rope_scaling`` variants come out exactly as the model computes them. ``resid[0]`` is the token
  embedding alone; position enters inside attention.
- **Grouped-query attention**: ``n_kv_head <= n_head``; ``W_K``/``W_V``/``b_K``/``b_V`` are expanded to
  query heads (copies), ``W_K_kv``/``W_V_kv`` are the stored views, ``kv_head(h)`` maps them.
- **Gated MLP**: ``down(act(gate·x̂) ⊙ (up·x̂))``; ``mlp_act`` (the input of ``down_proj``) is the gated
  product, so ``mlp_out = mlp_act @ W_out`` exactly.
- ``nn.Linear`` weights ``[out, in]``: ``W_in = up_proj.weight`` and ``W_gate = gate_proj.weight`` are
  already ``[d_mlp, d_model]``; ``W_out = down_proj.weight.T`` is a view.
- Qwen2's q/k/v biases; Mistral's (and Qwen2's per-layer) sliding window.

HuggingFace forwards are called and read by keyword.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reslens.arch._base import Arch
from reslens.arch._layout import Layout
from reslens.arch._norm import Norm
from reslens.arch._values import MLPWeights, PatternHook

__all__ = ["Llama", "MODEL_TYPES"]

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, eq=False, repr=False)
class Llama(Arch):
    """A read-only view of a HuggingFace Llama, Mistral or Qwen2 model.

    ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` or their bare ``…Model`` bodies.
    """

    model: nn.Module
    family = "llama"
    positional = "rotary"
    layout = Layout(
        body="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_norm="input_layernorm",
        attn_key_proj="self_attn.k_proj",
        attn_out_proj="self_attn.o_proj",
        mlp="mlp",
        mlp_norm="post_attention_layernorm",
        mlp_in_proj="mlp.up_proj",
        mlp_gate_proj="mlp.gate_proj",
        mlp_out_proj="mlp.down_proj",
        body_args=("input_ids", "attention_mask", "position_ids", "cache"),
    )

    def __post_init__(self) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        body = getattr(self.model, "model", self.model)
        if model_type not in MODEL_TYPES or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
            raise TypeError(
                "model must be a HuggingFace Llama, Mistral or Qwen2 causal LM or body; "
                f"got {type(self.model).__name__}"
            )

    # --- the attention pattern's hook point -----------------------------------------------

    def pattern_hook(self, layer: int) -> PatternHook:
        """A pre-hook on the attention module: the pattern from its normed input and rotary embeddings."""

        def pattern(payload: Any, key_mask: torch.Tensor | None) -> torch.Tensor:
            args, kwargs = payload
            hidden = self.hidden_of(args, kwargs)
            cos_sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            return self.attention_pattern(layer, hidden, cos_sin, key_mask)

        return PatternHook(self.attn(layer), "pre", pattern)

    # --- sizes -----------------------------------------------------------------------------

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].mlp.down_proj.in_features

    @property
    def n_head(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.config.num_key_value_heads or self.config.num_attention_heads

    @property
    def d_head(self) -> int:
        return self.blocks[0].self_attn.head_dim

    @property
    def n_ctx(self) -> int:
        return self.config.max_position_embeddings

    def window(self, layer: int) -> int | None:
        """The sliding-window size of ``layer``, or ``None``.

        A key ``j`` is visible to query ``i`` iff ``i - j < window``.
        """
        attn = self.attn(layer)
        if hasattr(attn, "sliding_window"):  # Qwen2: per layer
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral: every layer; Llama: none

    # --- norms ---------------------------------------------------------------------------------

    def norm_of(self, module: nn.Module) -> Norm:
        """An ``RMSNorm`` (``input_layernorm``, ``post_attention_layernorm``, ``norm``): no mean, no bias."""
        return Norm(self._real(module).detach(), None, float(module.variance_epsilon), centred=False)

    # --- the MLP ---------------------------------------------------------------------------

    def mlp_weights(self, layer: int) -> MLPWeights:
        """Keys and values as ``[d_mlp, d_model]`` rows.

        Up keys ``W_in = up_proj.weight``, gate keys ``W_gate = gate_proj.weight``, values
        ``W_out = down_proj.weight.T`` (a view).
        """
        mlp = self.blocks[layer].mlp
        return MLPWeights(
            W_in=self._real(mlp.up_proj),
            b_in=self._real(mlp.up_proj, "bias"),
            W_gate=self._real(mlp.gate_proj),
            b_gate=self._real(mlp.gate_proj, "bias"),
            W_out=self._real(mlp.down_proj).T,
            b_out=self._real(mlp.down_proj, "bias"),
            act=mlp.act_fn,
        )

    # --- attention -------------------------------------------------------------------------

    def _heads(self, proj: nn.Linear, n: int) -> torch.Tensor:
        """``proj.weight [n * d_head, d_model]`` (``nn.Linear``) -> ``[n, d_model, d_head]`` (a view)."""
        return self._real(proj).view(n, self.d_head, self.d_model).transpose(1, 2)

    def _bias(self, proj: nn.Linear, n: int) -> torch.Tensor | None:
        bias = self._real(proj, "bias")
        return None if bias is None else bias.view(n, self.d_head)

    def _expand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        rep = self.n_head // self.n_kv_head
        return t if t is None or rep == 1 else t.repeat_interleave(rep, dim=0)

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_head, d_model, d_head]`` (a view of ``q_proj.weight``)."""
        return self._heads(self.attn(layer).q_proj, self.n_head)

    def W_K_kv(self, layer: int) -> torch.Tensor:
        """Key weights per key/value head ``[n_kv_head, d_model, d_head]`` (a view)."""
        return self._heads(self.attn(layer).k_proj, self.n_kv_head)

    def W_V_kv(self, layer: int) -> torch.Tensor:
        """Value weights per key/value head ``[n_kv_head, d_model, d_head]`` (a view)."""
        return self._heads(self.attn(layer).v_proj, self.n_kv_head)

    def W_K(self, layer: int) -> torch.Tensor:
        """Key weights expanded to query heads ``[n_head, d_model, d_head]`` (a copy under GQA)."""
        return self._expand(self.W_K_kv(layer))

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights expanded to query heads ``[n_head, d_model, d_head]`` (a copy under GQA)."""
        return self._expand(self.W_V_kv(layer))

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights ``[n_head, d_head, d_model]`` (a view of ``o_proj.weight``)."""
        w_o = self._real(self.attn(layer).o_proj)  # [d_model, n_head * d_head]
        return w_o.view(self.d_model, self.n_head, self.d_head).permute(1, 2, 0)

    def b_Q(self, layer: int) -> torch.Tensor | None:
        return self._bias(self.attn(layer).q_proj, self.n_head)

    def b_K(self, layer: int) -> torch.Tensor | None:
        return self._expand(self._bias(self.attn(layer).k_proj, self.n_kv_head))

    def b_V(self, layer: int) -> torch.Tensor | None:
        return self._expand(self._bias(self.attn(layer).v_proj, self.n_kv_head))

    def b_O(self, layer: int) -> torch.Tensor | None:
        return self._real(self.attn(layer).o_proj, "bias")

    def _rotate(self, layer: int, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The model's own ``apply_rotary_pos_emb`` (from the attention module's modeling file)."""
        apply = sys.modules[type(self.attn(layer)).__module__].apply_rotary_pos_emb
        return apply(q, k, cos, sin)

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[batch, pos, d_head]`` on ``hidden``'s device, from the model's ``rotary_emb``."""
        cos, sin = self.body.rotary_emb(hidden, position_ids=position_ids)
        return cos.to(hidden.device), sin.to(hidden.device)

    def rotation(self, layer: int, offset: int) -> torch.Tensor:
        """``R [d_head, d_head]`` (float32): score ``q · R · k`` for a key ``offset`` positions back.

        ``q``/``k`` unrotated, before scaling: the model's rotation applied to the identity.
        """
        eye = torch.eye(self.d_head, device=self.device, dtype=torch.float32)[None, None]  # [1, 1, d, d]
        positions = torch.tensor([[offset, 0]], device=self.device)
        cos, sin = self.position_embeddings(eye.to(self.dtype), positions)
        a, _ = self._rotate(
            layer, eye, eye, cos[:, :1].float(), sin[:, :1].float()
        )  # rows: rotated basis at offset
        b, _ = self._rotate(layer, eye, eye, cos[:, 1:].float(), sin[:, 1:].float())  # at position 0
        return a[0, 0] @ b[0, 0].T

    def attention_pattern(
        self,
        layer: int,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Softmax attention ``[batch, head, query, key]`` (float32).

        From the attention module's normed input ``hidden [batch, pos, d_model]`` and its
        ``position_embeddings``: q/k projections, the model's rotary, repeated KV heads, scaling, causal +
        window + key masks. Rows that see no real key are zero.
        """
        attn = self.attn(layer)
        batch, n_pos, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, n_pos, self.n_head, self.d_head).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, n_pos, self.n_kv_head, self.d_head).transpose(1, 2)
        cos, sin = cos_sin
        q, k = self._rotate(layer, q.float(), k.float(), cos.float(), sin.float())
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale(layer)  # [batch, head, query, key]
        return self._masked_softmax(scores, layer, key_mask)

    # --- partial forwards ------------------------------------------------------------------

    def attention_kv(
        self, layer: int, hidden: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated at positions ``start ..``) and values ``[batch, n_kv_head, pos, d_head]``.

        What block ``layer`` computes from its input ``hidden [batch, pos, d_model]``: what its cache would
        hold. Returned on :attr:`device`.
        """
        attn = self.attn(layer)
        batch, n_pos, _ = hidden.shape
        with self.loaded(self.blocks[layer]):
            h = self.attn_norm(layer)(hidden)
            k = attn.k_proj(h).view(batch, n_pos, self.n_kv_head, self.d_head).transpose(1, 2)
            v = attn.v_proj(h).view(batch, n_pos, self.n_kv_head, self.d_head).transpose(1, 2)
        positions = torch.arange(start, start + n_pos, device=hidden.device)[None]
        cos, sin = self.position_embeddings(hidden, positions)
        _, k = self._rotate(layer, k, k, cos.to(k.device), sin.to(k.device))
        return k.to(self.device), v.to(self.device)

    def block_kwargs(self, layer: int, hidden: torch.Tensor, start: int) -> dict[str, Any]:
        """The absolute positions and the model's rotary ``(cos, sin)`` at them."""
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        return {"position_ids": positions, "position_embeddings": self.position_embeddings(hidden, positions)}

    # --- weight edits and cache keys -------------------------------------------------------

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``outer(v, u) [d_model, d_mlp]``: ``down_proj.weight`` is stored ``[out, in]``."""
        return torch.outer(v, u)

    def start_token(self, tokenizer: Any) -> int | None:
        """Llama-family documents start after BOS."""
        return getattr(tokenizer, "bos_token_id", None)
