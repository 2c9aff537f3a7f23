"""Every rotary family beyond Llama: a :class:`~reslens.arch.Layout` each, a few lines where a config decides.

Each family's traps, read from the installed transformers modelling code:

- **Gemma** (1): RMSNorm scaling by ``1 + w`` in float32 (``rms_gemma``), embeddings scaled by
  ``√d_model`` in the model's dtype (the embedding module's ``embed_scale``), GeGLU.
- **Gemma 2**: four norms a block: ``attn_out`` / ``mlp_out`` are the outputs of
  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` (what enters the residual), the MLP
  reads ``pre_feedforward_layernorm``; attention logit soft-capping (in the recomputed pattern) and
  final-logit soft-capping (in :meth:`~reslens.arch.Arch.unembed`, so the lens's last row is the
  logits); sliding layers.
- **Gemma 3** (``gemma3_text``, or the text model of ``gemma3``): Gemma 2's block plus QK-norm per
  head, local and global rotary bases (``rotary_emb(..., layer_type)``), 5:1 sliding/global layers.
- **Qwen3**: QK-norm per head. **OLMo 2**: no norm before a sublayer, a norm after each, QK-norm
  over the whole projection, RMSNorm with ``γ`` applied in float32 (``rms_upcast``).
- **GPT-NeoX / Pythia**: parallel residual (``use_parallel_residual``: both sublayers read the
  block's input, so ``resid_mid = resid + attn_out`` is what the MLP would have read in a sequential
  block, not what it reads), partial rotary (the model's own ``apply_rotary_pos_emb``), a fused
  ``query_key_value`` interleaved per head, LayerNorm with bias, an untied unembedding.
- **Phi-3**: fused ``qkv_proj`` (``[q; k; v]``) and ``gate_up_proj`` (``[gate; up]``).
- **Mixtral, OLMoE, Qwen3-MoE**: routed experts; a memory is ``(layer, expert, neuron)``, index
  ``expert * d_expert + neuron`` of ``mlp_act``, whose coefficient includes the router's weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reslens.arch._layout import Layout
from reslens.arch.decoder import Decoder
from reslens.arch.llama import LLAMA_LAYOUT

__all__ = ["Gemma", "Gemma2", "Gemma3", "Qwen3", "Olmo2", "GPTNeoX", "Phi3", "MoE", "FAMILY_ADAPTERS"]

_GEMMA = replace(LLAMA_LAYOUT, norm_style="rms_gemma", body_args=())
_SANDWICH = replace(_GEMMA, mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                    mlp_out_norm="post_feedforward_layernorm")
_QK_NORM = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_EXPERTS = dict(mlp_in_proj="mlp.experts", mlp_gate_proj=None, mlp_out_proj="mlp.experts",
                experts="mlp.experts", router="mlp.gate")


@dataclass(frozen=True, eq=False, repr=False)
class Gemma(Decoder):
    """Gemma 1: Llama's layout with Gemma's ``1 + w`` RMSNorm and scaled embeddings."""

    family = "gemma"
    layout = _GEMMA
    model_types = ("gemma",)


@dataclass(frozen=True, eq=False, repr=False)
class Gemma2(Decoder):
    """Gemma 2: four norms a block, soft-capped attention and logits."""

    family = "gemma2"
    layout = _SANDWICH
    model_types = ("gemma2",)


@dataclass(frozen=True, eq=False, repr=False)
class Gemma3(Decoder):
    """Gemma 3's text model: Gemma 2's block, QK-norm, local and global rotary bases."""

    family = "gemma3"
    layout = replace(_SANDWICH, **_QK_NORM)
    model_types = ("gemma3_text",)


@dataclass(frozen=True, eq=False, repr=False)
class Qwen3(Decoder):
    """Qwen3: Llama's layout with QK-norm per head."""

    family = "qwen3"
    layout = replace(LLAMA_LAYOUT, body_args=(), **_QK_NORM)
    model_types = ("qwen3",)


@dataclass(frozen=True, eq=False, repr=False)
class Olmo2(Decoder):
    """OLMo 2: norms after each sublayer and none before, QK-norm over the whole projection."""

    family = "olmo2"
    layout = replace(LLAMA_LAYOUT, body_args=(), attn_norm=None, mlp_norm=None,
                     attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                     qk_norm_per_head=False, norm_style="rms_upcast", **_QK_NORM)
    model_types = ("olmo2",)


_NEOX = Layout(
    body="gpt_neox", blocks="layers", embed="embed_in", final_norm="final_layer_norm", attn="attention",
    attn_norm="input_layernorm", attn_key_proj="attention.query_key_value", attn_out_proj="attention.dense",
    qkv_proj="attention.query_key_value", qkv_per_head=True, mlp="mlp", mlp_norm="post_attention_layernorm",
    mlp_in_proj="mlp.dense_h_to_4h", mlp_out_proj="mlp.dense_4h_to_h", mlp_act_fn="act",
    norm_style="layernorm", cache_arg="layer_past",
)


@dataclass(frozen=True, eq=False, repr=False)
class GPTNeoX(Decoder):
    """GPT-NeoX and Pythia: a parallel residual (or sequential, as the config says), fused per-head q/k/v."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)

    @property
    def layout(self) -> Layout:  # type: ignore[override]
        return replace(_NEOX, parallel=bool(self.model.config.use_parallel_residual))

    @property
    def n_kv_head(self) -> int:
        """Every head has its own keys and values."""
        return self.n_head


@dataclass(frozen=True, eq=False, repr=False)
class Phi3(Decoder):
    """Phi-3: fused ``qkv_proj`` and ``gate_up_proj``."""

    family = "phi3"
    layout = replace(LLAMA_LAYOUT, body_args=(), q_proj=None, k_proj=None, v_proj=None,
                     qkv_proj="self_attn.qkv_proj", attn_key_proj="self_attn.qkv_proj",
                     mlp_gate_up_proj="mlp.gate_up_proj", mlp_in_proj="mlp.gate_up_proj", mlp_gate_proj=None,
                     mlp_act_fn="activation_fn")
    model_types = ("phi3",)


@dataclass(frozen=True, eq=False, repr=False)
class MoE(Decoder):
    """Sparse mixtures of experts on Llama's block: Mixtral, OLMoE (QK-norm on the projection), Qwen3-MoE."""

    model_types = ("mixtral", "olmoe", "qwen3_moe")

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.model.config.model_type

    def __post_init__(self) -> None:
        super().__post_init__()
        config = self.model.config
        reason = None
        if getattr(config, "clip_qkv", None) is not None:
            reason = f"clip_qkv={config.clip_qkv} clamps queries, keys and values (no head is linear)"
        elif getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            reason = "some layers have a dense MLP instead of experts (mlp_only_layers / decoder_sparse_step)"
        if reason is not None:
            raise TypeError(f"this {config.model_type} model is refused: {reason}")

    @property
    def layout(self) -> Layout:  # type: ignore[override]
        model_type = self.model.config.model_type
        if model_type == "olmoe":
            return replace(LLAMA_LAYOUT, body_args=(), qk_norm_per_head=False, **_QK_NORM, **_EXPERTS)
        extra = _QK_NORM if model_type == "qwen3_moe" else {}
        return replace(LLAMA_LAYOUT, body_args=(), **extra, **_EXPERTS)


#: ``config.model_type`` -> adapter class, for every family above
FAMILY_ADAPTERS = {
    model_type: cls for cls in (Gemma, Gemma2, Gemma3, Qwen3, Olmo2, GPTNeoX, Phi3, MoE)
    for model_type in cls.model_types
}
