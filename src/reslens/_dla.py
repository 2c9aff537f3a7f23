"""What direct logit attribution and the lens's change share: the pieces a block writes, the read direction.

At a position, block ``l`` adds to the residual every head's ``z_h @ W_O[h]`` (through the attention
output norm, linearised at its actual scale, where the family has one:
:meth:`~reslens.arch.Arch.attn_pieces`), the attention output bias (where there is one) and the MLP
output: ``resid[l+1] - resid[l]`` exactly.
The final norm reads a residual ``x`` as ``w · norm(x) = read_direction(w) · x / σ(x) + w · β``, so a
piece ``p`` moves a logit (difference) read at ``x`` by ``u · p / σ(x)``.
"""

from __future__ import annotations

import torch

from reslens.arch import Arch, Norm
from reslens.residuals import Residuals

__all__ = ["block_pieces", "read_direction"]


def block_pieces(arch: Arch, residuals: Residuals, block: int, rows: torch.Tensor, pos: torch.Tensor):
    """``(parts, kind, layer, head)``: what block ``block`` writes at ``(rows, pos)``, piece by piece.

    ``parts``: float32 tensors ``[B, c, d_model]`` (its heads ``[B, n_head, d]``, the attention output
    bias ``[B, 1, d]`` where the family has one, the MLP output ``[B, 1, d]``), summing to what the block
    adds to the residual; ``kind``, ``layer``, ``head``: one entry per piece (``head`` -1 where not a head).
    Reads ``attn_z`` and ``mlp_out``.
    """
    heads, bias = arch.attn_pieces(block, residuals.attn_z[block, rows, pos])  # [B, H, d], [B, d]
    parts = [heads]
    kind, layer, head = ["head"] * arch.n_head, [block] * arch.n_head, list(range(arch.n_head))
    if bias is not None:
        parts.append(bias[:, None])
        kind.append("attn_bias"), layer.append(block), head.append(-1)
    parts.append(residuals.mlp_out[block, rows, pos][:, None])
    kind.append("mlp"), layer.append(block), head.append(-1)
    return parts, kind, layer, head


def read_direction(
    arch: Arch, target: torch.Tensor, against: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Norm]:
    """``(direction, u, norm)``: ``W_U[target] - W_U[against]`` ``[B, d]``, what the final norm reads of it.

    ``u = read_direction(direction)`` (``γ ⊙ direction``, centred for LayerNorm) ``[B, d]``, both float32
    on ``device``; ``norm``: the final norm. ``direction · norm(x) = u · x / σ(x) + direction · β``.
    """
    norm = arch.norm("final")
    w_u = arch.W_U.detach().float().to(device)
    direction = w_u[target] - (w_u[against] if against is not None else 0)  # [B, d]
    # (γ ⊙ direction), centred for LayerNorm, on the weights' device, then back beside the pieces
    u = norm.read_direction(direction.to(norm.weight.device)).to(device)
    return direction, u, norm
