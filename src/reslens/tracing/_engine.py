"""The batched engine of causal tracing: many restorations of one prompt per forward.

A restoration is a list of ``(site, layer, token)`` items with sites ``resid`` (layer
``0..n_layer``), ``mlp_out`` and ``attn_out``; each is set to its clean value in a corrupted
run. Every shortcut is exact by causality (a position sees only itself and earlier ones):

- items that cannot reach the last position are dropped (:meth:`_Engine._reaching`);
- a restoration whose first restored token is ``t`` equals the corrupted run at positions
  ``< t`` in every block, so only positions ``t ..`` are computed, attending to the corrupted
  run's keys/values of positions ``< t`` (``arch.attention_kv``, ``arch.run_block_suffix``);
- its rows equal the corrupted run up to its first restored block, so they join the forward
  there, from the corrupted residual (a staged forward);
- the last block computes the last position only.

Only the adapter's role-named partial forwards are used, with the first position of what
they compute passed as ``start``, so the same engine serves learned and rotary positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from reslens.arch import Arch
from reslens.hooks import capture, patch

__all__ = ["Engine", "draw_noise"]

Restoration = Sequence[tuple[str, int, int]]


def draw_noise(arch: Arch, samples: int, span: tuple[int, int], std: float, seed: int) -> torch.Tensor:
    """Gaussian noise ``[samples, span, d_model]`` (float32, std ``std``) drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, span[1] - span[0], arch.d_model), generator=gen) * std
    return noise.to(device=arch.device, dtype=torch.float32)


class Engine:
    """Runs corrupted / restored forwards of one prompt ``ids [pos]``, many restorations per forward.

    ``noise: [samples, span, d_model]`` is added to ``resid`` layer 0 at the subject's tokens in
    every corrupted row; ``answer_id`` is the token whose probability at the last position is measured.
    """

    def __init__(self, arch: Arch, ids: torch.Tensor, span: tuple[int, int], answer_id: int,
                 noise: torch.Tensor) -> None:
        self.arch, self.ids, self.span, self.answer_id, self.noise = arch, ids, span, answer_id, noise
        self.samples = noise.shape[0]
        self._states: dict[str, torch.Tensor] = {}  # clean sites, the corrupted resid, corrupted keys/values

    def clean_states(self, sites: Iterable[str]) -> None:
        """Capture the clean run's ``sites`` (once each): ``[layers or blocks, pos, d]``."""
        need = tuple(s for s in dict.fromkeys(sites) if s not in self._states)
        if need:
            res = capture(self.arch, self.ids[None], sites=need)
            for site in need:
                self._states[site] = getattr(res, site)[:, 0]

    def clean_prob(self) -> float:
        """p(answer) at the last position of the clean prompt."""
        with torch.no_grad():
            h = self.arch.final_hidden(self.ids[None])[0, -1]  # [d_model] (after the final norm)
            return float(self.arch.unembed(h).float().softmax(-1)[self.answer_id])

    def corrupted_resid(self) -> torch.Tensor:
        """``resid`` of the corrupted run, every layer: ``[n_layer + 1, samples, pos, d_model]``."""
        if "corrupted" not in self._states:
            start, end = self.span

            def corrupt(t: torch.Tensor) -> torch.Tensor:
                t = t.clone()
                t[:, start:end] += self.noise.to(t.dtype)
                return t

            with patch(self.arch, {("resid", 0): corrupt}):
                res = capture(self.arch, self.ids[None].expand(self.samples, -1), sites="resid")
            self._states["corrupted"] = res.resid
        return self._states["corrupted"]

    def corrupted_kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[samples, n_kv_head, pos, d_head]`` of block ``block`` in the corrupted run."""
        key = f"kv{block}"
        if key not in self._states:
            with torch.no_grad():
                kv = self.arch.attention_kv(block, self.corrupted_resid()[block], start=0)
                self._states[key] = torch.stack(kv)
        k, v = self._states[key]
        return k, v

    def _reaching(self, restoration: Restoration) -> list[tuple[str, int, int]]:
        """The items of ``restoration`` that can change the last position's output.

        A state at a token before the last one reaches it only through a later block's
        attention, so ``resid`` layer ``n_layer`` (the final norm's input) and the last block's
        ``mlp_out`` / ``attn_out`` matter at the last token only. Dropping the others is exact.
        """
        n_layer, last = self.arch.n_layer, self.ids.shape[0] - 1
        top = {"resid": n_layer - 1, "mlp_out": n_layer - 2, "attn_out": n_layer - 2}
        return [(site, layer, token) for site, layer, token in restoration
                if token == last or layer <= top[site]]

    def _start(self, restoration: Restoration) -> int:
        """First block whose input differs from the corrupted run's (``n_layer``: only the final norm's)."""
        return min((layer for _, layer, _ in restoration), default=self.arch.n_layer)

    def run(self, restorations: Sequence[Restoration], *, batch_size: int, progress: bool = False,
            desc: str = "causal trace") -> torch.Tensor:
        """Mean p(answer) over the samples for each restoration: float32 ``[len(restorations)]``.

        A restoration left empty by :meth:`_reaching` has the corrupted probability. The others
        are grouped by their first restored token and sorted by their first restored block;
        chunks hold at most ``batch_size // samples`` restorations (``batch_size`` rows).
        """
        from tqdm.auto import tqdm

        self.clean_states({site for r in restorations for site, _, _ in r})
        kept = [self._reaching(r) for r in restorations]
        out = torch.empty(len(restorations), dtype=torch.float32)
        empty = [i for i, r in enumerate(kept) if not r]
        if empty:
            out[torch.tensor(empty)] = self._run_chunk([[]]).cpu()
        per_chunk = max(1, batch_size // self.samples)
        key = {i: (min(token for _, _, token in r), self._start(r)) for i, r in enumerate(kept) if r}
        chunks: list[list[int]] = []
        for i in sorted(key, key=key.get):
            if chunks and key[chunks[-1][0]][0] == key[i][0] and len(chunks[-1]) < per_chunk:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=not progress, leave=False):
            out[torch.tensor(chunk)] = self._run_chunk([kept[i] for i in chunk]).cpu()
        return out

    def _run_chunk(self, chunk: Sequence[Restoration]) -> torch.Tensor:
        """Mean p(answer) ``[len(chunk)]`` of restorations sharing their first restored token ``t0``.

        A staged forward of positions ``t0 ..``: row ``r`` (restoration ``r // samples``, noise
        sample ``r % samples``) joins at its restoration's first block from the corrupted
        residual; since the chunk is sorted by that block, the active rows are always a prefix.
        ``resid`` items are written into the block's input directly; ``mlp_out`` / ``attn_out``
        items through :func:`reslens.hooks.patch`.
        """
        arch, samples, n_layer = self.arch, self.samples, self.arch.n_layer
        n = self.ids.shape[0]
        corrupted = self.corrupted_resid()  # [n_layer + 1, samples, n, d]
        t0 = min((token for r in chunk for _, _, token in r), default=n - 1)
        joins = [self._start(r) for r in chunk]
        hidden = corrupted[0][:0, t0:]  # [rows, n - t0, d]: the active rows, positions t0 ..
        with torch.no_grad():
            for b in range(joins[0], n_layer + 1):
                if b == n_layer:
                    hidden = hidden[:, -1:]  # the final norm's input: the last position is enough
                p0 = n - hidden.shape[1]  # the first position computed
                active = sum(j <= b for j in joins)
                if active * samples > hidden.shape[0]:
                    new = corrupted[b][:, p0:].repeat(active - hidden.shape[0] // samples, 1, 1)
                    hidden = torch.cat([hidden, new])
                hidden = self._restore_resid(hidden, chunk, b, p0)
                if b < n_layer:
                    hidden = self._block(hidden, chunk, b, p0)
            h = arch.final_norm_module(hidden[:, -1])  # [rows, d_model]
            p = arch.unembed(h).float().softmax(-1)[:, self.answer_id]
        return p.view(len(chunk), samples).mean(1)

    def _block(self, hidden: torch.Tensor, chunk: Sequence[Restoration], b: int, p0: int) -> torch.Tensor:
        """Block ``b`` on ``hidden [rows, n - p0, d]`` (positions ``p0 ..``), the chunk's items restored.

        The last block returns the last position only ``[rows, 1, d]``.
        """
        arch, rows = self.arch, hidden.shape[0]
        k, v = self.corrupted_kv(b)  # [samples, n_kv_head, n, d_head]
        prefix_k = k[:, :, :p0].repeat(rows // self.samples, 1, 1, 1)  # [rows, n_kv_head, p0, d_head]
        prefix_v = v[:, :, :p0].repeat(rows // self.samples, 1, 1, 1)
        if b == arch.n_layer - 1 and hidden.shape[1] > 1:
            own_k, own_v = arch.attention_kv(b, hidden[:, :-1], start=p0)  # positions p0 .. n - 2
            prefix_k, prefix_v = torch.cat([prefix_k, own_k], -2), torch.cat([prefix_v, own_v], -2)
            hidden, p0 = hidden[:, -1:], self.ids.shape[0] - 1
        with patch(arch, self._edits(chunk, b, p0)):
            return arch.run_block_suffix(b, hidden, prefix_k, prefix_v)

    def _rows_and_values(self, chunk: Sequence[Restoration], site: str, b: int,
                         p0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rows, positions (from ``p0``) and clean values ``[len, d]`` of the chunk's ``(site, b)`` items."""
        samples, rows, pos = self.samples, [], []
        for c, restoration in enumerate(chunk):
            for token in sorted({t for s, layer, t in restoration if s == site and layer == b}):
                if token < p0:
                    raise RuntimeError(f"internal error: restored token {token} precedes the computed "
                                       f"positions {p0}..")
                rows.extend(range(c * samples, (c + 1) * samples))
                pos.extend([token] * samples)
        if not rows:
            return None
        device = self.arch.device
        pos_t = torch.tensor(pos, device=device)
        return torch.tensor(rows, device=device), pos_t - p0, self._states[site][b][pos_t]

    def _restore_resid(self, hidden: torch.Tensor, chunk: Sequence[Restoration], b: int,
                       p0: int) -> torch.Tensor:
        """``hidden`` (``resid`` layer ``b``, positions ``p0 ..``), the chunk's ``resid`` items restored."""
        found = self._rows_and_values(chunk, "resid", b, p0)
        if found is None:
            return hidden
        r, t, vals = found
        hidden = hidden.clone()
        hidden[r, t] = vals.to(hidden.dtype)
        return hidden

    def _edits(self, chunk: Sequence[Restoration], b: int, p0: int) -> dict:
        """``patch`` functions setting the chunk's ``mlp_out`` / ``attn_out`` items of block ``b``.

        Their clean values, that is; rows index the active rows; positions count from ``p0``.
        """
        edits = {}
        for site in ("mlp_out", "attn_out"):
            found = self._rows_and_values(chunk, site, b, p0)
            if found is None:
                continue

            def fn(x: torch.Tensor, found=found) -> torch.Tensor:
                r, t, vals = found
                x = x.clone()
                x[r, t] = vals.to(x.dtype)
                return x

            edits[(site, b)] = fn
        return edits
