"""The per-row reduction of the logit lens: logits ``[n, vocab]`` to every kept metric.

Also the steps after it: non-finite cells marked, real positions spread back, the convergence layer.

Two reducers compute the same metrics (definitions in :mod:`reslens.lens`):

- ``fused=False``: eager torch, ``log p = z - logsumexp(z)`` (torch's own cascade sums).
- ``fused=True``: one ``torch.compile``d kernel. Compiled reductions accumulate in the order the
  generated loop runs (on CPU, one float32 accumulator per vector lane over the whole vocabulary),
  so on peaked rows, where one term is near 1 and tens of thousands are tiny, a float32 sum loses
  the tiny terms' low bits: ``Σ exp`` came out ~4e-5 off, and ``log p`` with it. The fused kernel
  therefore accumulates every vocabulary sum in float64 and forms
  ``log p = (z - max z) - log Σ exp(z - max z)``, which never rounds at the magnitude of the
  log-sum-exp: it is more exact than the eager path and no slower.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from reslens._text import html_table
from reslens._tokens import token_id

__all__ = ["resolve_targets",
           "Reference", "BLOCK_OUTPUTS", "FLOAT_ROWS", "SUB_ROWS", "reducer", "reference", "reduce_rows",
           "mark_non_finite", "spread", "convergence"]

SUB_ROWS = 32  # rows reduced together after each unembedding block: keeps [rows, vocab] temporaries in cache
FLOAT_ROWS = ("target_logprob", "entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob",
              "final_top1_prob")
VS_FINAL = ("kl_final_layer", "kl_layer_final", "js", "final_top1_prob")  # read the final distribution
BLOCK_OUTPUTS = ("top_ids", "top_probs", "target_rank", "target_logprob", "entropy",
                 "kl_layer_final", "kl_final_layer", "js", "max_prob", "final_top1_prob", "final_top1_rank")


@dataclass
class Reference:
    """The final layer's distribution for a block of positions (``c`` = positions)."""

    logp: torch.Tensor  # [c, vocab]
    p: torch.Tensor  # [c, vocab]
    entropy: torch.Tensor  # [c]
    top1: torch.Tensor  # [c]
    finite: torch.Tensor  # [c] bool: the final logits are finite

    def __repr__(self) -> str:
        c, vocab = self.logp.shape
        return f"Reference(positions={c}, vocab={vocab}, finite={int(self.finite.sum())})"

    def _repr_html_(self) -> str:
        """The first 20 positions: the final top-1 id, its probability and the entropy (nats)."""
        p_top1 = self.p.gather(-1, self.top1[:, None]).squeeze(-1)
        rows = [(i, int(self.top1[i]), float(p_top1[i]), float(self.entropy[i]))
                for i in range(min(20, len(self.top1)))]
        return html_table(repr(self), ("position", "top-1 id", "p(top-1)", "entropy"), rows)


def _block_metrics(
    z: torch.Tensor,
    ref_p: torch.Tensor,
    ref_logp: torch.Tensor,
    ref_entropy: torch.Tensor,
    ref_top1: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, ...]:
    """Every lens metric of logits ``z: [n, vocab]`` (float32) against the final layer's.

    ``ref_p``, ``ref_logp: [n, vocab]``, ``ref_entropy``, ``ref_top1``, ``target: [n]`` (-1 =
    none); returns the tensors named in ``BLOCK_OUTPUTS``.
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
        (z > z.gather(1, ref_top1[:, None])).sum(-1),  # the final top-1's rank in this row
    )


def _block_metrics_fused(
    z: torch.Tensor,
    ref_p: torch.Tensor,
    ref_logp: torch.Tensor,
    ref_entropy: torch.Tensor,
    ref_top1: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, ...]:
    """:func:`_block_metrics` for compilation (see the module docstring).

    Vocabulary sums accumulate in float64; log-probs come from the max-shifted logits.
    """
    f64 = torch.float64
    top_logits, top_ids = z.topk(top_k, dim=-1)
    target_logit = z.gather(1, target.clamp(min=0)[:, None])  # [n, 1]
    rank = (z > target_logit).sum(-1)
    z_max = z.amax(-1, keepdim=True)
    shifted = z - z_max
    log_sum = shifted.exp().to(f64).sum(-1, keepdim=True).log().float()  # [n, 1]
    logp = shifted - log_sum
    p = logp.exp()
    entropy = -(p * logp).to(f64).sum(-1)
    kl_layer_final = (p * (logp - ref_logp)).to(f64).sum(-1)
    kl_final_layer = (ref_p * (ref_logp - logp)).to(f64).sum(-1)
    m = 0.5 * (p + ref_p)
    js = -torch.xlogy(m, m).to(f64).sum(-1) - 0.5 * (entropy + ref_entropy.to(f64))
    top_probs = ((top_logits - z_max) - log_sum).exp()
    has_target = target >= 0
    return (
        top_ids,
        top_probs,
        torch.where(has_target, rank, -1),
        torch.where(has_target, ((target_logit - z_max) - log_sum).squeeze(1), torch.nan),
        entropy.float(),
        kl_layer_final.clamp(min=0).float(),
        kl_final_layer.clamp(min=0).float(),
        js.clamp(min=0).float(),
        top_probs[:, 0],
        p.gather(1, ref_top1[:, None]).squeeze(1),
        (z > z.gather(1, ref_top1[:, None])).sum(-1),  # the final top-1's rank in this row
    )


_COMPILED: dict[str, Any] = {}


def reducer(fused: bool):
    """The per-row reducer: eager, or the float64-accumulating kernel compiled once.

    ``torch.compile`` needs a C++ compiler on CPU, Triton on GPU; errors surface on the first call.
    """
    if not fused:
        return _block_metrics
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_block_metrics_fused, dynamic=False)
    return _COMPILED["fn"]


def reference(z: torch.Tensor, fused: bool) -> Reference:
    """The final layer's distribution of logits ``z: [c, vocab]``, in each reducer's arithmetic."""
    if fused:
        shifted = z - z.amax(-1, keepdim=True)
        logp = shifted - shifted.exp().sum(-1, keepdim=True, dtype=torch.float64).log().float()
        p = logp.exp()
        entropy = -(p * logp).sum(-1, dtype=torch.float64).float()
    else:
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # the same arithmetic as _block_metrics
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
    return Reference(logp=logp, p=p, entropy=entropy, top1=z.argmax(-1), finite=entropy.isfinite())


def reduce_rows(
    reduce: Any,
    z: torch.Tensor,
    ref: Reference,
    ref_rows: slice,
    target: torch.Tensor | None,
    top_k: int,
    out: dict[str, torch.Tensor],
    at: tuple[int, slice],
) -> None:
    """Reduce logits ``z: [n, vocab]`` to the kept metrics, written to ``out[name][at]``.

    ``ref_rows`` picks the rows' final-layer references; ``target: [n]`` (-1 = none).
    Blocks shorter than ``SUB_ROWS`` are padded so a compiled reducer sees one shape.
    """
    n = z.shape[0]
    if target is None:
        target = torch.full((n,), -1, dtype=torch.long, device=z.device)
    args = [z, ref.p[ref_rows], ref.logp[ref_rows], ref.entropy[ref_rows], ref.top1[ref_rows], target]
    if n < SUB_ROWS and reduce is not _block_metrics:
        pad = SUB_ROWS - n
        args = [
            torch.nn.functional.pad(t, (0, 0, 0, pad) if t.ndim == 2 else (0, pad),
                                    value=-1 if t is target else 0)
            for t in args
        ]
    values = reduce(*args, top_k)
    for name, value in zip(BLOCK_OUTPUTS, values):
        out[name][at] = value[:n]


def mark_non_finite(out: dict[str, torch.Tensor], final_top1: torch.Tensor,
                    final_finite: torch.Tensor) -> int:
    """Blank the cells whose logits were not finite, in place; returns how many cells lost something.

    Such a cell gets ids and rank -1 and NaN metrics; where the final logits were not finite the
    metrics against the final layer are NaN and the final top-1 is -1. One device sync.
    """
    bad = ~out["entropy"].isfinite()  # [R, N]: NaN/inf logits always give a non-finite entropy
    out["top_ids"].masked_fill_(bad[..., None], -1)
    out["top_probs"].masked_fill_(bad[..., None], torch.nan)
    out["target_rank"].masked_fill_(bad, -1)
    out["final_top1_rank"].masked_fill_(bad | ~final_finite, -1)
    for name in FLOAT_ROWS:
        out[name].masked_fill_(bad, torch.nan)
    for name in VS_FINAL:
        out[name].masked_fill_(~final_finite, torch.nan)
    final_top1.masked_fill_(~final_finite, -1)
    return int((bad | ~final_finite).sum())


def spread(flat: torch.Tensor, shape: tuple[int, ...], real: tuple[torch.Tensor, ...],
           fill: float) -> torch.Tensor:
    """``[R, N, *rest]`` over real positions -> ``[R, B, P, *rest]`` with pads filled."""
    full = flat.new_full((flat.shape[0], *shape, *flat.shape[2:]), fill)
    full[:, real[0], real[1]] = flat
    return full


def convergence(top1: torch.Tensor, final_top1: torch.Tensor, rows: list[tuple[str, int]]) -> torch.Tensor:
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


def resolve_targets(targets: Any, input_ids: torch.Tensor, mask: torch.Tensor, d_vocab: int,
                    tokenizer: Any = None) -> torch.Tensor | None:
    """``[B, P]`` target ids (-1 = none) from ``"next"``, one token, an integer id tensor, or None.

    One token (an id, or one token's text with ``tokenizer``: :func:`reslens._tokens.token_id`) is the
    target at every real position.
    """
    if targets is None:
        return None
    if isinstance(targets, str) and targets == "next":
        nxt = torch.full_like(input_ids, -1)
        nxt[:, :-1] = torch.where(mask[:, 1:] & mask[:, :-1], input_ids[:, 1:], -1)
        return nxt
    one = isinstance(targets, torch.Tensor) and targets.ndim == 0
    if one or isinstance(targets, (str, numbers.Integral)):
        target = token_id(targets, d_vocab=d_vocab, tokenizer=tokenizer, name="targets")
        return torch.where(mask, target, -1)
    if not isinstance(targets, torch.Tensor):
        raise TypeError("targets must be 'next', one token (an id, or its text with tokenizer=), a "
                        f"[batch, pos] id tensor or None; got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids (-1 = none); got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(input_ids.shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; "
                         f"expected the inputs' {tuple(input_ids.shape)}")
    targets = torch.where(mask, targets.to(input_ids.device).long(), -1)
    low, high = int(targets.min()), int(targets.max())
    if high >= d_vocab or low < -1:
        bad = high if high >= d_vocab else low
        raise ValueError(f"targets contains id {bad}, outside the vocabulary 0..{d_vocab - 1} "
                         "(or -1 for none)")
    return targets
