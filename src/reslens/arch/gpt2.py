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

from reslens.arch._base import Arch
from reslens.arch._layout import Layout
from reslens.arch._norm import Norm
from reslens.arch._values import MLPWeights, PatternHook

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
    layout = Layout(
        body="transformer",
        blocks="h",
        embed="wte",
        pos_embed="wpe",
        final_norm="ln_f",
        attn="attn",
        attn_norm="ln_1",
        attn_key_proj="attn.c_attn",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_norm="ln_2",
        mlp_in_proj="mlp.c_fc",
        mlp_out_proj="mlp.c_proj",
        body_args=("input_ids", "cache", "attention_mask", "token_type_ids", "position_ids"),
    )
    legacy_checkpoint_keys = (r"\.attn\.masked_bias$",)  # the attention mask's fill value (transformers 3)

    def __post_init__(self) -> None:
        from transformers import GPT2LMHeadModel, GPT2Model

        if not isinstance(self.model, (GPT2LMHeadModel, GPT2Model)):
            raise TypeError(
                f"model must be a HuggingFace GPT2LMHeadModel or GPT2Model; got {type(self.model).__name__}"
            )

    # --- the attention pattern's hook point -----------------------------------------------

    def pattern_hook(self, layer: int) -> PatternHook:
        """A post-hook on ``c_attn``: the pattern from its fused q/k/v output."""
        return PatternHook(
            self.blocks[layer].attn.c_attn,
            "post",
            lambda qkv, key_mask: self.attention_pattern(layer, qkv, key_mask),
        )

    # --- sizes -----------------------------------------------------------------------------

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

    # --- norms ---------------------------------------------------------------------------------

    def norm_of(self, module: nn.Module) -> Norm:
        """A ``LayerNorm`` (``ln_1``, ``ln_2``, ``ln_f``) as data: centred, with its bias."""
        weight, bias = self._real(module).detach(), self._real(module, "bias").detach()
        return Norm(weight, bias, module.eps, centred=True)

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
        return self._masked_softmax(scores, layer, key_mask)

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

    def block_kwargs(self, layer: int, hidden: torch.Tensor, start: int) -> dict[str, Any]:
        """No cross-attention: learned positions are already in ``hidden``."""
        return {"encoder_attention_mask": None}

    # --- weight edits and cache keys -------------------------------------------------------

    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``outer(u, v) [d_mlp, d_model]``: ``c_proj.weight`` is stored ``[in, out]``."""
        return torch.outer(u, v)

    def start_token(self, tokenizer: Any) -> int | None:
        """GPT-2 documents start after end-of-text."""
        return getattr(tokenizer, "eos_token_id", None)
