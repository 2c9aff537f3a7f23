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

from reslens.arch._base import Arch, ForwardInputs, MLPWeights, PatternHook
from reslens.arch._norm import Norm
from reslens.arch.gpt2 import PrefixCache

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
    gated_mlp = True
    prepend_bos = True

    def __post_init__(self) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        body = getattr(self.model, "model", self.model)
        if model_type not in MODEL_TYPES or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
            raise TypeError(
                "model must be a HuggingFace Llama, Mistral or Qwen2 causal LM or body; "
                f"got {type(self.model).__name__}"
            )

    # --- modules ---------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def body(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    @property
    def lm_head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.layers

    @property
    def final_norm_module(self) -> nn.Module:
        return self.body.norm

    @property
    def embed_module(self) -> nn.Module:
        return self.body.embed_tokens

    def attn(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attn

    def attn_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].input_layernorm

    def attn_out_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attn.o_proj

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].post_attention_layernorm

    def mlp_in_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.up_proj

    def mlp_gate_proj(self, layer: int) -> nn.Module | None:
        return self.blocks[layer].mlp.gate_proj

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.down_proj

    def pattern_hook(self, layer: int) -> PatternHook:
        """A pre-hook on the attention module: the pattern from its normed input and rotary embeddings."""

        def pattern(payload: Any, key_mask: torch.Tensor | None) -> torch.Tensor:
            args, kwargs = payload
            hidden = self.hidden_of(args, kwargs)
            cos_sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            return self.attention_pattern(layer, hidden, cos_sin, key_mask)

        return PatternHook(self.attn(layer), "pre", pattern)

    def forward_inputs(self, args: tuple, kwargs: dict) -> ForwardInputs:
        """``LlamaModel.forward(input_ids, attention_mask, position_ids, cache, ...)``."""

        def arg(name: str, index: int) -> Any:
            return kwargs.get(name, args[index] if len(args) > index else None)

        cache = arg("cache", 3) if "past_key_values" not in kwargs else kwargs["past_key_values"]
        return ForwardInputs(arg("input_ids", 0), arg("attention_mask", 1), arg("position_ids", 2), cache)

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

    # --- norms, embedding, unembedding -------------------------------------------------------

    def norm(self, which: str, layer: int | None = None) -> Norm:
        """``"attn"`` (``input_layernorm``), ``"mlp"`` (``post_attention_layernorm``), ``"final"``."""
        if which == "final":
            module = self.body.norm
        elif which in ("attn", "mlp"):
            if layer is None:
                raise ValueError(f"norm({which!r}) needs a layer")
            module = self.attn_norm(layer) if which == "attn" else self.mlp_norm(layer)
        else:
            raise ValueError(f"which must be 'attn', 'mlp' or 'final'; got {which!r}")
        return Norm(self._real(module).detach(), None, float(module.variance_epsilon), centred=False)

    @property
    def W_E(self) -> torch.Tensor:
        """Token embeddings ``[d_vocab, d_model]`` (``embed_tokens.weight``)."""
        return self._real(self.body.embed_tokens)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_vocab, d_model]``: ``lm_head.weight`` (tied or not), else the embedding."""
        head = self.lm_head
        return self._real(head) if head is not None else self.W_E

    def embedding_components(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """``[("embed", W_E[ids])]``: rotary positions add nothing to the residual stream."""
        return [("embed", self.W_E.detach().float()[input_ids])]

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

    def attn_scale(self, layer: int) -> float:
        return float(self.attn(layer).scaling)

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

    def _visible(self, n_query: int, start: int, layer: int, device: torch.device) -> torch.Tensor:
        """``[n_query, start + n_query]`` bool: causal, and inside the layer's sliding window."""
        query = torch.arange(start, start + n_query, device=device)[:, None]
        key = torch.arange(start + n_query, device=device)[None, :]
        visible = key <= query
        window = self.window(layer)
        if window is not None:
            visible = visible & (key > query - window)
        return visible

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
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale(layer)
        allowed = self._visible(n_pos, 0, layer, hidden.device).expand(batch, 1, n_pos, n_pos)
        if key_mask is not None:
            allowed = allowed & key_mask.to(hidden.device).bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

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

    def run_block_suffix(
        self, layer: int, hidden: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
    ) -> torch.Tensor:
        """Block ``layer`` on positions ``start .. start + q - 1`` (``start = prefix_k.shape[-2]``).

        Given its input there ``hidden [batch, q, d_model]`` and the prefix's cached keys/values
        ``[batch, n_kv_head, start, d_head]`` (from :meth:`attention_kv`): rotary at the absolute positions,
        an additive causal + window mask. Exact by causality. Returns ``[batch, q, d_model]`` on
        :attr:`device` (on a dispatched model the prefix goes to the block's device, where it runs).
        """
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(
                f"run_block_suffix supports eager and sdpa attention; the model uses {impl!r}"
            )
        start, n_query = prefix_k.shape[-2], hidden.shape[1]
        visible = self._visible(n_query, start, layer, hidden.device)
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[None, None]
        positions = torch.arange(start, start + n_query, device=hidden.device)[None]
        cos_sin = self.position_embeddings(hidden, positions)
        on = self._device_of(self.attn(layer).k_proj)
        cache = PrefixCache(prefix_k.to(on, hidden.dtype), prefix_v.to(on, hidden.dtype))
        with self.loaded(self.blocks[layer]):
            out = self.blocks[layer](
                hidden_states=hidden,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=False,
                position_embeddings=cos_sin,
            )
        return out.to(self.device)

    # --- weight edits and cache keys -------------------------------------------------------

    def mlp_out_param(self, layer: int) -> nn.Parameter:
        """``down_proj.weight [d_model, d_mlp]``: the weight a rank-one edit changes."""
        return self.blocks[layer].mlp.down_proj.weight

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``outer(v, u) [d_model, d_mlp]``: ``down_proj.weight`` is stored ``[out, in]``."""
        return torch.outer(v, u)

    def key_parameters(self, layer: int) -> list[torch.Tensor]:
        """The token embedding, every parameter of blocks ``< layer``, block ``layer`` but ``down_proj``.

        The parameters themselves; values read from accelerate's weights map where it offloads them.
        """
        params = [self.W_E]
        for block in range(layer + 1):
            for name, p in self._real_parameters(self.blocks[block]):
                if block < layer or not name.startswith("mlp.down_proj"):
                    params.append(p)
        return params

    def start_token(self, tokenizer: Any) -> int | None:
        """Llama-family documents start after BOS."""
        return getattr(tokenizer, "bos_token_id", None)
