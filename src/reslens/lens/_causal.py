r"""The bench's causal check: does editing the residual along a lens's direction for a token move the output?

For a sampled position ``p`` of a corpus window, a ``resid`` layer ``l`` and a lens, with ``h = resid[l][p]``:

- the token ``t``: the lens's top-1 at ``(l, p)`` when it differs from the output's top-1 there, else the
  lens's top-2 (always a token the output does not already predict, so a move toward it is visible);
- the lens's direction: ``g = d/dh log p_lens(t | h)`` (autograd through the lens's translation, the final
  norm and the unembedding: exact for the logit lens, linear lenses, and the patchscope, whose target
  prompt is run differentiably from its join layer on);
- the edit ``h + s ||h|| g / ||g||`` (``s``: ``scale``) and a random edit ``h + s ||h|| r / ||r||`` with
  ``r ~ N(0, I)`` (one per position and layer, shared by every lens, so the lenses face the same control);
- the effect: ``Δ = log p_out(t | edited) - log p_out(t | clean)`` of the model's output at ``p``, by an
  exact patched forward: the window up to ``p`` is captured once, and every edit (all layers, all lenses,
  the random ones) runs as one batch of rows from its layer on, at position ``p`` only, with the clean
  keys and values of the earlier positions (:class:`reslens.lens._scope_forward.TargetRun`; exact by
  causality).

Per lens and layer the sums of ``Δ_lens``, ``Δ_random``, of ``[Δ_lens > Δ_random]`` and the count are
kept (float64) and summed over the ranks, so the merged means are the one-process ones. A lens whose
gradient is zero at a position (nothing to follow), or a residual of norm zero (an edit of size zero),
counts no edit there.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import torch

from reslens._distributed import Shard
from reslens._stream import batch_of
from reslens.lens._scope_forward import TargetRun

__all__ = ["CausalSums", "sample_positions", "causal_check"]


class CausalSums:
    """``[K, R]`` float64 sums: Δ of the lens edit, Δ of the random edit, lens wins, edits counted."""

    def __init__(self, n_lens: int, n_rows: int) -> None:
        self.sums = torch.zeros(4, n_lens, n_rows, dtype=torch.float64)
        self.n_edited = 0

    def merge(self, shard: Shard) -> None:
        if shard.parallel:
            count = torch.tensor([float(self.n_edited)], dtype=torch.float64)
            both = shard.sum(torch.cat([self.sums.flatten(), count]))
            self.sums, self.n_edited = both[:-1].view(self.sums.shape), int(both[-1])

    def means(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean Δ lens, mean Δ random, fraction lens > random)``, each ``[K, R]`` float32 (NaN: none)."""
        n = self.sums[3]
        return tuple(torch.where(n > 0, s / n.clamp(min=1), torch.nan).float() for s in self.sums[:3])


def sample_positions(windows: list[list[int]], start: tuple[int, ...], n: int,
                     seed: int) -> list[tuple[int, int]]:
    """``n`` distinct ``(window, position)`` pairs (positions count the start tokens), uniform, seeded."""
    cells = [(w, len(start) + i) for w, window in enumerate(windows) for i in range(len(window))]
    if n >= len(cells):
        return cells
    pick = torch.randperm(len(cells), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [cells[i] for i in pick.tolist()]


def _scope_final(scope: Any, run_layers: list[int], h: torch.Tensor) -> torch.Tensor:
    """A patchscope's translation of rows ``h [L, d]`` at ``resid`` layers ``run_layers``, differentiably."""
    arch = scope._arch
    if scope._run is None:
        scope._run = TargetRun(arch, scope.target_ids, scope.position)
    run, n_layer, p = scope._run, arch.n_layer, scope.position
    out = [None] * len(run_layers)
    pending = [(scope.target_layer(layer), i) for i, layer in enumerate(run_layers) if layer != n_layer]
    for i, layer in enumerate(run_layers):
        if layer == n_layer:
            out[i] = h[i]
    pending.sort()
    joins = [j for j, _ in pending]
    hidden = h.new_empty((0, run.ids.shape[0] - p, arch.d_model))
    for b in range(joins[0] if joins else n_layer + 1, n_layer + 1):
        have, now = hidden.shape[0], bisect_right(joins, b)
        if now > have:
            new = run.resid[b][p:].to(h.dtype).expand(now - have, -1, -1)
            rows = torch.stack([h[i] for _, i in pending[have:now]])
            new = torch.cat([rows[:, None], new[:, 1:]], dim=1)
            hidden = torch.cat([hidden, new])
        if b < n_layer:
            k, v = run.prefix(b)
            n = hidden.shape[0]
            hidden = arch.run_block_suffix(b, hidden, k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
    for (_, i), row in zip(pending, hidden[:, -1]):
        out[i] = row
    return torch.stack(out)


def _directions(arch: Any, lens: Any, resid: torch.Tensor,
                out_top1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [R], g [R, d])``: each layer's token, the gradient of the lens's log p(t) at ``resid [R, d]``."""
    layers = list(range(resid.shape[0]))
    h = resid.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        if lens.kind == "patchscope":
            read = _scope_final(lens, layers, h.to(arch.dtype))
        else:
            read = torch.stack(lens.translate_rows([(layer, h[layer].to(arch.dtype)) for layer in layers]))
        logp = arch.logits(read).float().log_softmax(-1)  # [R, vocab]
        top2 = logp.detach().topk(2, dim=-1).indices  # [R, 2]
        t = torch.where(top2[:, 0] != out_top1, top2[:, 0], top2[:, 1])
        (grad,) = torch.autograd.grad(logp.gather(1, t[:, None]).sum(), h)
    return t, grad


def causal_check(arch: Any, lenses: list[Any], cells: list[tuple[int, int]], windows: list[list[int]],
                 start: tuple[int, ...], scale: float, seed: int, progress: bool, shard: Shard) -> CausalSums:
    """The causal sums of every lens over this rank's share of ``cells`` (``(window, position)``), merged."""
    from tqdm.auto import tqdm

    n_rows = arch.n_layer + 1
    sums = CausalSums(len(lenses), n_rows)
    mine = list(shard.take(cells))
    with shard.together():
        for index, (w, p) in tqdm(mine, desc="causal check", unit="position",
                                  disable=not progress or not shard.primary):
            ids = batch_of([windows[w]], start).input_ids[0, : p + 1].to(arch.device)
            _one_position(arch, lenses, TargetRun(arch, ids, p), scale, seed + index, sums)
            sums.n_edited += 1
    sums.merge(shard)
    return sums


def _one_position(arch: Any, lenses: list[Any], run: TargetRun, scale: float, seed: int,
                  sums: CausalSums) -> None:
    """Add one position's edits (every lens and layer, and the random edits) to ``sums``."""
    p, n_rows = run.position, arch.n_layer + 1
    resid = run.resid[:, p].float()  # [R, d]: the clean residual at p, every layer
    with torch.no_grad():
        clean = arch.logits(run.resid[arch.n_layer, p]).float().log_softmax(-1)  # [vocab]
    size = scale * resid.norm(dim=-1, keepdim=True)  # [R, 1]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(resid.shape, generator=gen).to(resid.device)
    edits, tokens, used = [resid + size * noise / noise.norm(dim=-1, keepdim=True)], [], []
    for lens in lenses:
        t, g = _directions(arch, lens, resid, int(clean.argmax()))
        norm = g.norm(dim=-1, keepdim=True)
        edits.append(resid + size * g / norm.clamp(min=torch.finfo(g.dtype).tiny))
        tokens.append(t)
        used.append((norm[:, 0] > 0) & norm[:, 0].isfinite() & (size[:, 0] > 0))
    rows = torch.cat(edits)  # [(1 + K) R, d]: the random edits, then each lens's
    joins = list(range(n_rows)) * (1 + len(lenses))
    order = sorted(range(len(joins)), key=joins.__getitem__)
    final = torch.empty_like(rows)
    final[order] = run.run([joins[i] for i in order], rows[order].to(arch.dtype)).float()
    with torch.no_grad():
        logp = arch.logits(final).float().log_softmax(-1).view(1 + len(lenses), n_rows, -1)
    base = torch.arange(n_rows, device=logp.device)
    for k, (t, ok) in enumerate(zip(tokens, used)):
        d_lens = logp[k + 1, base, t] - clean[t]
        d_rand = logp[0, base, t] - clean[t]
        ok = (ok & d_lens.isfinite() & d_rand.isfinite()).cpu()
        for j, value in enumerate((d_lens, d_rand, (d_lens > d_rand).double(), torch.ones_like(d_lens))):
            sums.sums[j, k] += value.double().cpu().masked_fill(~ok, 0.0)
