"""The logit lens (nostalgebraist 2020): each layer's residual read through ``ln_f`` and the
unembedding, with every metric computed in one bounded-memory pass.

``ln_f`` is applied to the raw residual stream (``resid``, ``resid_mid``), never to
HuggingFace's already-normalised last hidden state, so the last layer's row is exactly the
model's own prediction. Logits are turned into probabilities in float32 whatever the model's
dtype. The full ``[rows, pos, vocab]`` array is never built: rows are unembedded in blocks
of ``chunk_size`` and each block is reduced to what the result keeps (top-k, target
log-prob and rank, entropy, KL both ways, Jensen-Shannon) a few rows at a time, so the work
stays in cache.

Metric definitions (``p`` = the layer's distribution, ``q`` = the final layer's):

- ``target_logprob`` = ``log p(target)``; ``target_rank`` = number of vocabulary entries
  whose logit is strictly larger than the target's (0 = top-1)
- ``entropy`` = ``H(p)`` in nats; ``max_prob`` = ``max p``
- ``kl_final_layer`` = ``KL(q || p)``; ``kl_layer_final`` = ``KL(p || q)`` (nats)
- ``js`` = ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` (nats, at most ``ln 2``)
- ``final_top1_prob`` = ``p(argmax q)``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from reslens._checks import check_layers, check_sites
from reslens._gpt2 import GPT2
from reslens.hooks import Batch, as_batch, capture, pad_ids, pad_token_id

__all__ = ["LensResult", "LensStats", "logit_lens", "lens_stats", "LENS_SITES", "METRICS"]

LENS_SITES = ("resid", "resid_mid")
METRICS = (
    "target_logprob",
    "target_rank",
    "entropy",
    "kl_final_layer",
    "kl_layer_final",
    "js",
    "max_prob",
    "final_top1_prob",
)
_FLOAT_ROWS = ("target_logprob", "entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob", "final_top1_prob")
_SUB_ROWS = 32  # rows reduced together after each unembedding block: keeps [rows, vocab] temporaries in cache


@dataclass(frozen=True)
class LensResult:
    """The logit lens of a batch: one lens row per (site, layer), in depth order.

    ``R`` = number of lens rows, ``B`` = batch, ``P`` = positions, ``k`` = top-k. Row ``r``
    reads ``site_of_row[r]`` at layer ``layer_of_row[r]`` (``resid_mid l`` sits between
    ``resid l`` and ``resid l+1``). Pad positions hold NaN (floats) or -1 (ints).

    - ``input_ids``, ``attention_mask`` (bool): ``[B, P]``; ``targets: [B, P]`` (-1 = none) or None
    - ``top_ids: [R, B, P, k]`` (int64), ``top_probs: [R, B, P, k]`` (float32)
    - ``target_logprob``, ``entropy``, ``kl_final_layer``, ``kl_layer_final``, ``js``,
      ``max_prob``, ``final_top1_prob``: ``[R, B, P]`` float32; ``target_rank: [R, B, P]`` int64
      (target metrics are None when ``targets`` is None)
    - ``final_top1: [B, P]``: the model's own top-1 token
    - ``convergence_layer: [B, P]``: first ``resid`` layer from which the top-1 stays equal
      to the final top-1 (-1 if the last lens row disagrees, or at pads)
    - ``token_strings``: id -> decoded string for every id above (None without a tokenizer)
    """

    site_of_row: tuple[str, ...]
    layer_of_row: tuple[int, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor | None
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    target_logprob: torch.Tensor | None
    target_rank: torch.Tensor | None
    entropy: torch.Tensor
    kl_final_layer: torch.Tensor
    kl_layer_final: torch.Tensor
    js: torch.Tensor
    max_prob: torch.Tensor
    final_top1_prob: torch.Tensor
    final_top1: torch.Tensor
    convergence_layer: torch.Tensor
    token_strings: dict[int, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "site_of_row", tuple(self.site_of_row))
        object.__setattr__(self, "layer_of_row", tuple(int(x) for x in self.layer_of_row))
        n_rows = len(self.site_of_row)
        if len(self.layer_of_row) != n_rows:
            raise ValueError("site_of_row and layer_of_row must have the same length")
        batch_pos = tuple(self.input_ids.shape)
        for name in ("attention_mask", "targets", "final_top1", "convergence_layer"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != batch_pos:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {batch_pos}")
        for name in (*_FLOAT_ROWS, "target_rank"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n_rows, *batch_pos):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(n_rows, *batch_pos)}")
        if self.top_ids.shape != self.top_probs.shape or tuple(self.top_ids.shape[:3]) != (n_rows, *batch_pos):
            raise ValueError(f"top_ids/top_probs must be [{n_rows}, {batch_pos[0]}, {batch_pos[1]}, k]")

    # --- access ---------------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        return self.top_ids.shape[-1]

    def row(self, layer: int, site: str = "resid") -> int:
        """Index of the lens row that reads ``site`` at ``layer``."""
        for r, (s, l) in enumerate(zip(self.site_of_row, self.layer_of_row)):
            if s == site and l == layer:
                return r
        kept = [f"{s} {l}" for s, l in zip(self.site_of_row, self.layer_of_row)]
        raise ValueError(f"no lens row for site={site!r} layer={layer}; rows: {', '.join(kept)}")

    @property
    def row_labels(self) -> list[str]:
        """``'resid 3'``, ``'resid_mid 3'``, ... one per row."""
        return [f"{s} {l}" if s != "resid" else str(l) for s, l in zip(self.site_of_row, self.layer_of_row)]

    def token(self, token_id: int) -> str:
        """The string of ``token_id`` (its number when the lens ran without a tokenizer)."""
        if token_id < 0:
            return ""
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def input_tokens(self, seq: int = 0) -> list[str]:
        """The real input tokens of sequence ``seq``."""
        mask = self.attention_mask[seq]
        return [self.token(i) for i in self.input_ids[seq][mask].tolist()]

    # --- output ---------------------------------------------------------------------------

    def to_frame(self):
        """Long-form ``pandas.DataFrame``: one row per (lens row, sequence, real position)."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - pandas is optional
            raise ImportError("LensResult.to_frame needs pandas: pip install pandas") from error
        n_rows = len(self.site_of_row)
        r_idx, b_idx, p_idx = torch.nonzero(self.attention_mask.expand(n_rows, *self.attention_mask.shape), as_tuple=True)
        columns: dict[str, Any] = {
            "site": [self.site_of_row[r] for r in r_idx.tolist()],
            "layer": [self.layer_of_row[r] for r in r_idx.tolist()],
            "seq": b_idx.numpy(),
            "pos": p_idx.numpy(),
            "input_id": self.input_ids[b_idx, p_idx].numpy(),
        }
        top1 = self.top_ids[r_idx, b_idx, p_idx, 0]
        columns["input_token"] = [self.token(i) for i in columns["input_id"].tolist()]
        if self.targets is not None:
            target = self.targets[b_idx, p_idx]
            columns["target_id"] = target.numpy()
            columns["target_token"] = [self.token(i) for i in target.tolist()]
        columns["top1_id"] = top1.numpy()
        columns["top1_token"] = [self.token(i) for i in top1.tolist()]
        columns["top1_prob"] = self.top_probs[r_idx, b_idx, p_idx, 0].numpy()
        for name in METRICS:
            t = getattr(self, name)
            if t is not None:
                columns[name] = t[r_idx, b_idx, p_idx].numpy()
        columns["convergence_layer"] = self.convergence_layer[b_idx, p_idx].numpy()
        return pd.DataFrame(columns)

    def table(self, seq: int = 0, *, width: int = 100, cell: int = 9) -> str:
        """The classic logit-lens table of sequence ``seq`` as text.

        Columns are positions; the top line is the actual next token, the bottom line the
        input token, and each row in between is a layer's top-1 token (deepest on top).
        Inputs wider than ``width`` characters are split into windows of positions.
        """
        from reslens.plot import lens_table

        return lens_table(self, seq=seq, width=width, cell=cell)

    def plot(self, metric: str = "prob", seq: int = 0, *, ax=None, max_positions: int = 40):
        """Heatmap (layers x positions) of ``metric`` with the top-1 token written in each cell.

        ``metric``: ``"prob"`` (top-1 probability), ``"rank"`` (rank of the actual next token),
        ``"entropy"``, ``"kl"`` (KL(final || layer)). Needs matplotlib. Returns the figure.
        """
        from reslens.plot import plot_lens

        return plot_lens(self, metric=metric, seq=seq, ax=ax, max_positions=max_positions)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.table(0))}</pre>"

    def __repr__(self) -> str:
        n_rows = len(self.site_of_row)
        return (
            f"LensResult(rows={n_rows} [{self.row_labels[0]} .. {self.row_labels[-1]}], "
            f"batch={self.input_ids.shape[0]}, pos={self.input_ids.shape[1]}, top_k={self.top_k})"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write to safetensors (no pickle): tensors plus rows and token strings as metadata."""
        from safetensors.torch import save_file

        tensors = {f.name: getattr(self, f.name).contiguous().cpu() for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        meta = {
            "format": "reslens.LensResult/1",
            "site_of_row": json.dumps(self.site_of_row),
            "layer_of_row": json.dumps(self.layer_of_row),
            "token_strings": json.dumps(self.token_strings),
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LensResult:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "reslens.LensResult/1":
                raise ValueError(f"{os.fspath(path)!r} is not a reslens LensResult file")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        strings = json.loads(meta["token_strings"])
        optional = {name: tensors.pop(name, None) for name in ("targets", "target_logprob", "target_rank")}
        return cls(
            site_of_row=tuple(json.loads(meta["site_of_row"])),
            layer_of_row=tuple(json.loads(meta["layer_of_row"])),
            token_strings=None if strings is None else {int(k): v for k, v in strings.items()},
            **optional,
            **tensors,
        )


# --- the computation ----------------------------------------------------------------------


@dataclass
class _Reference:
    """The final layer's distribution for a block of positions (``c`` = positions)."""

    logp: torch.Tensor  # [c, vocab]
    p: torch.Tensor  # [c, vocab]
    entropy: torch.Tensor  # [c]
    top1: torch.Tensor  # [c]


_BLOCK_OUTPUTS = ("top_ids", "top_probs", "target_rank", "target_logprob", "entropy",
                  "kl_layer_final", "kl_final_layer", "js", "max_prob", "final_top1_prob")


def _block_metrics(
    z: torch.Tensor,
    ref_p: torch.Tensor,
    ref_logp: torch.Tensor,
    ref_entropy: torch.Tensor,
    ref_top1: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, ...]:
    """Every lens metric of logits ``z: [n, vocab]`` (float32) against the final layer's
    ``ref_p``, ``ref_logp: [n, vocab]``, ``ref_entropy``, ``ref_top1``, ``target: [n]``.

    A pure function of tensors, so ``torch.compile`` can fuse it into a couple of passes
    over each row; returns the tensors named in ``_BLOCK_OUTPUTS``.
    """
    top_logits, top_ids = z.topk(top_k, dim=-1)
    target_logit = z.gather(1, target.clamp(min=0)[:, None])  # [n, 1]
    rank = (z > target_logit).sum(-1)  # strictly larger logits
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
    logp = z - lse
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    kl_layer_final = (p * (logp - ref_logp)).sum(-1)
    kl_final_layer = (ref_p * (ref_logp - logp)).sum(-1)
    m = 0.5 * (p + ref_p)
    js = -torch.xlogy(m, m).sum(-1) - 0.5 * (entropy + ref_entropy)
    top_probs = (top_logits - lse).exp()
    has_target = target >= 0
    return (
        top_ids,
        top_probs,
        torch.where(has_target, rank, -1),
        torch.where(has_target, (target_logit - lse).squeeze(1), torch.nan),
        entropy,
        kl_layer_final.clamp(min=0),
        kl_final_layer.clamp(min=0),
        js.clamp(min=0),
        top_probs[:, 0],
        p.gather(1, ref_top1[:, None]).squeeze(1),
    )


_COMPILED: dict[str, Any] = {}


def _reducer(fused: bool):
    """``_block_metrics``, compiled once by ``torch.compile`` when ``fused`` (compilation
    needs a C++ compiler on CPU, Triton on GPU; errors surface on the first call)."""
    if not fused:
        return _block_metrics
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_block_metrics, dynamic=False)
    return _COMPILED["fn"]


def _reduce_rows(
    reduce: Any,
    z: torch.Tensor,
    ref: _Reference,
    ref_rows: slice,
    target: torch.Tensor | None,
    top_k: int,
    out: dict[str, torch.Tensor],
    at: tuple[int, slice],
) -> None:
    """Reduce logits ``z: [n, vocab]`` to the kept metrics, written to ``out[name][at]``.

    ``ref_rows`` picks the rows' final-layer references; ``target: [n]`` (-1 = none).
    Blocks shorter than ``_SUB_ROWS`` are padded so a compiled reducer sees one shape.
    """
    n = z.shape[0]
    if target is None:
        target = torch.full((n,), -1, dtype=torch.long, device=z.device)
    args = [z, ref.p[ref_rows], ref.logp[ref_rows], ref.entropy[ref_rows], ref.top1[ref_rows], target]
    if n < _SUB_ROWS and reduce is not _block_metrics:
        pad = _SUB_ROWS - n
        args = [
            torch.nn.functional.pad(t, (0, 0, 0, pad) if t.ndim == 2 else (0, pad), value=-1 if t is target else 0)
            for t in args
        ]
    values = reduce(*args, top_k)
    for name, value in zip(_BLOCK_OUTPUTS, values):
        out[name][at] = value[:n]


def _reference(z: torch.Tensor) -> _Reference:
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # the same arithmetic as _block_metrics
    p = logp.exp()
    return _Reference(logp=logp, p=p, entropy=-(p * logp).sum(-1), top1=z.argmax(-1))


def _resolve_targets(targets: Any, batch: Batch) -> torch.Tensor | None:
    """``[B, P]`` target ids (-1 = none) from ``"next"``, an id tensor, or None."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets != "next":
            raise ValueError(f"targets must be 'next', a [batch, pos] id tensor or None; got {targets!r}")
        ids, mask = batch.input_ids, batch.attention_mask
        nxt = torch.full_like(ids, -1)
        nxt[:, :-1] = torch.where(mask[:, 1:] & mask[:, :-1], ids[:, 1:], -1)
        return nxt
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be 'next', a [batch, pos] id tensor or None; got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(batch.input_ids.shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected the inputs' {tuple(batch.input_ids.shape)}")
    return torch.where(batch.attention_mask, targets.to(batch.input_ids.device).long(), -1)


def logit_lens(
    model: Any,
    inputs: Any,
    *,
    tokenizer: Any = None,
    layers: Any = None,
    sites: Any = ("resid",),
    top_k: int = 5,
    targets: Any = "next",
    chunk_size: int = 384,
    fused: bool = False,
) -> LensResult:
    """The logit lens of ``inputs`` at every requested layer and position.

    ``inputs``: ids ``[batch, pos]``, a :class:`~reslens.hooks.Batch`, or text with
    ``tokenizer=``. ``layers`` (0..n_layer, default all) and ``sites`` (``"resid"``,
    ``"resid_mid"``) choose the lens rows; ``targets`` is ``"next"`` (the actual next
    token), a ``[batch, pos]`` id tensor (-1 = none), or None. ``chunk_size`` is how many
    (row, position) pairs are unembedded at once: peak extra memory is about
    ``chunk_size x d_vocab x 4`` bytes plus the final layer's distribution for those positions
    (blocks hold at least 32 positions per row, so a smaller ``chunk_size`` is rounded up).
    ``fused=True`` compiles the per-row reduction with ``torch.compile`` (one-off compile
    of ~12-20 s on CPU, then about half the reduction time: worth it for long inputs and
    :func:`lens_stats`; on GPU it becomes a fused Triton kernel).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> lens = logit_lens(model, torch.tensor([[1, 2, 3, 4]]), top_k=3)
    >>> lens.row_labels, tuple(lens.top_ids.shape), tuple(lens.entropy.shape)
    (['0', '1', '2'], (3, 1, 4, 3), (3, 1, 4))
    """
    g = GPT2(model)
    sites = check_sites(sites, LENS_SITES)
    kept = check_layers(layers, g.n_layer, what=f"a {g.n_layer}-layer model's residual stream")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= g.d_vocab:
        raise ValueError(f"top_k must be an int in 1..{g.d_vocab}; got {top_k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False; got {fused!r}")
    reduce = _reducer(fused)
    batch = as_batch(inputs, g, tokenizer)
    target_ids = _resolve_targets(targets, batch)
    if target_ids is not None and int(target_ids.max()) >= g.d_vocab:
        raise ValueError(f"targets contains id {int(target_ids.max())}, outside the vocabulary 0..{g.d_vocab - 1}")

    # Lens rows in depth order: resid l, resid_mid l, resid l+1, ...
    rows = [
        (site, layer)
        for layer in kept
        for site in LENS_SITES
        if site in sites and (site == "resid" or layer < g.n_layer)
    ]
    if not rows:
        raise ValueError(f"layers={list(kept)} with sites={list(sites)} select no lens row")
    res = capture(model, batch, sites=("resid", *(s for s in sites if s != "resid")), layers=sorted({*kept, g.n_layer}))

    n_rows = len(rows)
    real_b, real_p = batch.attention_mask.nonzero(as_tuple=True)  # [N] real positions
    n_real = real_b.numel()
    dev = res.resid.device
    out = {name: torch.full((n_rows, n_real), torch.nan, device=dev) for name in _FLOAT_ROWS}
    out["top_ids"] = torch.full((n_rows, n_real, top_k), -1, dtype=torch.long, device=dev)
    out["top_probs"] = torch.full((n_rows, n_real, top_k), torch.nan, device=dev)
    out["target_rank"] = torch.full((n_rows, n_real), -1, dtype=torch.long, device=dev)
    final_top1 = torch.empty(n_real, dtype=torch.long, device=dev)
    flat_targets = None if target_ids is None else target_ids[real_b, real_p]

    def source(site: str, layer: int) -> torch.Tensor:
        return res.get(site, layer)[real_b, real_p]  # [N, d_model]

    final_resid = source("resid", g.n_layer)
    sources = {row: source(*row) for row in rows if row != ("resid", g.n_layer)}
    final_row = rows.index(("resid", g.n_layer)) if ("resid", g.n_layer) in rows else None
    others = [r for r, row in enumerate(rows) if row in sources]
    # Positions per block: a multiple of _SUB_ROWS so each reduction reads views, not copies.
    per_block = max(_SUB_ROWS, chunk_size // max(1, len(others)) // _SUB_ROWS * _SUB_ROWS)
    with torch.no_grad():
        for start in range(0, n_real, per_block):
            cols = slice(start, min(start + per_block, n_real))
            c = cols.stop - cols.start
            final_logits = g.unembed(g.apply_ln_f(final_resid[cols])).float()  # [c, vocab], the model's own
            ref = _reference(final_logits)
            final_top1[cols] = ref.top1
            blocks = [] if final_row is None else [(final_row, final_logits)]
            if others:
                # Unembed every other lens row of these positions at once: [len(others) * c, vocab].
                logits = g.unembed(g.apply_ln_f(torch.cat([sources[rows[r]][cols] for r in others]))).float()
                blocks += [(r, logits[i * c : (i + 1) * c]) for i, r in enumerate(others)]
            for r, z in blocks:
                for lo in range(0, c, _SUB_ROWS):
                    part = slice(lo, min(lo + _SUB_ROWS, c))
                    target = None if flat_targets is None else flat_targets[start + part.start : start + part.stop]
                    at = (r, slice(start + part.start, start + part.stop))
                    _reduce_rows(reduce, z[part], ref, part, target, top_k, out, at)
            del blocks, final_logits
            if others:
                del logits

    shape = tuple(batch.input_ids.shape)

    def spread(flat: torch.Tensor, fill: float) -> torch.Tensor:
        """``[R, N, *rest]`` over real positions -> ``[R, B, P, *rest]`` with pads filled."""
        full = flat.new_full((flat.shape[0], *shape, *flat.shape[2:]), fill)
        full[:, real_b, real_p] = flat
        return full

    top1_final = final_top1.new_full(shape, -1)
    top1_final[real_b, real_p] = final_top1
    top_ids = spread(out["top_ids"], -1)
    result = dict(
        site_of_row=tuple(site for site, _ in rows),
        layer_of_row=tuple(layer for _, layer in rows),
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        targets=target_ids,
        top_ids=top_ids,
        top_probs=spread(out["top_probs"], torch.nan),
        target_rank=None if target_ids is None else spread(out["target_rank"], -1),
        final_top1=top1_final,
        convergence_layer=_convergence(top_ids[..., 0], top1_final, rows),
        token_strings=_token_strings(tokenizer, top_ids, batch.input_ids, target_ids),
    )
    for name in _FLOAT_ROWS:
        result[name] = spread(out[name], torch.nan)
    if target_ids is None:
        result["target_logprob"] = None
    return LensResult(**result)


def _convergence(top1: torch.Tensor, final_top1: torch.Tensor, rows: list[tuple[str, int]]) -> torch.Tensor:
    """First layer from which the ``resid`` rows' top-1 stays the final top-1; -1 if never (or pad).

    ``top1: [R, B, P]``, ``final_top1: [B, P]`` -> ``[B, P]``.
    """
    use = [r for r, (site, _) in enumerate(rows) if site == "resid"] or list(range(len(rows)))
    agree = top1[use] == final_top1  # [R', B, P]
    # Rows from the deepest upward: a row counts if it and all deeper rows agree.
    stays = agree.flip(0).cumprod(0).flip(0).bool()
    layer_of = torch.tensor([rows[r][1] for r in use], device=top1.device)
    first = torch.where(stays.any(0), stays.int().argmax(0), -1)
    out = torch.where(first >= 0, layer_of[first.clamp(min=0)], -1)
    return torch.where(final_top1 >= 0, out, -1)


def _token_strings(tokenizer: Any, *id_tensors: torch.Tensor | None) -> dict[int, str] | None:
    """Decoded string of every id that appears in the result."""
    if tokenizer is None:
        return None
    ids = torch.cat([t.flatten() for t in id_tensors if t is not None]).unique().tolist()
    return {i: tokenizer.decode([i]) for i in ids if i >= 0}


# --- statistics over a data set -----------------------------------------------------------

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class LensStats:
    """Per-layer logit-lens statistics of a data set (Geva et al. 2021, Figs. 9-10).

    ``R`` = number of residual layers in ``layers``.

    - ``mean[metric]: [R]`` over every real position (target metrics: positions with a target)
    - ``quantiles[metric]: [R, len(quantile_levels)]``, from a uniform sample of at most
      ``max_samples`` positions (exact when ``exact_quantiles``)
    - ``top1_agreement: [R]``: fraction of positions whose top-1 equals the final top-1
    - ``final_token_prob: [R]``: mean probability the layer gives the final top-1 token
    - ``input_token_top1: [R]``: fraction whose top-1 is the *input* token at that position
    """

    layers: tuple[int, ...]
    n_positions: int
    n_sequences: int
    mean: dict[str, torch.Tensor]
    quantiles: dict[str, torch.Tensor]
    quantile_levels: tuple[float, ...]
    top1_agreement: torch.Tensor
    final_token_prob: torch.Tensor
    input_token_top1: torch.Tensor
    exact_quantiles: bool

    def to_frame(self):
        """``pandas.DataFrame`` with one row per layer and a column per statistic."""
        import pandas as pd

        columns: dict[str, Any] = {"layer": list(self.layers)}
        for name, values in self.mean.items():
            columns[f"mean_{name}"] = values.numpy()
        for name, values in self.quantiles.items():
            for j, level in enumerate(self.quantile_levels):
                columns[f"q{round(level * 100):02d}_{name}"] = values[:, j].numpy()
        columns["top1_agreement"] = self.top1_agreement.numpy()
        columns["final_token_prob"] = self.final_token_prob.numpy()
        columns["input_token_top1"] = self.input_token_top1.numpy()
        return pd.DataFrame(columns)

    def table(self) -> str:
        """A per-layer text table of the headline statistics."""
        head = f"{'layer':>5} {'top1=final':>10} {'p(final)':>9} {'top1=input':>10} {'KL(f||l)':>9} {'entropy':>8} {'logp(next)':>10} {'med rank':>8}"
        lines = [f"{self.n_positions} positions in {self.n_sequences} sequences", head, "-" * len(head)]
        for r, layer in enumerate(self.layers):
            lines.append(
                f"{layer:>5} {self.top1_agreement[r]:>10.3f} {self.final_token_prob[r]:>9.3f} "
                f"{self.input_token_top1[r]:>10.3f} {self.mean['kl_final_layer'][r]:>9.3f} "
                f"{self.mean['entropy'][r]:>8.3f} {self.mean['target_logprob'][r]:>10.3f} "
                f"{self.quantiles['target_rank'][r, len(self.quantile_levels) // 2]:>8.0f}"
            )
        return "\n".join(lines)

    def plot(self, *, ax=None):
        from reslens.plot import plot_lens_stats

        return plot_lens_stats(self, ax=ax)

    def __repr__(self) -> str:
        return f"LensStats(layers={self.layers[0]}..{self.layers[-1]}, positions={self.n_positions})"


def _windows(tokenizer: Any, data: Any, max_length: int) -> list[list[int]]:
    """Token windows of at most ``max_length`` ids from a text or a list of texts."""
    texts = [data] if isinstance(data, str) else list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("data must be a string, a list of strings, or an iterable of Batch / id tensors")
    if tokenizer is None:
        raise TypeError("text data needs tokenizer= (e.g. from reslens.load_model())")
    windows = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length))
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("data holds no text of at least 2 tokens")
    return windows


def _batches(windows: list[list[int]], batch_size: int, pad_id: int):
    for i in range(0, len(windows), batch_size):
        yield pad_ids(windows[i : i + batch_size], pad_id=pad_id)


class _Reservoir:
    """A uniform sample of at most ``size`` columns of ``[R, n]`` value streams."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen = size, 0
        self.values: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, values: torch.Tensor) -> None:  # values: [R, n]
        n = values.shape[1]
        if self.values is None:
            self.values = values[:, : self.size].clone()
            taken = self.values.shape[1]
        else:
            room = self.size - self.values.shape[1]
            taken = min(room, n)
            self.values = torch.cat([self.values, values[:, :taken]], dim=1)
        rest = values[:, taken:]
        if rest.shape[1]:
            t = torch.arange(self.seen + taken, self.seen + n) + 1
            slot = (torch.rand(rest.shape[1], generator=self.gen) * t).long()
            keep = slot < self.size
            self.values[:, slot[keep]] = rest[:, keep]
        self.seen += n


def lens_stats(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    layers: Any = None,
    max_length: int = 128,
    batch_size: int = 8,
    quantiles: tuple[float, ...] = QUANTILES,
    max_samples: int = 100_000,
    chunk_size: int = 384,
    fused: bool = False,
    progress: bool = True,
) -> LensStats:
    """Stream ``data`` through the logit lens and return per-layer statistics.

    ``data``: a text, a list of texts (cut into windows of ``max_length`` tokens), or an
    iterable of :class:`~reslens.hooks.Batch` / ``[batch, pos]`` id tensors. Memory stays
    bounded: only running sums and a sample of ``max_samples`` positions per metric are
    kept. Shows a tqdm progress bar unless ``progress=False``. ``fused=True`` compiles the
    per-row reduction (see :func:`logit_lens`), which pays off over a data set.
    """
    from tqdm.auto import tqdm

    g = GPT2(model)
    kept = check_layers(layers, g.n_layer, what=f"a {g.n_layer}-layer model's residual stream")
    if not all(0 < q < 1 for q in quantiles) or not quantiles:
        raise ValueError(f"quantiles must be levels strictly between 0 and 1; got {quantiles!r}")
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("max_samples", max_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if isinstance(data, (str, list, tuple)) and all(isinstance(t, str) for t in ([data] if isinstance(data, str) else data)):
        windows = _windows(tokenizer, data, min(max_length, g.n_positions))
        batches, total = _batches(windows, batch_size, pad_token_id(tokenizer)), -(-len(windows) // batch_size)
    else:
        batches, total = data, (len(data) if hasattr(data, "__len__") else None)

    n_rows = len(kept)
    sums = {name: torch.zeros(n_rows, dtype=torch.float64) for name in METRICS}
    counts = {name: 0 for name in METRICS}
    agree = torch.zeros(n_rows, dtype=torch.float64)
    is_input = torch.zeros(n_rows, dtype=torch.float64)
    reservoirs = {name: _Reservoir(max_samples, seed=i) for i, name in enumerate(METRICS)}
    n_positions = n_sequences = 0
    for batch in tqdm(batches, total=total, desc="lens stats", unit="batch", disable=not progress):
        lens = logit_lens(model, batch, layers=kept, top_k=1, chunk_size=chunk_size, fused=fused)
        mask = lens.attention_mask.cpu()
        has_target = (lens.targets.cpu() >= 0) & mask
        for name in METRICS:
            use = has_target if name.startswith("target_") else mask
            values = getattr(lens, name).cpu()[:, use].double()  # [R, n]
            sums[name] += values.sum(1)
            counts[name] += values.shape[1]
            reservoirs[name].add(values.float())
        top1 = lens.top_ids[..., 0].cpu()[:, mask]  # [R, n]
        agree += (top1 == lens.final_top1.cpu()[mask]).sum(1)
        is_input += (top1 == lens.input_ids.cpu()[mask]).sum(1)
        n_positions += int(mask.sum())
        n_sequences += mask.shape[0]
    if n_positions == 0:
        raise ValueError("data is empty: no position was scored")
    levels = torch.tensor(quantiles, dtype=torch.float32)
    return LensStats(
        layers=kept,
        n_positions=n_positions,
        n_sequences=n_sequences,
        mean={name: (sums[name] / max(counts[name], 1)).float() for name in METRICS},
        quantiles={name: torch.quantile(reservoirs[name].values.float(), levels, dim=1).T for name in METRICS},
        quantile_levels=tuple(quantiles),
        top1_agreement=(agree / n_positions).float(),
        final_token_prob=(sums["final_top1_prob"] / counts["final_top1_prob"]).float(),
        input_token_top1=(is_input / n_positions).float(),
        exact_quantiles=all(r.seen <= max_samples for r in reservoirs.values()),
    )
