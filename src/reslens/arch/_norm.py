"""Norms as data: LayerNorm and RMSNorm as one value that analyses apply and read through."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Norm"]


@dataclass(frozen=True, eq=False)
class Norm:
    """A LayerNorm or RMSNorm as data: ``y = γ ⊙ centre(x) / σ(x) + β``.

    - ``weight``: ``γ [d_model]`` (the module's own tensor, detached; never copied or folded)
    - ``bias``: ``β [d_model]``, or ``None`` (RMSNorm)
    - ``eps``: added to the variance (LayerNorm) or the mean square (RMSNorm)
    - ``centred``: LayerNorm subtracts the mean first; RMSNorm does not
    - ``offset``: added to ``weight`` to give ``γ`` (Gemma stores ``w`` and scales by ``1 + w``)
    - ``upcast``: RMSNorm multiplies by ``γ`` in float32 and casts after (Gemma, OLMo 2), not before (Llama)
    - ``identity``: no norm at all (OLMo 2 has none before its sublayers): ``norm(x) = x``, ``σ = 1``

    ``norm(x)`` computes exactly what the HuggingFace module computes (LayerNorm through
    ``torch.nn.functional.layer_norm``, RMSNorm in float32 as Llama's ``RMSNorm`` does) without
    calling the module, so no hook fires.

    >>> ln = torch.nn.LayerNorm(4)
    >>> x = torch.randn(2, 4)
    >>> norm = Norm(ln.weight.detach(), ln.bias.detach(), ln.eps, centred=True)
    >>> bool(torch.equal(norm(x), ln(x).detach()))
    True
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    centred: bool
    offset: float = 0.0
    upcast: bool = False
    identity: bool = False

    @classmethod
    def none(cls, like: torch.Tensor) -> Norm:
        """The absent norm of a sublayer that reads the residual directly: ``γ = 1``, ``σ = 1``."""
        return cls(torch.ones(like.shape[-1], dtype=like.dtype, device=like.device), None, 0.0,
                   centred=False, identity=True)

    @property
    def kind(self) -> str:
        """``"layernorm"``, ``"rmsnorm"`` or ``"identity"``."""
        return "identity" if self.identity else "layernorm" if self.centred else "rmsnorm"

    @property
    def gamma(self) -> torch.Tensor:
        """``γ [d_model]`` in float32: the weight plus :attr:`offset` (Gemma's ``1 + w``)."""
        return self.weight.float() + self.offset if self.offset else self.weight.float()

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """``x - mean(x)`` over the last axis for LayerNorm; ``x`` itself for RMSNorm."""
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``σ(x) [...]`` in float32: ``sqrt(var(x) + eps)`` (LayerNorm), ``sqrt(mean(x²) + eps)`` (RMS)."""
        x = x.float()
        if self.identity:
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        if self.centred:
            return torch.sqrt(x.var(-1, unbiased=False) + self.eps)
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of ``x [..., d_model]``, as the module computes it (in ``x``'s dtype for LayerNorm)."""
        if self.identity:
            return x
        if self.centred:
            weight = self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.upcast:  # Gemma: (x̂ * (1 + w)).type_as(x); OLMo 2: (w * x̂).to(dtype)
            out = (h * self.gamma).to(dtype)
            return out if self.bias is None else out + self.bias
        out = self.weight * h.to(dtype)
        return out if self.bias is None else out + self.bias

    def read_direction(self, w: torch.Tensor) -> torch.Tensor:
        """The residual direction a reader ``w [..., d_model]`` behind this norm actually reads.

        ``centre(w ⊙ γ)`` (float32; no centring for RMSNorm). ``w · norm(x) = read_direction(w) · x /
        σ(x) + w · β``.
        """
        return self.centre(w.float() * self.gamma)
