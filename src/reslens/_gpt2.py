"""The one module that knows HuggingFace GPT-2 internals.

Every other module asks a :class:`GPT2` adapter for blocks, layer norms, weights and sizes,
so supporting another architecture means writing one more adapter, not touching analyses.

Weights are returned exactly as HuggingFace stores them. GPT-2's ``Conv1D`` computes
``y = x @ weight + bias`` (``weight: [in, out]``, the transpose of ``nn.Linear``):

- ``mlp.c_fc.weight``    ``[d_model, d_mlp]``   (keys are its columns)
- ``mlp.c_proj.weight``  ``[d_mlp, d_model]``   (values are its rows)
- ``attn.c_attn.weight`` ``[d_model, 3 * d_model]`` (q, k, v side by side, heads contiguous)
- ``attn.c_proj.weight`` ``[d_model, d_model]``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GPT2", "CONV1D_WEIGHT_IS_IN_OUT", "SUPPORTED_CLASSES"]

#: ``Conv1D.weight`` is stored ``[in_features, out_features]``: ``y = x @ weight + bias``.
CONV1D_WEIGHT_IS_IN_OUT = True

SUPPORTED_CLASSES = ("GPT2LMHeadModel", "GPT2Model")


@dataclass(frozen=True, eq=False)
class GPT2:
    """A read-only view of a HuggingFace ``GPT2LMHeadModel`` or ``GPT2Model``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> g = GPT2(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)))
    >>> g.n_layer, g.d_model, g.d_mlp, g.n_head, g.d_head, g.d_vocab
    (2, 16, 64, 2, 8, 50)
    """

    model: nn.Module

    def __post_init__(self) -> None:
        from transformers import GPT2LMHeadModel, GPT2Model

        if not isinstance(self.model, (GPT2LMHeadModel, GPT2Model)):
            raise TypeError(
                f"model must be a HuggingFace GPT2LMHeadModel or GPT2Model; got {type(self.model).__name__}. "
                f"Supported classes: {', '.join(SUPPORTED_CLASSES)}."
            )

    # --- modules ---------------------------------------------------------------------------

    @property
    def transformer(self) -> nn.Module:
        """The ``GPT2Model`` body (the model itself when it has no LM head)."""
        return getattr(self.model, "transformer", self.model)

    @property
    def lm_head(self) -> nn.Module | None:
        """The LM head (``nn.Linear``, tied to ``wte``), or ``None`` for a bare ``GPT2Model``."""
        return getattr(self.model, "lm_head", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def wte(self) -> nn.Embedding:
        return self.transformer.wte

    @property
    def wpe(self) -> nn.Embedding:
        return self.transformer.wpe

    @property
    def ln_f(self) -> nn.LayerNorm:
        return self.transformer.ln_f

    def ln_1(self, layer: int) -> nn.LayerNorm:
        return self.blocks[layer].ln_1

    def ln_2(self, layer: int) -> nn.LayerNorm:
        return self.blocks[layer].ln_2

    def attn(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp

    # --- sizes -----------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.wte.weight.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].mlp.c_fc.weight.shape[1]

    @property
    def n_head(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_vocab(self) -> int:
        return self.wte.weight.shape[0]

    @property
    def n_positions(self) -> int:
        return self.wpe.weight.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.n_positions

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # --- weights (as stored; never folded or centred) ----------------------------------------

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_vocab, d_model]``: ``lm_head.weight`` (tied to ``wte``); ``wte`` without a head."""
        head = self.lm_head
        return head.weight if head is not None else self.wte.weight

    def apply_ln_f(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_f`` applied functionally (the module's own weights, no module hooks fire)."""
        ln = self.ln_f
        return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ``ln_f`` output ``[batch, pos, d_model]`` of unpadded ids ``[batch, pos]`` (no
        cache, no LM head); :meth:`unembed` turns it into logits. Patch hooks fire as usual."""
        return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` from ``ln_f`` outputs ``[..., d_model]``, as the LM head computes them."""
        head = self.lm_head
        bias = head.bias if head is not None else None
        return torch.nn.functional.linear(x, self.W_U, bias)

    def c_fc(self, layer: int) -> nn.Module:
        """MLP input ``Conv1D``: ``weight [d_model, d_mlp]``, ``bias [d_mlp]``."""
        return self.blocks[layer].mlp.c_fc

    def c_proj(self, layer: int) -> nn.Module:
        """MLP output ``Conv1D``: ``weight [d_mlp, d_model]``, ``bias [d_model]``."""
        return self.blocks[layer].mlp.c_proj

    def mlp_keys(self, layer: int) -> torch.Tensor:
        """MLP keys ``[d_mlp, d_model]``: key ``i`` is ``c_fc.weight[:, i]`` (a transposed view)."""
        return self.c_fc(layer).weight.T

    def mlp_key_bias(self, layer: int) -> torch.Tensor:
        """``c_fc.bias`` ``[d_mlp]``: the pre-activation is ``ln_2(x) @ keys.T + bias``."""
        return self.c_fc(layer).bias

    def mlp_values(self, layer: int) -> torch.Tensor:
        """MLP values ``[d_mlp, d_model]``: value ``i`` is ``c_proj.weight[i]`` (a view)."""
        return self.c_proj(layer).weight

    def mlp_value_bias(self, layer: int) -> torch.Tensor:
        """``c_proj.bias`` ``[d_model]``: ``mlp_out = coefficients @ values + bias``."""
        return self.c_proj(layer).bias

    def c_attn(self, layer: int) -> nn.Module:
        """Attention q/k/v ``Conv1D``: ``weight [d_model, 3 * d_model]``, ``bias [3 * d_model]``."""
        return self.blocks[layer].attn.c_attn

    def attn_c_proj(self, layer: int) -> nn.Module:
        """Attention output ``Conv1D``: ``weight [d_model, d_model]``, ``bias [d_model]``."""
        return self.blocks[layer].attn.c_proj

    def attn_scale(self, layer: int) -> float:
        """The factor the model multiplies ``q @ k^T`` by in this layer."""
        return float(self.blocks[layer].attn.scaling)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_attn`` output ``[batch, pos, 3 * d_model]`` -> q, k, v each ``[batch, head, pos, d_head]``."""
        q, k, v = qkv.split(self.d_model, dim=-1)
        shape = (*qkv.shape[:-1], self.n_head, self.d_head)
        return tuple(t.reshape(shape).transpose(-3, -2) for t in (q, k, v))  # type: ignore[return-value]

    def attention_pattern(
        self, layer: int, qkv: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Softmax attention weights from the ``c_attn`` output, in float32.

        ``qkv: [batch, pos, 3 * d_model]``, ``key_mask: [batch, pos]`` (True = real token) or
        ``None``. Returns ``[batch, head, query, key]``; rows of query positions that see no
        real key (left-padding) are zero.
        """
        q, k, _ = self.split_qkv(qkv.float())
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale(layer)  # [batch, head, query, key]
        n_pos = qkv.shape[-2]
        allowed = torch.ones(n_pos, n_pos, dtype=torch.bool, device=qkv.device).tril()
        allowed = allowed.expand(qkv.shape[0], 1, n_pos, n_pos)
        if key_mask is not None:
            allowed = allowed & key_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        return pattern.nan_to_num(0.0)

    # --- per-head attention weights (views of c_attn / c_proj; row-vector convention) ------
    #
    # ``c_attn.weight [d_model, 3 * d_model]`` holds q, k, v side by side, each
    # ``[d_model, n_head * d_head]`` with heads contiguous; ``attn.c_proj.weight
    # [n_head * d_head, d_model]`` takes the concatenated head outputs ``z``. So head ``h``
    # computes ``q = ln_1(x) @ W_Q[h] + b_Q[h]`` (likewise k, v) and writes
    # ``z_h @ W_O[h]`` to the residual; ``b_O`` is added once per layer.

    def _qkv_weight(self, layer: int, which: int) -> torch.Tensor:
        w = self.c_attn(layer).weight[:, which * self.d_model : (which + 1) * self.d_model]
        return w.reshape(self.d_model, self.n_head, self.d_head).permute(1, 0, 2)  # [head, d_model, d_head]

    def _qkv_bias(self, layer: int, which: int) -> torch.Tensor:
        b = self.c_attn(layer).bias[which * self.d_model : (which + 1) * self.d_model]
        return b.reshape(self.n_head, self.d_head)

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_head, d_model, d_head]`` of ``layer`` (views of ``c_attn.weight``)."""
        return self._qkv_weight(layer, 0)

    def W_K(self, layer: int) -> torch.Tensor:
        """Key weights ``[n_head, d_model, d_head]``."""
        return self._qkv_weight(layer, 1)

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights ``[n_head, d_model, d_head]``."""
        return self._qkv_weight(layer, 2)

    def b_Q(self, layer: int) -> torch.Tensor:
        """Query bias ``[n_head, d_head]``."""
        return self._qkv_bias(layer, 0)

    def b_K(self, layer: int) -> torch.Tensor:
        """Key bias ``[n_head, d_head]``."""
        return self._qkv_bias(layer, 1)

    def b_V(self, layer: int) -> torch.Tensor:
        """Value bias ``[n_head, d_head]``."""
        return self._qkv_bias(layer, 2)

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights ``[n_head, d_head, d_model]``: head ``h`` writes ``z_h @ W_O[h]``."""
        return self.attn_c_proj(layer).weight.reshape(self.n_head, self.d_head, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor:
        """Attention output bias ``[d_model]`` (``attn.c_proj.bias``), added once per layer."""
        return self.attn_c_proj(layer).bias

    def mlp_activation(self, layer: int) -> nn.Module:
        """The MLP's elementwise activation (``gelu_new`` for GPT-2): ``act(ln_2(x) @ c_fc)``."""
        return self.blocks[layer].mlp.act

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``attn.c_proj`` input ``[..., n_head * d_head]`` -> per-head ``[..., n_head, d_head]``."""
        return z.reshape(*z.shape[:-1], self.n_head, self.d_head)

    # --- running blocks on suffix positions, with the prefix's keys/values given -----------

    def attention_kv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values block ``layer`` computes from its input ``hidden`` (``resid`` layer
        ``layer``) ``[batch, pos, d_model]``: ``ln_1`` then ``c_attn``, each ``[batch, head, pos, d_head]``.
        Calls those modules, so hooks on them fire (:func:`reslens.hooks.patch` puts none there)."""
        block = self.blocks[layer]
        _, k, v = self.split_qkv(block.attn.c_attn(block.ln_1(hidden)))
        return k, v

    def run_block_suffix(self, layer: int, hidden: torch.Tensor, prefix_k: torch.Tensor,
                         prefix_v: torch.Tensor) -> torch.Tensor:
        """Block ``layer`` on positions ``start .. start + q - 1`` only, where ``start =
        prefix_k.shape[-2]``: the output a full forward computes there, given the block's input
        ``hidden`` ``[batch, q, d_model]`` at those positions and the keys/values of positions
        ``0 .. start - 1`` (``prefix_k``, ``prefix_v``: ``[batch, head, start, d_head]``, e.g.
        from :meth:`attention_kv`). Exact by causality: positions ``< start`` see nothing later.

        The block gets a one-layer cache whose ``update`` prepends the prefix, and an additive
        float mask ``[1, 1, q, start + q]`` (key ``j`` visible to query ``i`` iff ``j <= start + i``),
        which both ``eager`` and ``sdpa`` attention take (``sdpa`` would otherwise crop the
        keys to ``q`` when it runs causal without a mask). Module hooks (``hooks.patch``) fire
        as in a full forward, on the ``q`` positions. Returns ``[batch, q, d_model]``.
        """
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(f"run_block_suffix supports eager and sdpa attention; the model uses {impl!r}")
        start, q = prefix_k.shape[-2], hidden.shape[1]
        query_pos = torch.arange(start, start + q, device=hidden.device)[:, None]
        visible = torch.arange(start + q, device=hidden.device)[None, :] <= query_pos  # [q, start + q]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[None, None]
        cache = _PrefixCache(prefix_k.to(hidden.dtype), prefix_v.to(hidden.dtype))
        return self.blocks[layer](hidden, cache, mask, None, encoder_attention_mask=None, use_cache=False)


class _PrefixCache:
    """The cache interface ``GPT2Attention.forward`` uses (``update``), prepending fixed
    prefix keys/values ``[batch, head, start, d_head]`` to the ones the block computes."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
