"""Where each per-block site is read, and what a family cannot give: the :class:`Sites` part of an adapter.

:meth:`Sites.site_hook` says which module's hook gives a site and how its payload becomes the tensor,
from the adapter's :class:`~reslens.arch.Layout` (sublayer output norms, fused or routed MLPs), so
:mod:`reslens.hooks` names no module. :attr:`Sites.limits` lists the analyses a family cannot give
exactly, each with its reason; analyses call :meth:`Sites.require` and refuse with that reason.
"""

from __future__ import annotations

from typing import Any

import torch

from reslens.arch._values import PatternHook

__all__ = ["Sites"]


class Sites:
    """Hook points by site, and the analyses a family refuses (mixed into :class:`~reslens.arch.Arch`)."""

    # --- where each per-block site is read ----------------------------------------------------

    def site_hook(self, site: str, layer: int) -> PatternHook:
        """Where and how the per-block ``site`` of ``layer`` is read: a hook and its payload -> the tensor.

        ``attn_out`` / ``mlp_out``: what enters the residual (the output norm's output where the family
        has one); ``resid_mid``: the MLP's (or its norm's) input in a sequential block; ``attn_z``: the
        output projection's input; ``mlp_act`` :meth:`mlp_act_hook`; ``mlp_up`` / ``mlp_gate``: the key
        projections' outputs (halves of a fused one); ``attn_pattern``: :meth:`pattern_hook`.
        """
        def first(out: Any, key_mask: Any) -> torch.Tensor:
            return out[0] if isinstance(out, tuple) else out

        def hidden(payload: Any, key_mask: Any) -> torch.Tensor:
            return self.hidden_of(*payload)

        if site in ("attn_out", "mlp_out"):
            norm = self.attn_out_norm(layer) if site == "attn_out" else self.mlp_out_norm(layer)
            sublayer = self.attn(layer) if site == "attn_out" else self.mlp(layer)
            return PatternHook(sublayer if norm is None else norm, "post", first)
        if site == "resid_mid":
            norm = self.mlp_norm(layer)
            return PatternHook(self.mlp(layer) if norm is None else norm, "pre", hidden)
        if site == "attn_z":
            return PatternHook(self.attn_out_proj(layer), "pre", hidden)
        if site == "mlp_act":
            return self.mlp_act_hook(layer)
        if site == "attn_pattern":
            return self.pattern_hook(layer)
        return self._key_hook(site, layer)

    def _key_hook(self, site: str, layer: int) -> PatternHook:
        if self.layout.experts is not None:
            raise ValueError(f"site {site!r} is per expert in this {self.family} mixture of experts; "
                             "read the routed coefficients of every (expert, neuron) with site 'mlp_act'")
        fused = self.layout.mlp_gate_up_proj
        if fused is not None:
            half = 0 if site == "mlp_gate" else 1
            module = self._in_block(layer, fused)
            return PatternHook(module, "post", lambda out, _: out.chunk(2, dim=-1)[half])
        module = self.mlp_in_proj(layer) if site == "mlp_up" else self.mlp_gate_proj(layer)
        if module is None:
            raise ValueError(f"site 'mlp_gate' needs a gated MLP; this {self.family} model's MLP has no gate")
        return PatternHook(module, "post", lambda out, _: out)

    def mlp_act_hook(self, layer: int) -> PatternHook:
        """Where ``mlp_act`` is read: the input of the MLP's value projection."""
        return PatternHook(self.mlp_out_proj(layer), "pre", lambda payload, _: self.hidden_of(*payload))

    # --- what this family cannot give, and why ------------------------------------------------

    @property
    def limits(self) -> dict[str, str]:
        """Analyses this model cannot give exactly, each with the reason (empty for GPT-2 and Llama)."""
        out = {}
        if self.layout.experts is not None:
            out["rank_one_edit"] = (
                "a rank-one edit changes one MLP's value projection, and this mixture of experts has one per "
                "expert, used only where the router sends a token; ROME is not defined for it")
            out["patch_mlp_act"] = (
                "mlp_act of a mixture of experts is read from the experts' inputs and the router's choice; "
                "replacing it is not supported (patch mlp_out, or resid)")
        if self.layout.q_norm is not None:
            out["qk_circuit"] = (
                "queries and keys pass a norm (QK-norm) after their projections, so the QK circuit is not a "
                "fixed bilinear form of the residual; read attention patterns (site attn_pattern) instead")
        if self.attn_softcap is not None:
            out.setdefault("qk_circuit", "attention scores are soft-capped (tanh), so the QK circuit is not "
                           "a fixed bilinear form of the residual; read attention patterns instead")
        if self.layout.attn_out_norm is not None:
            out["ov_circuit"] = (
                "each head's output passes a norm whose scale depends on every head at that position "
                "before it joins the residual, so the OV circuit is not a fixed linear map; per-head pieces "
                "of attn_out are given at their actual scale (logit attribution)")
        return out

    @property
    def attn_softcap(self) -> float | None:
        """The attention logit soft-cap, or ``None``."""
        return None

    def require(self, analysis: str) -> None:
        """Raise ``ValueError`` with the reason when this model cannot give ``analysis`` (:attr:`limits`)."""
        reason = self.limits.get(analysis)
        if reason is not None:
            raise ValueError(f"{analysis.replace('_', ' ')} is refused on this {self.family} model: {reason}")
