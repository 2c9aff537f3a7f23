"""Sublayer outputs rebuilt from their pieces: the :class:`Pieces` part of an adapter.

``attn_out`` from the heads' outputs and ``mlp_out`` from the memories' coefficients, through the
norm some families put on a sublayer's output before it joins the residual (Gemma 2/3, OLMo 2),
linearised at its actual scale where pieces are asked for, so that they still sum exactly.
"""

from __future__ import annotations

from typing import Literal

import torch

from reslens.arch._norm import Norm

__all__ = ["Pieces"]


class Pieces:
    """Per-head and per-memory pieces of the sublayer outputs (mixed into :class:`~reslens.arch.Arch`)."""

    def out_norm(self, which: Literal["attn", "mlp"], layer: int) -> Norm | None:
        """The norm a sublayer's output passes before it is added to the residual, or ``None``.

        Gemma 2/3 (four norms a block) and OLMo 2 (norms after each sublayer): ``attn_out`` and
        ``mlp_out`` are this norm's outputs, what enters the residual.
        """
        if which not in ("attn", "mlp"):
            raise ValueError(f"which must be 'attn' or 'mlp'; got {which!r}")
        module = self.attn_out_norm(layer) if which == "attn" else self.mlp_out_norm(layer)
        return None if module is None else self.norm_of(module)

    def attn_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``attn_out [..., d_model]`` (float32) of the heads' outputs ``attn_z [..., n_head * d_head]``.

        ``Σ_h z_h @ W_O[h] + b_O``, through :meth:`out_norm` where the family has one.
        """
        w_o = self.W_O(layer).detach().float().to(z.device)  # [H, dh, d]
        out = torch.einsum("...hd,hde->...e", self.split_heads(z.float()), w_o)
        b_o = self.b_O(layer)
        out = out if b_o is None else out + b_o.detach().float().to(z.device)
        norm = self.out_norm("attn", layer)
        return out if norm is None else norm(out).float()

    def attn_pieces(self, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head pieces of ``attn_out`` ``[..., n_head, d_model]``, the bias's ``[..., d_model]`` or None.

        ``z_h @ W_O[h]`` and ``b_O``, float32. Where the heads' sum passes a norm before it joins the
        residual (Gemma 2/3, OLMo 2), every piece goes through that norm linearised at its actual scale
        (``γ ⊙ p / σ(Σ p)``, the scale of the whole output at that position held fixed), so the pieces
        still sum to ``attn_out`` exactly.
        """
        w_o = self.W_O(layer).detach().float().to(z.device)  # [H, dh, d]
        heads = torch.einsum("...hd,hde->...he", self.split_heads(z.float()), w_o)
        b_o = self.b_O(layer)
        bias = None if b_o is None else b_o.detach().float().to(z.device).expand(heads[..., 0, :].shape)
        norm = self.out_norm("attn", layer)
        if norm is None:
            return heads, bias
        if norm.centred or norm.bias is not None:
            raise NotImplementedError(f"a centred or biased output norm ({self.family}) is not linearised")
        total = heads.sum(-2) + (0 if bias is None else bias)
        factor = norm.gamma.to(z.device) / norm.scale(total)[..., None]  # [..., d]
        return heads * factor[..., None, :], None if bias is None else bias * factor

    def mlp_out_factor(self, layer: int, act: torch.Tensor) -> torch.Tensor | None:
        """``γ / σ [..., d_model]`` of the MLP's output norm at ``mlp_act [..., d_mlp]``, None without one.

        A memory's piece of ``mlp_out`` is then ``m_i v_i ⊙ factor`` (the norm linearised at the actual
        scale of the whole output at that position), and the pieces sum to ``mlp_out`` exactly.
        """
        norm = self.out_norm("mlp", layer)
        if norm is None:
            return None
        if norm.centred or norm.bias is not None:
            raise NotImplementedError(f"a centred or biased output norm ({self.family}) is not linearised")
        weights = self.mlp_weights(layer)
        raw = act.float() @ weights.W_out.detach().float().to(act.device)
        if weights.b_out is not None:
            raw = raw + weights.b_out.detach().float().to(act.device)
        return norm.gamma.to(act.device) / norm.scale(raw)[..., None]

    def mlp_output(self, layer: int, act: torch.Tensor) -> torch.Tensor:
        """``mlp_out [..., d_model]`` (float32) of ``mlp_act [..., d_mlp]``: ``Σ_i m_i v_i + b_out``, normed.

        Through :meth:`out_norm` where the family has one.
        """
        weights = self.mlp_weights(layer)
        out = act.float() @ weights.W_out.detach().float().to(act.device)
        if weights.b_out is not None:
            out = out + weights.b_out.detach().float().to(act.device)
        norm = self.out_norm("mlp", layer)
        return out if norm is None else norm(out).float()

    def unembed_raw(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`unembed` before the final soft-cap (the same where the family has none)."""
        w_u, b_u = self.W_U, self.b_U
        b_u = None if b_u is None else b_u.detach()
        return torch.nn.functional.linear(x.to(w_u.device), w_u.detach(), b_u)

    @property
    def final_softcap(self) -> float | None:
        """Gemma 2's final-logit soft-cap ``c`` (logits become ``c · tanh(l / c)``), or ``None``."""
        return getattr(self.config, "final_logit_softcapping", None)

    def softcap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` through :attr:`final_softcap` as the LM computes it (unchanged without one)."""
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
