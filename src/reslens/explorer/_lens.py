"""The lens view's payload: lenses of one text reduced to top-k, metrics, trajectories and precomputed causes.

From results (:func:`lens_view`) the page holds what the :class:`~reslens.lens.LensResult` holds; a
trajectory then knows a token's probability only where it was in the top-k. From a model
(:func:`model_lens_view`) the text is captured once, read by every lens, each trajectory is computed
exactly at every row (where the model runs: the page never carries a vocabulary row) and the causes of
the cells where the logit lens's top-1 changes are computed by :func:`reslens.lens.lens_change_of`, up to
a budget of cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reslens._checks import check_int
from reslens.explorer._payload import RANK_CAP, Tokens, log_probs, log_ranks, pack, ranks

__all__ = ["lens_view", "model_lens_view"]


def _check_results(results: Mapping[str, Any]) -> None:
    from reslens.lens.result import LensResult

    if not results:
        raise ValueError("results is empty; give at least one LensResult")
    first = next(iter(results.values()))
    for name, result in results.items():
        if not isinstance(result, LensResult):
            raise TypeError(f"results[{name!r}] must be a LensResult; got {type(result).__name__}")
        if result.row_labels != first.row_labels or not torch.equal(result.input_ids.cpu(),
                                                                     first.input_ids.cpu()):
            raise ValueError(f"every lens must read the same text at the same rows to be switched; "
                             f"{name!r} has rows {result.row_labels} (first: {first.row_labels})")


def _metrics(result: Any, seq: int, real: torch.Tensor) -> dict[str, Any]:
    """Each colourable metric ``[R, P]`` of sequence ``seq``'s real positions (ranks as uint16)."""
    def at(t: torch.Tensor) -> torch.Tensor:
        return t[:, seq].cpu()[:, real]

    # p(top-1) is the first top-k probability and p(next token) exp(its log-prob): the page derives them
    out = {"final": pack(at(result.final_top1_prob), "f2"),
           "entropy": pack(at(result.entropy), "f2"), "kl_fl": pack(at(result.kl_final_layer), "f2"),
           "kl_lf": pack(at(result.kl_layer_final), "f2"), "js": pack(at(result.js), "f2")}
    if result.final_top1_rank is not None:
        out["final_rank"] = ranks(at(result.final_top1_rank))
    if result.target_logprob is not None:
        out["target_logprob"] = pack(at(result.target_logprob), "f2")
        out["target_rank"] = ranks(at(result.target_rank))
    return out


def _chosen(top1: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Per position, the distinct top-1 ids of its rows ``top1: [R, P]``, deepest row's first."""
    out = []
    for column in top1.t().tolist():
        seen: list[int] = []
        for token in reversed(column):
            if token >= 0 and token not in seen and len(seen) < max_tokens:
                seen.append(token)
        out.append(seen)
    return out


def _from_top_k(top_ids: torch.Tensor, top_probs: torch.Tensor, chosen: list[list[int]]):
    """Trajectories read from the top-k alone: ``(prob [T, R], rank [T, R])``, NaN / cap where not in it."""
    probs, rank_rows = [], []
    for p, tokens in enumerate(chosen):
        ids, values = top_ids[:, p], top_probs[:, p]  # [R, k]
        for token in tokens:
            hit = ids == token  # [R, k]
            found = hit.any(-1)
            probs.append(torch.where(found, (values * hit).sum(-1), torch.nan))
            rank_rows.append(torch.where(found, hit.float().argmax(-1), RANK_CAP))
    return torch.stack(probs), torch.stack(rank_rows)


def _trajectories(result: Any, seq: int, real: torch.Tensor, max_tokens: int, tokens: Tokens,
                  exact: Any = None) -> dict[str, Any]:
    """The trajectory block of one lens: offsets ``[P + 1]``, tokens ``[T]``, prob and rank ``[T, R]``.

    Probabilities and ranks travel at a chart's precision (:func:`log_probs`, :func:`log_ranks`).
    """
    top_ids, top_probs = result.top_ids[:, seq].cpu()[:, real], result.top_probs[:, seq].cpu()[:, real]
    chosen = _chosen(top_ids[..., 0], max_tokens)
    prob, rank = _from_top_k(top_ids, top_probs, chosen) if exact is None else exact(chosen)
    offsets = torch.tensor([0, *torch.tensor([len(c) for c in chosen]).cumsum(0).tolist()])
    return {"off": pack(offsets, "u4"), "tok": tokens.pack(torch.tensor(sum(chosen, []))),
            "prob": log_probs(prob), "rank": log_ranks(rank), "exact": exact is not None}


def lens_view(results: Mapping[str, Any], *, seq: int = 0, max_tokens: int = 8,
              exact: Mapping[str, Any] | None = None, changes: Sequence[dict] = (),
              tokenizer: Any = None) -> dict[str, Any]:
    """The lens view of ``results`` (name -> :class:`~reslens.lens.LensResult` of one text): sequence ``seq``.

    ``exact``: per lens name, a function of the chosen ids that computes their exact trajectories;
    ``changes``: precomputed causes (:func:`_change_payload`) of the logit lens's cells.
    """
    _check_results(results)
    first = next(iter(results.values()))
    check_int(seq, "seq", low=0, high=first.input_ids.shape[0] - 1)
    check_int(max_tokens, "max_tokens", low=1)
    real = first.attention_mask[seq].cpu().nonzero().flatten()
    strings = {}
    for result in results.values():
        strings.update(result.token_strings or {})
    tokens = Tokens(lambda i: strings.get(i, str(i)))
    view = {"kind": "lens", "rows": first.row_labels, "n_pos": int(real.numel()), "k": first.top_k,
            "input": tokens.index(first.input_ids[seq].cpu()[real]).tolist(),
            "next": None if first.targets is None else tokens.index(first.targets[seq].cpu()[real]).tolist(),
            "lenses": []}
    for name, result in results.items():
        view["lenses"].append({
            "name": name, "top": tokens.pack(result.top_ids[:, seq].cpu()[:, real]),
            "probs": pack(result.top_probs[:, seq].cpu()[:, real], "f2"),
            "metrics": _metrics(result, seq, real),
            "traj": _trajectories(result, seq, real, max_tokens, tokens, (exact or {}).get(name)),
            "changes": [dict(c, target=int(tokens.index([c["target"]])[0]),
                             against=int(tokens.index([c["against"]])[0]))
                        for c in changes] if result.lens_name == "logit lens" else [],
        })
    view["tokens"] = tokens.strings
    return view


# --- from a model -----------------------------------------------------------------------------------


def _exact(arch: Any, residuals: Any, lens: Any, rows: Sequence[tuple[str, int]], seq: int,
           real: torch.Tensor):
    """A function of the chosen ids per position -> their exact ``(prob [T, R], rank [T, R])``."""
    def compute(chosen: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(map(len, chosen)))
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chosen], device=arch.device)  # [P, W]
        prob = torch.empty(len(rows), *ids.shape)
        rank = torch.empty(len(rows), *ids.shape, dtype=torch.long)
        with torch.no_grad():
            for r, (site, layer) in enumerate(rows):
                h = residuals.get(site, layer)[seq, real.to(residuals.resid.device)]
                h = h.to(arch.device, arch.dtype)
                (h,) = lens.translate_rows([(layer, h)])
                for lo in range(0, h.shape[0], 64):
                    at = slice(lo, lo + 64)
                    z = arch.logits(h[at]).float()  # [c, vocab]
                    picked = z.gather(1, ids[at])  # [c, W]
                    prob[r, at] = (picked - z.logsumexp(-1, keepdim=True)).exp().cpu()
                    rank[r, at] = (z[:, None, :] > picked[:, :, None]).count_nonzero(-1).cpu()
        keep = [(p, j) for p, c in enumerate(chosen) for j in range(len(c))]
        index = torch.tensor(keep, dtype=torch.long).reshape(-1, 2)
        return prob[:, index[:, 0], index[:, 1]].t(), rank[:, index[:, 0], index[:, 1]].t()

    return compute


def _change_cells(top1: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Cells ``(row, position)`` whose top-1 differs from the row below: the last position first."""
    cells = []
    for p in reversed(range(top1.shape[1])):
        for r in range(1, top1.shape[0]):
            if len(cells) == budget:
                return cells
            if top1[r, p] >= 0 and top1[r - 1, p] >= 0 and top1[r, p] != top1[r - 1, p]:
                cells.append((r, p))
    return cells


def _change_payload(change: Any, r: int, p: int) -> dict[str, Any]:
    values = change.contributions.tolist()
    pieces = sorted(zip(change.labels, change.kind, values, change.triggers), key=lambda x: -abs(x[2]))
    return {"r": r, "p": p, "target": change.target, "against": change.against,
            "from": float(change.logit[change.start]), "to": float(change.logit[change.stop]),
            "pieces": [[label, kind, round(v, 5), list(lines)] for label, kind, v, lines in pieces]}


def _changes(arch: Any, residuals: Any, logit: Any, seq: int, real: torch.Tensor, budget: int,
             memories: int, index: Any, tokenizer: Any) -> list[dict]:
    from reslens.lens.change import lens_change_of

    top1 = logit.top_ids[:, seq, :, 0].cpu()[:, real]
    out = []
    for r, p in _change_cells(top1, budget):
        change = lens_change_of(residuals, arch, int(top1[r, p]), against=int(top1[r - 1, p]),
                                layers=(logit.layer_of_row[r - 1], logit.layer_of_row[r]),
                                position=int(real[p]), seq=seq, tokenizer=tokenizer, memories=memories,
                                index=index)
        out.append(_change_payload(change, r, p))
    return out


def model_lens_view(model: Any, inputs: Any, *, tokenizer: Any, lenses: Any, top_k: int, changes: int,
                    memories: int, index: Any, max_tokens: int) -> dict[str, Any]:
    """The lens view of ``inputs`` (one text) read by the model: every lens, exact trajectories, causes."""
    from reslens._inputs import as_batch
    from reslens.arch import adapter
    from reslens.hooks import _capture
    from reslens.lens.change import CHANGE_SITES
    from reslens.lens.result import lens_of
    from reslens.lens.values import as_lens

    arch = adapter(model)
    named = _named_lenses(lenses)
    check_int(changes, "changes", low=0)
    batch = as_batch(inputs, arch, tokenizer)
    if batch.input_ids.shape[0] != 1:
        raise ValueError(f"inputs must be one text (one sequence); got {batch.input_ids.shape[0]}")
    sites = (CHANGE_SITES if memories else CHANGE_SITES[:3]) if changes else ("resid",)
    residuals = _capture(arch, batch, sites=sites, layers=tuple(range(arch.n_layer + 1)), dtype=torch.float32)
    real = batch.attention_mask[0].cpu().nonzero().flatten()
    results, exact = {}, {}
    for name, lens in named.items():
        results[name] = lens_of(residuals, arch, top_k=top_k, tokenizer=tokenizer, lens=lens)
        rows = list(zip(results[name].site_of_row, results[name].layer_of_row))
        exact[name] = _exact(arch, residuals, as_lens(lens), rows, 0, real)
    logit = next((r for r in results.values() if r.lens_name == "logit lens"), None)
    found = [] if logit is None or not changes else _changes(arch, residuals, logit, 0, real, changes,
                                                              memories, index, tokenizer)
    view = lens_view(results, max_tokens=max_tokens, exact=exact, changes=found, tokenizer=tokenizer)
    view["change_budget"] = changes
    return view


def _named_lenses(lenses: Any) -> dict[str, Any]:
    """``lenses`` as name -> lens: None (the logit lens), a mapping, or a sequence of lens values."""
    from reslens.lens.values import as_lens

    if lenses is None:
        lenses = [None]
    if isinstance(lenses, Mapping):
        named = {str(k): v for k, v in lenses.items()}
    elif isinstance(lenses, (list, tuple)):
        named = {}
        for lens in lenses:
            name = as_lens(lens).name
            named[name if name not in named else f"{name} {len(named)}"] = lens
    else:
        raise TypeError(f"lenses must be None, a list of lenses or a dict name -> lens; got "
                        f"{type(lenses).__name__}")
    if not named:
        raise ValueError("lenses is empty; give at least one lens (None is the logit lens)")
    for lens in named.values():
        as_lens(lens)
    return named
