"""The batched forward of a patchscope: many patched copies of one target prompt in one staged forward.

A row writes a vector ``h [d_model]`` into ``resid`` layer ``T`` (its *join* layer, ``0..n_layer``) of the
target prompt ``ids [n]`` at position ``p``, and reads the final residual (the final norm's input) at the
prompt's last position ``n - 1 >= p``. Every shortcut is exact by causality, as in causal tracing's
engine (:mod:`reslens.tracing._engine`):

- positions ``< p`` are the clean run's in every block, whatever is patched: their keys/values are
  computed once per block (:meth:`~reslens.arch.Arch.attention_kv`) and shared by every row;
- a row equals the clean run below block ``T``, so it joins the forward there, from the clean
  ``resid T`` at positions ``p ..`` with position ``p`` replaced by ``h``; rows sorted by ``T`` keep
  the active rows a prefix of the batch;
- only positions ``p .. n - 1`` are computed (one position for the token-identity prompt, patched and
  read at its last token), each block by :meth:`~reslens.arch.Arch.run_block_suffix`.
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from reslens._inputs import Batch
from reslens.arch import Arch
from reslens.hooks import _capture

__all__ = ["TargetRun"]


class TargetRun:
    """The clean run of a target prompt ``ids [n]`` (on the model's device), to be patched at ``position``."""

    def __init__(self, arch: Arch, ids: torch.Tensor, position: int) -> None:
        self.arch, self.ids, self.position = arch, ids, position
        batch = Batch.from_ids(ids[None])
        res = _capture(arch, batch, sites=("resid",), layers=tuple(range(arch.n_layer + 1)))
        self.resid = res.resid[:, 0]  # [n_layer + 1, n, d_model]: the clean run
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefix(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[1, n_kv_head, position, d_head]`` of the clean positions ``< position``."""
        if block not in self._kv:
            arch, p = self.arch, self.position
            if p == 0:
                empty = self.resid.new_zeros((1, arch.n_kv_head, 0, arch.d_head))
                self._kv[block] = (empty, empty)
            else:
                with torch.no_grad():
                    self._kv[block] = arch.attention_kv(block, self.resid[block][None, :p], start=0)
        return self._kv[block]

    def run(self, joins: list[int], h: torch.Tensor) -> torch.Tensor:
        """The final residual ``[rows, d_model]`` at the last position of rows ``h [rows, d_model]``.

        Row ``i`` is written into ``resid`` layer ``joins[i]`` at :attr:`position`; ``joins`` must be
        sorted (ascending). One staged forward: a row runs blocks ``joins[i] .. n_layer - 1`` only.
        """
        arch, n_layer, p = self.arch, self.arch.n_layer, self.position
        if not joins:
            return h.new_empty((0, arch.d_model))
        hidden = h.new_empty((0, self.ids.shape[0] - p, arch.d_model))  # the active rows, positions p ..
        with torch.no_grad():
            for b in range(joins[0], n_layer + 1):
                have, now = hidden.shape[0], bisect_right(joins, b)
                if now > have:  # rows joining at resid b: the clean run there, h at position p
                    new = self.resid[b][p:].to(h.dtype).expand(now - have, -1, -1).clone()
                    new[:, 0] = h[have:now]
                    hidden = torch.cat([hidden, new])
                if b < n_layer:
                    k, v = self.prefix(b)
                    rows = hidden.shape[0]  # one prefix for every row: a view, not a copy
                    hidden = arch.run_block_suffix(b, hidden, k.expand(rows, -1, -1, -1),
                                                   v.expand(rows, -1, -1, -1))
        return hidden[:, -1]
