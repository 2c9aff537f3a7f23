"""Exact patching of many components at once: the verification of an attribution-patching estimate.

Each candidate is one component — ``("heads", layer, head)``, ``("mlp", layer, 0)``, ``("memories", layer,
neuron)``, ``("resid", layer, pos)`` — set to its corrupted value in the clean run, alone; its exact effect
is ``metric(patched) - metric(clean)``. A forward holds several copies of the clean batch (one per
candidate, plus one unpatched copy that gives the clean value by the same arithmetic), each copy's
component replaced through :func:`reslens.patch`, and the metric reads each copy's logits alone.

Shortcut, exact by construction: a copy equals the clean run before its candidate's block, so a chunk
(candidates sorted by layer) starts from the clean ``resid`` at its first candidate's layer and runs only
the blocks from there (:meth:`~reslens.arch.Arch.run_block_suffix` with no prefix), where the batch has
no padding and the adapter can run a block alone; otherwise every copy runs the whole body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reslens.atp.metrics import wide
from reslens._inputs import Batch
from reslens.arch import Arch
from reslens.atp._passes import States
from reslens.hooks import patch

__all__ = ["Candidate", "exact_effects"]

Candidate = tuple[str, int, int]
_SITE = {"heads": "attn_z", "mlp": "mlp_out", "memories": "mlp_raw", "resid": "resid"}


def _replacement(arch: Arch, cand: Candidate, clean: States, corrupt: States) -> Any:
    """``fn(x_copy) -> x_copy`` patching ``cand`` into one copy ``[rows, pos, ·]`` of its site."""
    kind, layer, index = cand
    if kind == "heads":
        cols = slice(index * arch.d_head, (index + 1) * arch.d_head)
        value = corrupt.sites[("attn_z", layer)][..., cols]
        return lambda x: x.index_copy(-1, torch.arange(cols.start, cols.stop, device=x.device),
                                      value.to(x.device, x.dtype))
    if kind == "mlp":
        value = corrupt.sites[("mlp_out", layer)]
        return lambda x: value.to(x.device, x.dtype).expand_as(x).clone()
    if kind == "resid":
        value = corrupt.sites[("resid", layer)][:, index]  # [rows, d_model]

        def set_pos(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, index] = value.to(x.device, x.dtype)
            return x

        return set_pos
    w_row = wide(arch.mlp_weights(layer).W_out[index].detach())  # [d_model]
    d_act = (wide(corrupt.mlp_act[layer][..., index]) - wide(clean.mlp_act[layer][..., index]))
    add = d_act[..., None].to(w_row.device) * w_row  # [rows, pos, d_model]
    return lambda x: (wide(x) + add.to(x.device)).to(x.dtype)


def _edits(arch: Arch, chunk: Sequence[Candidate], rows: int, clean: States, corrupt: States) -> dict:
    """One :func:`reslens.patch` edit per ``(site, layer)``: copy ``j`` (rows ``j * rows ..``) patched."""
    n_pos = clean.final.shape[1]
    by_key: dict[tuple[str, int], list[tuple[int, Any]]] = {}
    for j, cand in enumerate(chunk):
        key = (_SITE[cand[0]], cand[1])
        by_key.setdefault(key, []).append((j, _replacement(arch, cand, clean, corrupt)))

    def edit_of(items: list[tuple[int, Any]]) -> Any:
        def edit(x: torch.Tensor) -> torch.Tensor:
            flat = x.shape if x.ndim == 2 else None  # a mixture of experts' output: [tokens, d_model]
            if flat is not None:
                x = x.view(-1, n_pos, flat[-1])
            parts = list(x.split(rows))
            for j, fn in items:
                parts[j] = fn(parts[j])
            out = torch.cat(parts)
            return out if flat is None else out.reshape(flat)

        return edit

    return {key: edit_of(items) for key, items in by_key.items()}


def _final_hidden(arch: Arch, batch: Batch, copies: int, start: int, clean: States,
                  edits: dict) -> torch.Tensor:
    """The final norm's output ``[copies * rows, pos, d_model]`` of ``copies`` patched copies of the batch.

    Staged from block ``start`` where the batch has no padding and the adapter runs a block alone (eager
    or sdpa attention: :meth:`~reslens.arch.Arch.run_block_suffix` refuses others before it runs one);
    otherwise the whole body.
    """
    with torch.no_grad(), patch(arch, edits):
        if bool(batch.attention_mask.all()):
            hidden = clean.sites[("resid", start)].repeat(copies, 1, 1)
            rows = hidden.shape[0]
            empty = torch.zeros((rows, arch.n_kv_head, 0, arch.d_head), dtype=hidden.dtype,
                                device=hidden.device)
            try:
                for b in range(start, arch.n_layer):
                    hidden = arch.run_block_suffix(b, hidden, empty, empty)
                return arch.final_norm_module(hidden)
            except NotImplementedError:
                pass
        rep = dict(input_ids=batch.input_ids.repeat(copies, 1),
                   attention_mask=batch.attention_mask.long().repeat(copies, 1),
                   position_ids=batch.position_ids.repeat(copies, 1), use_cache=False)
        return arch.body(**rep).last_hidden_state


def exact_effects(arch: Arch, batch: Batch, candidates: Sequence[Candidate], metric: Any, clean: States,
                  corrupt: States, *, batch_size: int) -> torch.Tensor:
    """``metric(patched) - metric(clean)`` for each candidate alone: float32 ``[len(candidates)]``.

    ``batch``: the clean batch as the estimate ran it (``rows`` sequences); a forward holds at most
    ``batch_size`` rows (at least one patched copy and the unpatched one).
    """
    rows = batch.input_ids.shape[0]
    per = max(1, batch_size // rows - 1)
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i][1], candidates[i][0]))
    out = torch.empty(len(candidates), dtype=torch.float32)
    for c in range(0, len(order), per):
        idx = order[c : c + per]
        chunk = [candidates[i] for i in idx]
        start = min(layer for _, layer, _ in chunk)
        edits = _edits(arch, chunk, rows, clean, corrupt)  # the last copy, len(chunk), stays unpatched
        hidden = _final_hidden(arch, batch, len(chunk) + 1, start, clean, edits)
        values = []
        with torch.no_grad():
            for j in range(len(chunk) + 1):
                values.append(float(metric(wide(arch.unembed(hidden[j * rows : (j + 1) * rows])))))
        out[torch.tensor(idx)] = (torch.tensor(values[:-1], dtype=torch.float64) - values[-1]).float()
    return out
