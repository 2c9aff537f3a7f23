"""The Llama family: HuggingFace Llama, SmolLM2 (``model_type="llama"``), Mistral and Qwen2, as one layout.

All four share the module layout ``model.embed_tokens``, ``model.layers[i].{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``,
``model.rotary_emb`` and ``lm_head`` (tied to ``embed_tokens`` or not); the behaviour is
:class:`~reslens.arch.decoder.Decoder`'s:

- **RMSNorm** (no centring, no bias, cast before ``γ``): ``Norm(centred=False, bias=None)``.
- **Rotary positions** from the model's own ``rotary_emb`` and ``apply_rotary_pos_emb``;
  ``resid[0]`` is the token embedding alone.
- **Grouped-query attention**: ``W_K``/``W_V`` expanded to query heads, ``W_K_kv``/``W_V_kv`` stored.
- **Gated MLP**: ``down(act(gate·x̂) ⊙ (up·x̂))``; ``mlp_act`` (the input of ``down_proj``) is the gated
  product, so ``mlp_out = mlp_act @ W_out`` exactly.
- Qwen2's q/k/v biases; Mistral's (and Qwen2's per-layer) sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

from reslens.arch._layout import Layout
from reslens.arch.decoder import Decoder

__all__ = ["Llama", "MODEL_TYPES", "LLAMA_LAYOUT"]

MODEL_TYPES = ("llama", "mistral", "qwen2")

#: the Llama layout, which most rotary families share with a few fields changed
LLAMA_LAYOUT = Layout(
    body="model",
    blocks="layers",
    embed="embed_tokens",
    final_norm="norm",
    attn="self_attn",
    attn_norm="input_layernorm",
    attn_key_proj="self_attn.k_proj",
    attn_out_proj="self_attn.o_proj",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    mlp="mlp",
    mlp_norm="post_attention_layernorm",
    mlp_in_proj="mlp.up_proj",
    mlp_gate_proj="mlp.gate_proj",
    mlp_out_proj="mlp.down_proj",
    body_args=("input_ids", "attention_mask", "position_ids", "cache"),
)


@dataclass(frozen=True, eq=False, repr=False)
class Llama(Decoder):
    """A read-only view of a HuggingFace Llama, Mistral or Qwen2 model.

    ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` or their bare ``…Model`` bodies.
    """

    family = "llama"
    layout = LLAMA_LAYOUT
    model_types = MODEL_TYPES
