"""GPT-2: the adapter for HuggingFace ``GPT2LMHeadModel`` and ``GPT2Model``.

Weights are read exactly as HuggingFace stores them. GPT-2's ``Conv1D`` computes
``y = x @ weight + bias`` (``weight: [in, out]``, the transpose of ``nn.Linear``):

- ``mlp.c_fc.weight``    ``[d_model, d_mlp]``   (keys are its columns)
- ``mlp.c_proj.weight``  ``[d_mlp, d_model]``   (values are its rows)
- ``attn.c_attn.weight`` ``[d_model, 3 * d_model]`` (q, k, v side by side, heads contiguous)
- ``attn.c_proj.weight`` ``[d_model, d_model]``

Positions are learned (``wpe``), so ``resid[0] = wte + wpe``; norms are LayerNorms; the MLP is
``c_proj(gelu(c_fc(ln_2(x))))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reslens.arch._base import Arch, ForwardInputs, MLPWeights, PatternHook
from reslens.arch._norm import Norm

__all__ = ["GPT2"]


@dataclass(frozen=True, eq=False, repr=False)
class GPT2(Arch):
    """A read-only view of a HuggingFace ``GPT2LMHeadModel`` or ``GPT2Model``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> g = GPT2(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)))
    >>> g.n_layer, g.d_model, g.d_mlp, g.n_head, g.d_head, g.d_vocab
    (2, 16, 64, 2, 8, 50)
    """

    model: nn.Module
    family = "gpt2"
    positional = "learned"
    gated_mlp = False
    prepend_bos = False
    legacy_checkpoint_keys = (r"\.attn\.masked_bias$",)  # the attention mask's fill value (transformers 3)

    def __post_init__(self) -> None:
        from transformers import GPT2LMHeadModel, GPT2Model

        if not isinstance(self.model, (GPT2LMHeadModel, GPT2Model)):
            raise TypeError(
                f"model must be a HuggingFace GPT2LMHeadModel or GPT2Model; got {type(self.model).__name__}"
            )

    # --- modules ---------------------------------------------------------------------------

    @property
    def body(self) -> nn.Module:
        """The ``GPT2Model`` (the model itself when it has no LM head)."""
        return getattr(self.model, "transformer", self.model)

    @property
    def lm_head(self) -> nn.Module | None:
        """The LM head (``nn.Linear``, tied to ``wte``), or ``None`` for a bare ``GPT2Model``."""
        return getattr(self.model, "lm_head", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.h

    @property
    def final_norm_module(self) -> nn.Module:
        return self.body.ln_f

    @property
    def embed_module(self) -> nn.Module:
        return self.body.wte

    def attn(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn

    def attn_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_1

    def attn_out_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn.c_proj

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_2

    def mlp_in_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_fc

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_proj

    def pattern_hook(self, layer: int) -> PatternHook:
        """A post-hook on ``c_attn``: the pattern from its fused q/k/v output."""
        return PatternHook(
            self.blocks[layer].attn.c_attn,
            "post",
            lambda qkv, key_mask: self.attention_pattern(layer, qkv, key_mask),
        )

    def forward_inputs(self, args: tuple, kwargs: dict) -> ForwardInputs:
        """``GPT2Model.forward(input_ids, cache, attention_mask, token_type_ids, position_ids, ...)``."""

        def arg(name: str, index: int) -> Any:
            return kwargs.get(name, args[index] if len(args) > index else None)

        cache = arg("cache", 1) if "past_key_values" not in kwargs else kwargs["past_key_values"]
        return ForwardInputs(arg("input_ids", 0), arg("attention_mask", 2), arg("position_ids", 4), cache)

    # --- sizes -----------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].mlp.c_fc.weight.shape[1]

    @property
    def n_head(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_ctx(self) -> int:
        return self.body.wpe.weight.shape[0]

    # --- norms, embedding, unembedding -------------------------------------------------------

    def norm(self, which: str, layer: int | None = None) -> Norm:
        """``"attn"`` (``ln_1`` of ``layer``), ``"mlp"`` (``ln_2``) or ``"final"`` (``ln_f``)."""
        if which == "final":
            ln = self.body.ln_f
        elif which in ("attn", "mlp"):
            if layer is None:
                raise ValueError(f"norm({which!r}) needs a layer")
            ln = self.blocks[layer].ln_1 if which == "attn" else self.blocks[layer].ln_2
        else:
            raise ValueError(f"which must be 'attn', 'mlp' or 'final'; got {which!r}")
        return Norm(self._real(ln).detach(), self._real(ln, "bias").detach(), ln.eps, centred=True)

    @property
    def W_E(self) -> torch.Tensor:
        """Token embeddings ``[d_vocab, d_model]`` (``wte.weight``)."""
        return self._real(self.body.wte)

    @property
    def W_pos(self) -> torch.Tensor:
        """Learned position embeddings ``[n_ctx, d_model]`` (``wpe.weight``)."""
        return self._real(self.body.wpe)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_vocab, d_model]``: ``lm_head.weight`` (tied to ``wte``), else ``wte``."""
        head = self.lm_head
        return self._real(head) if head is not None else self.W_E

    def embedding_components(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """``[("embed", wte[ids]), ("pos_embed", wpe[positions])]``, float32 ``[..., d_model]``."""
        return [
            ("embed", self.W_E.detach().float()[input_ids]),
            ("pos_embed", self.W_pos.detach().float()[position_ids]),
        ]

    # --- the MLP ---------------------------------------------------------------------------

    def mlp_weights(self, layer: int) -> MLPWeights:
        """Keys ``W_in = c_fc.weight.T``, values ``W_out = c_proj.weight`` (views), GELU."""
        mlp = self.blocks[layer].mlp
        return MLPWeights(
            W_in=self._real(mlp.c_fc).T,
            b_in=self._real(mlp.c_fc, "bias"),
            W_gate=None,
            b_gate=None,
            W_out=self._real(mlp.c_proj),
            b_out=self._real(mlp.c_proj, "bias"),
            act=mlp.act,
        )

    # --- attention -------------------------------------------------------------------------
    #
    # ``c_attn.weight [d_model, 3 * d_model]`` holds q, k, v side by side, each
    # ``[d_model, n_head * d_head]`` with heads contiguous; ``attn.c_proj.weight
    # [n_head * d_head, d_model]`` takes the concatenated head outputs ``z``. So head ``h``
    # computes ``q = ln_1(x) @ W_Q[h] + b_Q[h]`` (likewise k, v) and writes
    # ``z_h @ W_O[h]`` to the residual; ``b_O`` is added once per layer.

    def attn_scale(self, layer: int) -> float:
        """The factor the model multiplies ``q @ k^T`` by in this layer."""
        return float(self.blocks[layer].attn.scaling)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_attn`` output ``[batch, pos, 3 * d_model]`` -> q, k, v each ``[batch, head, pos, d_head]``."""
        q, k, v = qkv.split(self.d_model, dim=-1)
        shape = (*qkv.shape[:-1], self.n_head, self.d_head)
        return tuple(t.reshape(shape).transpose(-3, -2) for t in (q, k, v))  # type: ignore[return-value]

    def attention_pattern(self, layer: int, qkv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention weights ``[batch, head, query, key]`` (float32).

        From the ``c_attn`` output ``[batch, pos, 3 * d_model]`` and ``key_mask [batch, pos]`` (True = real)
        or ``None``. Rows of query positions that see no real key (left padding) are zero.
        """
        q, k, _ = self._split_qkv(qkv.float())
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale(layer)  # [batch, head, query, key]
        n_pos = qkv.shape[-2]
        allowed = torch.ones(n_pos, n_pos, dtype=torch.bool, device=qkv.device).tril()
        allowed = allowed.expand(qkv.shape[0], 1, n_pos, n_pos)
        if key_mask is not None:
            allowed = allowed & key_mask.to(qkv.device).bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def _qkv_weight(self, layer: int, which: int) -> torch.Tensor:
        w = self._real(self.blocks[layer].attn.c_attn)[:, which * self.d_model : (which + 1) * self.d_model]
        return w.reshape(self.d_model, self.n_head, self.d_head).permute(1, 0, 2)  # [head, d_model, d_head]

    def _qkv_bias(self, layer: int, which: int) -> torch.Tensor:
        b = self._real(self.blocks[layer].attn.c_attn, "bias")
        return b[which * self.d_model : (which + 1) * self.d_model].reshape(self.n_head, self.d_head)

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_head, d_model, d_head]`` (views of ``c_attn.weight``)."""
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
        return self._real(self.blocks[layer].attn.c_proj).reshape(self.n_head, self.d_head, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor:
        """Attention output bias ``[d_model]`` (``attn.c_proj.bias``), added once per layer."""
        return self._real(self.blocks[layer].attn.c_proj, "bias")

    # --- running blocks on suffix positions, with the prefix's keys/values given -----------

    def attention_kv(
        self, layer: int, hidden: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, n_kv_head, pos, d_head]`` of block ``layer``.

        Computed from its input ``hidden [batch, pos, d_model]`` (positions ``start ..``; learned positions
        are already in ``hidden``, so ``start`` changes nothing here). Calls ``ln_1`` and ``c_attn``, so hooks
        on them fire (:func:`reslens.hooks.patch` puts none there). Returned on :attr:`device`.
        """
        block = self.blocks[layer]
        with self.loaded(block):
            _, k, v = self._split_qkv(block.attn.c_attn(block.ln_1(hidden)))
        return k.to(self.device), v.to(self.device)

    def run_block_suffix(
        self, layer: int, hidden: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
    ) -> torch.Tensor:
        """Block ``layer`` on positions ``start .. start + q - 1`` only.

        ``start = prefix_k.shape[-2]``: the output a full forward computes there, given the block's input
        ``hidden`` ``[batch, q, d_model]`` at those positions and the keys/values of positions
        ``0 .. start - 1`` (``prefix_k``, ``prefix_v``: ``[batch, head, start, d_head]``, e.g.
        from :meth:`attention_kv`). Exact by causality: positions ``< start`` see nothing later.

        The block gets a one-layer cache whose ``update`` prepends the prefix, and an additive
        float mask ``[1, 1, q, start + q]`` (key ``j`` visible to query ``i`` iff ``j <= start + i``),
        which both ``eager`` and ``sdpa`` attention take (``sdpa`` would otherwise crop the
        keys to ``q`` when it runs causal without a mask). Module hooks (``hooks.patch``) fire
        as in a full forward, on the ``q`` positions. Returns ``[batch, q, d_model]`` on :attr:`device`
        (on a dispatched model the prefix goes to the block's device, where accelerate runs it).
        """
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(
                f"run_block_suffix supports eager and sdpa attention; the model uses {impl!r}"
            )
        start, q = prefix_k.shape[-2], hidden.shape[1]
        query_pos = torch.arange(start, start + q, device=hidden.device)[:, None]
        visible = torch.arange(start + q, device=hidden.device)[None, :] <= query_pos  # [q, start + q]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[None, None]
        on = self._device_of(self.blocks[layer].attn.c_attn)
        cache = PrefixCache(prefix_k.to(on, hidden.dtype), prefix_v.to(on, hidden.dtype))
        with self.loaded(self.blocks[layer]):
            out = self.blocks[layer](
                hidden_states=hidden,
                cache=cache,
                attention_mask=mask,
                encoder_attention_mask=None,
                use_cache=False,
            )
        return out.to(self.device)

    # --- weight edits and cache keys -------------------------------------------------------

    def mlp_out_param(self, layer: int) -> nn.Parameter:
        """``c_proj.weight [d_mlp, d_model]``: the weight a rank-one edit changes."""
        return self.blocks[layer].mlp.c_proj.weight

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``outer(u, v) [d_mlp, d_model]``: ``c_proj.weight`` is stored ``[in, out]``."""
        return torch.outer(u, v)

    def key_parameters(self, layer: int) -> list[torch.Tensor]:
        """``wte``, ``wpe``, every parameter of blocks ``< layer``, and block ``layer`` but ``mlp.c_proj``.

        The parameters themselves; values read from accelerate's weights map where it offloads them.
        """
        params = [self.W_E, self.W_pos]
        for block in range(layer + 1):
            for name, p in self._real_parameters(self.blocks[block]):
                if block < layer or not name.startswith("mlp.c_proj"):
                    params.append(p)
        return params

    def start_token(self, tokenizer: Any) -> int | None:
        """GPT-2 documents start after end-of-text."""
        return getattr(tokenizer, "eos_token_id", None)


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
