"""The logit lens (nostalgebraist 2020): each layer's residual through the final norm and the unembedding.

Every metric is computed in one bounded-memory pass.

:func:`lens_of` reads captured :class:`~reslens.residuals.Residuals` (no forward, no hooks);
:func:`logit_lens` captures and then calls it. The final norm is applied to the raw residual
stream (``resid``, ``resid_mid``), never to HuggingFace's already-normalised last hidden state, so
the last layer's row is exactly the model's own prediction. Logits are turned into probabilities
in float32 whatever the model's dtype. The full ``[rows, pos, vocab]`` array is never built: rows
are unembedded in blocks of ``chunk_size`` and each block is reduced to what the result keeps a
few rows at a time (:mod:`reslens.lens._metrics`), so the work stays in cache.

Metric definitions (``p`` = the layer's distribution, ``q`` = the final layer's):

- ``target_logprob`` = ``log p(target)``; ``target_rank`` = number of vocabulary entries
  whose logit is strictly larger than the target's (0 = top-1)
- ``entropy`` = ``H(p)`` in nats; ``max_prob`` = ``max p``
- ``kl_final_layer`` = ``KL(q || p)``; ``kl_layer_final`` = ``KL(p || q)`` (nats)
- ``js`` = ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` (nats, at most ``ln 2``)
- ``final_top1_prob`` = ``p(argmax q)``; ``final_top1_rank`` = the rank of ``argmax q`` in ``p`` (0 = top-1)

Non-finite residuals (NaN or inf, e.g. a float16 overflow) never pass for a prediction: a lens
cell whose logits are not finite gets ids and rank -1 and NaN metrics, and a warning says how many.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._checks import check_bool, check_int, check_layers, check_sites
from reslens._inputs import as_batch
from reslens.lens._metrics import FLOAT_ROWS as _FLOAT_ROWS
from reslens.lens._plot import lens_table
from reslens.lens._metrics import (SUB_ROWS, convergence, mark_non_finite, reduce_rows, reducer, reference,
                                   resolve_targets, spread)
from reslens._saving import Saveable
from reslens._text import pandas
from reslens._tokens import token_strings
from reslens.arch import Arch, adapter
from reslens.hooks import _capture
from reslens.lens._data import model_name
from reslens.lens.values import Lens, as_lens
from reslens.residuals import Residuals

__all__ = ["LensResult", "logit_lens", "lens_of", "LENS_SITES", "METRICS"]

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


@dataclass(frozen=True, repr=False)
class LensResult(Saveable):
    """The logit lens of a batch: one lens row per (site, layer), in depth order.

    ``R`` = number of lens rows, ``B`` = batch, ``P`` = positions, ``k`` = top-k. Row ``r``
    reads ``site_of_row[r]`` at layer ``layer_of_row[r]`` (``resid_mid l`` sits between
    ``resid l`` and ``resid l+1``). Pad positions hold NaN (floats) or -1 (ints); so do
    non-finite cells (:attr:`non_finite`).

    - ``input_ids``, ``attention_mask`` (bool): ``[B, P]``; ``targets: [B, P]`` (-1 = none) or None
    - ``top_ids: [R, B, P, k]`` (int64), ``top_probs: [R, B, P, k]`` (float32)
    - ``target_logprob``, ``entropy``, ``kl_final_layer``, ``kl_layer_final``, ``js``,
      ``max_prob``, ``final_top1_prob``: ``[R, B, P]`` float32; ``target_rank: [R, B, P]`` int64
      (target metrics are None when ``targets`` is None)
    - ``final_top1: [B, P]``: the model's own top-1 token (-1 at pads and where it is not finite)
    - ``convergence_layer: [B, P]``: first ``resid`` layer from which the top-1 stays equal
      to the final top-1 (-1 if the last lens row disagrees, or at pads)
    - ``final_top1_rank: [R, B, P]`` (int64): the rank of the model's own top-1 in each row (0 = top-1;
      -1 at pads and non-finite cells; None in results saved before it existed)
    - ``token_strings``: id -> decoded string for every id above (None without a tokenizer)
    - ``lens_name``: the name of the lens read (``"logit lens"``, ``"tuned lens"``, ``"linear shortcut"``; see
      :mod:`reslens.lens.values`; the lens itself is a :class:`~reslens.lens.Lens` value); ``model_name``:
      the checkpoint's name or path, else the model's class (``""`` in results saved before it existed)
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
    lens_name: str = "logit lens"
    final_top1_rank: torch.Tensor | None = None
    model_name: str = field(default="", compare=False)

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
        for name in (*_FLOAT_ROWS, "target_rank", "final_top1_rank"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n_rows, *batch_pos):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(n_rows, *batch_pos)}")
        if self.top_ids.shape != self.top_probs.shape or self.top_ids.shape[:3] != (n_rows, *batch_pos):
            raise ValueError(f"top_ids/top_probs must be [{n_rows}, {batch_pos[0]}, {batch_pos[1]}, k]")

    # --- access ---------------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        return self.top_ids.shape[-1]

    @property
    def non_finite(self) -> torch.Tensor:
        """``[R, B, P]`` bool: real positions whose lens logits were NaN or inf (ids -1, metrics NaN)."""
        return (self.top_ids[..., 0] < 0) & self.attention_mask

    def row(self, layer: int, site: str = "resid") -> int:
        """Index of the lens row that reads ``site`` at ``layer``."""
        for r, (s, at) in enumerate(zip(self.site_of_row, self.layer_of_row)):
            if s == site and at == layer:
                return r
        kept = [f"{s} {at}" for s, at in zip(self.site_of_row, self.layer_of_row)]
        raise ValueError(f"no lens row for site={site!r} layer={layer}; rows: {', '.join(kept)}")

    @property
    def row_labels(self) -> list[str]:
        """``'resid 3'``, ``'resid_mid 3'``, ... one per row."""
        return [str(n) if s == "resid" else f"{s} {n}" for s, n in zip(self.site_of_row, self.layer_of_row)]

    def token(self, token_id: int) -> str:
        """The string of ``token_id`` (its number when the lens ran without a tokenizer)."""
        if token_id < 0:
            return ""
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    # --- output ---------------------------------------------------------------------------

    def to_frame(self):
        """Long-form ``pandas.DataFrame``: one row per (lens row, sequence, real position).

        ``finite`` is False where the lens logits were NaN or inf (ids -1, metrics NaN).
        """
        pd = pandas()
        n_rows = len(self.site_of_row)
        mask = self.attention_mask.cpu()
        r_idx, b_idx, p_idx = torch.nonzero(mask.expand(n_rows, *mask.shape), as_tuple=True)
        cpu = {name: getattr(self, name).cpu() if getattr(self, name) is not None else None
               for name in ("input_ids", "targets", "top_ids", "top_probs", *METRICS, "convergence_layer")}
        columns: dict[str, Any] = {
            "site": [self.site_of_row[r] for r in r_idx.tolist()],
            "layer": [self.layer_of_row[r] for r in r_idx.tolist()],
            "seq": b_idx.numpy(),
            "pos": p_idx.numpy(),
            "input_id": cpu["input_ids"][b_idx, p_idx].numpy(),
        }
        top1 = cpu["top_ids"][r_idx, b_idx, p_idx, 0]
        columns["input_token"] = [self.token(i) for i in columns["input_id"].tolist()]
        if cpu["targets"] is not None:
            target = cpu["targets"][b_idx, p_idx]
            columns["target_id"] = target.numpy()
            columns["target_token"] = [self.token(i) for i in target.tolist()]
        columns["top1_id"] = top1.numpy()
        columns["top1_token"] = [self.token(i) for i in top1.tolist()]
        columns["top1_prob"] = cpu["top_probs"][r_idx, b_idx, p_idx, 0].numpy()
        columns["finite"] = (top1 >= 0).numpy()
        for name in METRICS:
            if cpu[name] is not None:
                columns[name] = cpu[name][r_idx, b_idx, p_idx].numpy()
        columns["convergence_layer"] = cpu["convergence_layer"][b_idx, p_idx].numpy()
        return pd.DataFrame(columns)

    def table(self, seq: int = 0, *, width: int = 100, cell: int = 9) -> str:
        """The classic logit-lens table of sequence ``seq`` as text.

        Columns are positions; the top line is the actual next token, the bottom line the
        input token, and each row in between is a layer's top-1 token (deepest on top;
        ``NaN`` where the lens logits were not finite). Inputs wider than ``width`` characters
        are split into windows of positions.
        """
        return lens_table(self, seq=seq, width=width, cell=cell)

    def summary(self, seq: int = 0, *, width: int = 100) -> str:
        """What to read from the table (a few lines of text; :mod:`reslens.lens._summary`).

        At the last position: the model's top-1 and its rank in every row (0 = top-1, from
        ``final_top1_rank``) and the row from which it stays top-1; over the positions, the median layer
        at which the final top-1 settles.
        """
        from reslens.lens._summary import lens_summary

        return lens_summary(self, seq, width=width)

    def plot(self, metric: str = "prob", seq: int = 0, *, ax=None, max_positions: int = 40,
             per_row: int = 24):
        """Heatmap (layers x positions) of ``metric`` with the top-1 token written in each cell.

        ``metric``: ``"prob"`` (top-1 probability), ``"rank"`` (rank of the actual next token),
        ``"entropy"``, ``"kl"`` (KL(final || layer)). Longer inputs are wrapped into stacked panels
        of at most ``per_row`` positions, of equal widths. Needs matplotlib. Returns the figure.
        Several lenses of one text in one figure: :func:`reslens.plot.plot_lenses`.
        """
        from reslens.lens._plot import plot_lens

        return plot_lens(self, metric=metric, seq=seq, ax=ax, max_positions=max_positions, per_row=per_row)

    def explore(self, **options: Any):
        """The interactive explorer page of this result (:func:`reslens.explorer.explore`'s options)."""
        from reslens.explorer import explore

        return explore(self, **options)

    def _repr_html_(self) -> str:
        """A coloured grid of sequence 0 (at most 40 positions), deepest layer on top.

        A caption names the lens and the model. Each cell's background is the layer's top-1
        probability, its text the top-1 token.
        """
        from reslens.lens._plot import lens_html

        return lens_html(self)

    def __repr__(self) -> str:
        n_rows = len(self.site_of_row)
        return (
            f"LensResult(rows={n_rows} [{self.row_labels[0]} .. {self.row_labels[-1]}], "
            f"batch={self.input_ids.shape[0]}, pos={self.input_ids.shape[1]}, top_k={self.top_k})"
        )


# --- the computation ----------------------------------------------------------------------


def _lens_rows(kept: tuple[int, ...], sites: tuple[str, ...], n_layer: int) -> list[tuple[str, int]]:
    """Lens rows ``(site, layer)`` in depth order: resid l, resid_mid l, resid l+1, ..."""
    rows = [(site, layer) for layer in kept for site in LENS_SITES
            if site in sites and (site == "resid" or layer < n_layer)]
    if not rows:
        raise ValueError(f"layers={list(kept)} with sites={list(sites)} select no lens row")
    return rows


def _reduce_positions(
    arch: Arch, residuals: Residuals, rows: list[tuple[str, int]], real: tuple[torch.Tensor, ...],
    flat_targets: torch.Tensor | None, top_k: int, chunk_size: int, fused: bool, lens: Lens,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every metric of every lens row at the real positions ``real = (b, p)``, each ``[R, N, ...]``.

    Also returns the final top-1 ``[N]`` and whether the final logits are finite ``[N]``.
    """
    real_b, real_p = real
    n_rows, n_real, dev = len(rows), real_b.numel(), arch.device
    out = {name: torch.full((n_rows, n_real), torch.nan, device=dev) for name in _FLOAT_ROWS}
    out["top_ids"] = torch.full((n_rows, n_real, top_k), -1, dtype=torch.long, device=dev)
    out["top_probs"] = torch.full((n_rows, n_real, top_k), torch.nan, device=dev)
    out["target_rank"] = torch.full((n_rows, n_real), -1, dtype=torch.long, device=dev)
    out["final_top1_rank"] = torch.full((n_rows, n_real), -1, dtype=torch.long, device=dev)
    final_top1 = torch.empty(n_real, dtype=torch.long, device=dev)
    final_finite = torch.empty(n_real, dtype=torch.bool, device=dev)
    reduce, last = reducer(fused), ("resid", arch.n_layer)

    # every row as the lens reads it [N, d_model], the final layer first, in one call (a patchscope batches)
    order = [last, *(row for row in rows if row != last)]
    read = lens.translate_rows([(layer, residuals.get(site, layer)[real_b, real_p].to(dev, arch.dtype))
                                for site, layer in order])
    final_resid, sources = read[0], dict(zip(order[1:], read[1:]))
    final_row = rows.index(last) if last in rows else None
    others = [r for r, row in enumerate(rows) if row in sources]
    # Positions per block: a multiple of SUB_ROWS so each reduction reads views, not copies.
    per_block = max(SUB_ROWS, chunk_size // max(1, len(others)) // SUB_ROWS * SUB_ROWS)
    with torch.no_grad():
        for start in range(0, n_real, per_block):
            cols = slice(start, min(start + per_block, n_real))
            c = cols.stop - cols.start
            final_logits = arch.logits(final_resid[cols]).float()  # [c, vocab], the model's own
            ref = reference(final_logits, fused)
            final_top1[cols], final_finite[cols] = ref.top1, ref.finite
            blocks = [] if final_row is None else [(final_row, final_logits)]
            if others:
                # Unembed every other lens row of these positions at once: [len(others) * c, vocab].
                logits = arch.logits(torch.cat([sources[rows[r]][cols] for r in others])).float()
                blocks += [(r, logits[i * c : (i + 1) * c]) for i, r in enumerate(others)]
            for r, z in blocks:
                for lo in range(0, c, SUB_ROWS):
                    part = slice(lo, min(lo + SUB_ROWS, c))
                    at = slice(start + part.start, start + part.stop)
                    target = None if flat_targets is None else flat_targets[at]
                    reduce_rows(reduce, z[part], ref, part, target, top_k, out, (r, at))
            del blocks, final_logits
            if others:
                del logits
    return out, final_top1, final_finite


def _check_options(arch: Arch, sites: Any, layers: Any, top_k: Any, chunk_size: Any, fused: Any,
                   lens: Any) -> tuple[tuple[str, ...], tuple[int, ...] | None, Lens]:
    """The lens options, checked once where a public function receives them: ``(sites, layers, lens)``.

    ``layers=None`` stays None (all layers for :func:`logit_lens`, those captured for :func:`lens_of`).
    """
    sites = check_sites(sites, LENS_SITES)
    kept = None if layers is None else check_layers(
        layers, arch.n_layer, what=f"a {arch.n_layer}-layer model's residual stream")
    check_int(top_k, "top_k", low=1, high=arch.d_vocab)
    check_int(chunk_size, "chunk_size", low=1)
    check_bool(fused, "fused")
    return sites, kept, _check_lens(lens, arch, sites)


def _check_residuals(residuals: Any, arch: Arch) -> None:
    """Residuals the lens can read: ``resid`` with the ids, the final layer, the model's width."""
    if not isinstance(residuals, Residuals):
        raise TypeError("residuals must be reslens Residuals (from reslens.capture); "
                        f"got {type(residuals).__name__}")
    residuals.require("resid", what="the logit lens")
    if residuals.input_ids is None:
        raise ValueError("residuals hold no input_ids; capture them with reslens.capture")
    if arch.n_layer not in residuals.layers:
        raise ValueError(f"the logit lens needs resid at the final layer {arch.n_layer} (its reference "
                         f"distribution); these residuals hold layers {residuals.layers}")
    if residuals.resid.shape[-1] != arch.d_model:
        raise ValueError(f"residuals have d_model={residuals.resid.shape[-1]}; the model has {arch.d_model} "
                         "(were they captured from another model?)")


def _lens(residuals: Residuals, arch: Arch, *, layers: Any, sites: Any, top_k: int, targets: Any,
          chunk_size: int, fused: bool, tokenizer: Any, warn: bool, lens: Any = None) -> LensResult:
    """:func:`lens_of`: every argument checked, then :func:`_lens_of` (``warn`` as there)."""
    _check_residuals(residuals, arch)
    sites, kept, lens = _check_options(arch, sites, layers, top_k, chunk_size, fused, lens)
    input_ids, mask = residuals.input_ids.to(arch.device), residuals.attention_mask.to(arch.device)
    target_ids = resolve_targets(targets, input_ids, mask, arch.d_vocab, tokenizer)
    rows = _lens_rows(residuals.layers if kept is None else kept, sites, arch.n_layer)
    return _lens_of(residuals, arch, rows=rows, lens=lens, target_ids=target_ids, top_k=top_k,
                    chunk_size=chunk_size, fused=fused, tokenizer=tokenizer, warn=warn, stacklevel=4)


def _lens_of(residuals: Residuals, arch: Arch, *, rows: list[tuple[str, int]], lens: Lens,
             target_ids: torch.Tensor | None, top_k: int, chunk_size: int, fused: bool, tokenizer: Any,
             warn: bool, stacklevel: int = 3) -> LensResult:
    """The lens of residuals and options a public function has checked, checking nothing again.

    ``rows`` from :func:`_lens_rows` (held by ``residuals``, with the final layer), ``lens`` from
    :func:`_check_lens`, ``target_ids`` ``[batch, pos]`` from :func:`resolve_targets` (or None);
    ``warn=False`` leaves the non-finite warning to the caller (lens_stats), ``stacklevel`` says whose.
    """
    input_ids, mask = residuals.input_ids.to(arch.device), residuals.attention_mask.to(arch.device)
    real = mask.nonzero(as_tuple=True)  # [N] real positions
    flat_targets = None if target_ids is None else target_ids[real]
    out, final_top1, final_finite = _reduce_positions(arch, residuals, rows, real, flat_targets, top_k,
                                                      chunk_size, fused, lens)
    n_bad = mark_non_finite(out, final_top1, final_finite)
    if n_bad and warn:
        message = _non_finite_message(n_bad, len(rows) * real[0].numel())
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    shape = tuple(input_ids.shape)
    top1_final = final_top1.new_full(shape, -1)
    top1_final[real] = final_top1
    top_ids = spread(out["top_ids"], shape, real, -1)
    result = dict(
        site_of_row=tuple(site for site, _ in rows), layer_of_row=tuple(layer for _, layer in rows),
        input_ids=input_ids, attention_mask=mask, targets=target_ids, top_ids=top_ids,
        top_probs=spread(out["top_probs"], shape, real, torch.nan),
        target_rank=None if target_ids is None else spread(out["target_rank"], shape, real, -1),
        final_top1=top1_final, convergence_layer=convergence(top_ids[..., 0], top1_final, rows),
        token_strings=token_strings(tokenizer, top_ids, input_ids, target_ids), lens_name=lens.name,
        final_top1_rank=spread(out["final_top1_rank"], shape, real, -1), model_name=model_name(arch),
    )
    for name in _FLOAT_ROWS:
        result[name] = spread(out[name], shape, real, torch.nan)
    if target_ids is None:
        result["target_logprob"] = None
    return LensResult(**result)


def _check_lens(lens: Any, arch: Arch, sites: tuple[str, ...]) -> Lens:
    """The lens as a :class:`~reslens.lens.Lens`, checked against the model and the sites it reads."""
    lens = as_lens(lens)
    lens.check(arch)
    if lens.kind != "logit" and "resid_mid" in sites:
        raise ValueError(f"a {lens.name} translates resid layers only; read resid_mid with the logit lens "
                         "(sites=('resid',) with this lens)")
    return lens


def _non_finite_message(n_bad: int, n_cells: int) -> str:
    return (f"{n_bad} of {n_cells} lens cells (row, position) have non-finite logits, in that row or the "
            "final layer (NaN or inf in the residual stream, e.g. a float16 overflow): they are marked, not "
            "predictions (ids and ranks -1, metrics NaN)")


def lens_of(
    residuals: Residuals,
    arch: Any,
    *,
    layers: Any = None,
    sites: Any = ("resid",),
    top_k: int = 5,
    targets: Any = "next",
    chunk_size: int = 384,
    fused: bool = False,
    tokenizer: Any = None,
    lens: Any = None,
) -> LensResult:
    """The logit lens (or ``lens=``, a learned lens) of captured residuals (no forward, no hooks).

    ``residuals`` must hold ``resid`` at every layer read and at the final layer ``n_layer``
    (the reference distribution: the final raw residual through the final norm and the
    unembedding), and ``resid_mid`` at those blocks when ``sites`` has it. ``arch``: the
    adapter (:func:`reslens.arch.adapter`) or the model. ``layers`` defaults to every residual
    layer captured. The other options are :func:`logit_lens`'s.

    >>> import torch, reslens
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> arch = reslens.arch.adapter(model)
    >>> res = reslens.capture(arch, torch.tensor([[1, 2, 3, 4]]), sites=("resid", "resid_mid"))
    >>> lens_of(res, arch, sites=("resid", "resid_mid"), top_k=2).row_labels
    ['0', 'resid_mid 0', '1', 'resid_mid 1', '2']
    """
    return _lens(residuals, adapter(arch), layers=layers, sites=sites, top_k=top_k, targets=targets,
                 chunk_size=chunk_size, fused=fused, tokenizer=tokenizer, warn=True, lens=lens)


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
    lens: Any = None,
) -> LensResult:
    """The logit lens of ``inputs`` at every requested layer and position (or another lens: ``lens=``).

    ``inputs``: ids ``[batch, pos]``, a :class:`~reslens.Batch`, or text with
    ``tokenizer=``. ``layers`` (0..n_layer, default all) and ``sites`` (``"resid"``,
    ``"resid_mid"``) choose the lens rows; ``targets`` is ``"next"`` (the actual next
    token), one token at every position (an id, or its text with ``tokenizer=``, e.g. ``" Paris"``),
    a ``[batch, pos]`` integer id tensor (-1 = none), or None. ``chunk_size`` is how many
    (row, position) pairs are unembedded at once: peak extra memory is about
    ``chunk_size x d_vocab x 4`` bytes plus the final layer's distribution for those positions
    (blocks hold at least 32 positions per row, so a smaller ``chunk_size`` is rounded up).
    ``fused=True`` compiles the per-row reduction with ``torch.compile`` (one-off compile
    of ~12-20 s on CPU, then about half the reduction time: worth it for long inputs and
    :func:`lens_stats`; on GPU it becomes a fused Triton kernel); it accumulates in float64,
    so it is at least as exact as the eager path. ``lens``: None (the logit lens) or a learned
    lens from :mod:`reslens.lens` (:class:`~reslens.lens.TunedLens`,
    :class:`~reslens.lens.LinearShortcut`), each layer's residual translated before the final
    norm; every metric is the same. Captures once, then :func:`lens_of`.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> lens = logit_lens(model, torch.tensor([[1, 2, 3, 4]]), top_k=3)
    >>> lens.row_labels, tuple(lens.top_ids.shape), tuple(lens.entropy.shape)
    (['0', '1', '2'], (3, 1, 4, 3), (3, 1, 4))
    """
    arch = adapter(model)
    sites, kept, lens = _check_options(arch, sites, layers, top_k, chunk_size, fused, lens)
    kept = tuple(range(arch.n_layer + 1)) if kept is None else kept
    batch = as_batch(inputs, arch, tokenizer)
    # everything is checked before the forward, once
    target_ids = resolve_targets(targets, batch.input_ids, batch.attention_mask, arch.d_vocab, tokenizer)
    rows = _lens_rows(kept, sites, arch.n_layer)
    res = _capture(arch, batch, sites=("resid", *(s for s in sites if s != "resid")),
                   layers=tuple(sorted({*kept, arch.n_layer})))
    return _lens_of(res, arch, rows=rows, lens=lens, target_ids=target_ids, top_k=top_k,
                    chunk_size=chunk_size, fused=fused, tokenizer=tokenizer, warn=True)

