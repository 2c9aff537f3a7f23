"""Captured activations of one forward pass: :class:`Residuals`, the input of every analysis.

Sites and shapes (``L`` = number of kept layers or blocks):

============  =====================================  ==========================================
site          shape                                   what it is
============  =====================================  ==========================================
resid         ``[L, batch, pos, d_model]``            input of block ``l`` (``resid[0]`` = the embedding);
                                                      layer ``n_layer`` = raw residual before the final norm
resid_mid     ``[L, batch, pos, d_model]``            after attention: ``resid[l] + attn_out[l]``
attn_out      ``[L, batch, pos, d_model]``            attention output (after its output projection)
mlp_out       ``[L, batch, pos, d_model]``            MLP output (after its output projection)
mlp_act       ``[L, batch, pos, d_mlp]``              the MLP's coefficients: the input of its output
                                                      projection (post-GELU for GPT-2)
attn_pattern  ``[L, batch, head, query, key]``        softmax attention (float32, recomputed from q, k)
attn_z        ``[L, batch, pos, n_head * d_head]``    per-head attention outputs ``z`` side by side (the
                                                      input of the attention output projection; head
                                                      ``h`` writes ``z_h @ W_O[h]``)
mlp_up        ``[L, batch, pos, d_mlp]``              the MLP's (up) key pre-activations ``x̂ @ W_in.T + b_in``
                                                      (GPT-2: the output of its one input projection)
mlp_gate      ``[L, batch, pos, d_mlp]``              the gate pre-activations ``x̂ @ W_gate.T`` (gated MLPs
                                                      only): ``mlp_act = act(mlp_gate) * mlp_up``
final         ``[batch, pos, d_model]``               the final norm's output
logits        ``[batch, pos, d_vocab]``               the model's logits
============  =====================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from reslens._checks import check_dtype, check_sites
from reslens._saving import Saveable
from reslens._text import html_table

__all__ = ["SITES", "BLOCK_SITES", "Residuals"]

BLOCK_SITES = ("resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_pattern", "attn_z", "mlp_up", "mlp_gate")
SITES = ("resid", *BLOCK_SITES, "final", "logits")


@dataclass(frozen=True, repr=False)
class Residuals(Saveable):
    """Activations captured from one forward pass. Shapes are checked on construction.

    ``layers`` are the residual-stream layers kept in ``resid`` (0..n_layer); ``blocks`` the
    blocks kept in the per-block sites (0..n_layer-1). ``resid[i]`` is layer ``layers[i]``;
    use :meth:`get` to index by the true layer number. Sites not captured are ``None``
    (:meth:`get` raises for them, naming what was captured).

    - ``attention_mask: [batch, pos]`` bool (True = real token)
    - ``input_ids``, ``position_ids``: ``[batch, pos]``; ``special_mask: [batch, pos]`` bool (special tokens
      such as BOS added by :func:`~reslens.tokenize`, or ``None``); :attr:`stat_mask` = real and not special
    - ``resid: [len(layers), batch, pos, d_model]``
    - ``resid_mid``, ``attn_out``, ``mlp_out``: ``[len(blocks), batch, pos, d_model]``
    - ``mlp_act``, ``mlp_up``, ``mlp_gate``: ``[len(blocks), batch, pos, d_mlp]``
    - ``attn_pattern: [len(blocks), batch, head, pos, pos]``
    - ``attn_z: [len(blocks), batch, pos, n_head * d_head]`` (input of the attention output projection)
    - ``final: [batch, pos, d_model]``; ``logits: [batch, pos, d_vocab]``
    """

    attention_mask: torch.Tensor
    layers: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    resid: torch.Tensor | None = None
    resid_mid: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    mlp_act: torch.Tensor | None = None
    mlp_up: torch.Tensor | None = None
    mlp_gate: torch.Tensor | None = None
    attn_pattern: torch.Tensor | None = None
    attn_z: torch.Tensor | None = None
    final: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    special_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "blocks", tuple(int(block) for block in self.blocks))
        if not isinstance(self.attention_mask, torch.Tensor) or self.attention_mask.ndim != 2:
            got = (
                tuple(self.attention_mask.shape)
                if isinstance(self.attention_mask, torch.Tensor)
                else self.attention_mask
            )
            raise ValueError(f"attention_mask must be a [batch, pos] tensor; got {got!r}")
        batch, n_pos = self.attention_mask.shape
        for name in ("input_ids", "position_ids", "special_mask"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch, n_pos):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(batch, n_pos)}")
        expect = {"resid": (len(self.layers), batch, n_pos)}
        expect.update(
            {
                site: (len(self.blocks), batch, n_pos)
                for site in ("resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_z", "mlp_up", "mlp_gate")
            }
        )
        expect.update({"final": (batch, n_pos), "logits": (batch, n_pos)})
        for site, lead in expect.items():
            t = getattr(self, site)
            if t is not None and tuple(t.shape[: len(lead)]) != lead:
                raise ValueError(f"{site} has shape {tuple(t.shape)}; expected leading dims {lead}")
        p = self.attn_pattern
        if p is not None and (
            p.ndim != 5
            or (p.shape[0], p.shape[1], p.shape[3], p.shape[4]) != (len(self.blocks), batch, n_pos, n_pos)
        ):
            raise ValueError(
                f"attn_pattern has shape {tuple(p.shape)}; "
                f"expected {(len(self.blocks), batch, 'head', n_pos, n_pos)}"
            )

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites that hold a tensor."""
        return tuple(site for site in SITES if getattr(self, site) is not None)

    @property
    def stat_mask(self) -> torch.Tensor:
        """``[batch, pos]`` bool: the positions statistics count (real tokens, not special ones like BOS)."""
        if self.special_mask is None:
            return self.attention_mask
        return self.attention_mask & ~self.special_mask.to(self.attention_mask.device).bool()

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, pos)``."""
        return tuple(self.attention_mask.shape)  # type: ignore[return-value]

    def get(self, site: str, layer: int | None = None) -> torch.Tensor:
        """The tensor of ``site`` at true layer/block number ``layer``.

        Negatives count from the last kept one; not needed for ``final``/``logits``.
        """
        check_sites((site,), SITES, name="site")
        tensor = getattr(self, site)
        if tensor is None:
            raise ValueError(
                f"site {site!r} was not captured; captured sites: {', '.join(self.sites) or 'none'}"
            )
        if site in ("final", "logits"):
            return tensor
        kept = self.layers if site == "resid" else self.blocks
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int layer number for {site!r}; got {layer!r}")
        if layer < 0 and kept:
            layer = kept[-1] + 1 + layer
        if layer not in kept:
            raise ValueError(f"layer={layer} was not captured for {site!r}; kept layers: {kept}")
        return tensor[kept.index(layer)]

    def require(self, *sites: str, what: str = "this analysis") -> None:
        """Raise a ``ValueError`` naming the missing sites unless every one of ``sites`` was captured."""
        missing = [site for site in sites if getattr(self, site) is None]
        if missing:
            raise ValueError(
                f"{what} needs the site(s) {', '.join(missing)}, which these Residuals lack (captured: "
                f"{', '.join(self.sites) or 'none'}); capture with "
                f"sites=({', '.join(repr(s) for s in sites)},)"
            )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Residuals:
        """A copy on ``device``; ``dtype`` casts the floating activations (not ids or the mask)."""
        check_dtype(dtype)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.dtype.is_floating_point) else None
                changes[f.name] = value.to(device=device, dtype=cast)
        return replace(self, **changes)

    def _summary(self) -> list[tuple[str, str]]:
        rows = []
        for site in self.sites:
            t = getattr(self, site)
            kept = self.layers if site == "resid" else self.blocks if site in BLOCK_SITES else ()
            where = f"layers {list(kept)}" if site == "resid" else f"blocks {list(kept)}" if kept else ""
            rows.append((site, f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} {where}".strip()))
        return rows

    def __repr__(self) -> str:
        batch, n_pos = self.shape
        sites = ", ".join(f"{site}{list(getattr(self, site).shape)}" for site in self.sites)
        return f"Residuals(batch={batch}, pos={n_pos}, real tokens={int(self.attention_mask.sum())}; {sites})"

    def _repr_html_(self) -> str:
        batch, n_pos = self.shape
        note = f"{batch} sequences x {n_pos} positions, {int(self.attention_mask.sum())} real tokens"
        return html_table("Residuals", ("site", "shape, dtype, layers"), self._summary(), note=note)
