"""Metrics for attribution patching: differentiable scalars of the logits ``[batch, pos, d_vocab]``.

A metric is any callable ``metric(logits) -> scalar tensor``; it must be differentiable in the logits
(float32, after the final soft-cap where the family has one). Rows are the sequences of the clean
batch; under a noise corruption with ``samples`` draws the batch is repeated ``samples`` times (row
``s * batch + b`` is sequence ``b``), and the metrics below repeat their per-sequence targets to fit.
Where :func:`~reslens.atp.attribution_patching` runs several patched copies of the batch in one
forward, it calls the metric on each copy's logits alone, so a metric never sees another copy's rows.

A metric with a ``bind(clean_logits)`` method (:class:`KLToClean`) is bound to the clean run's logits
before use; the bound metric is what the estimate and the exact patches read.
"""

from __future__ import annotations

from typing import Any

import torch

from reslens._text import html_table

__all__ = ["logit_diff", "log_prob", "prob", "KLToClean", "kl_to_clean"]


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 where it is float64 (a float64 model keeps its precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _rows(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """``t [batch, ...]`` repeated to ``n`` rows (the samples of a noise corruption)."""
    if t.shape[0] == n:
        return t
    if t.shape[0] == 0 or n % t.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} rows; the logits have {n} (expected a divisor of {n})")
    return t.repeat(n // t.shape[0], *([1] * (t.ndim - 1)))


def _ids(value: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim > 2:
        raise TypeError(f"{name} must be token ids (ints, one per sequence or [batch, n]); got {value!r}")
    return t.long().reshape(-1) if t.ndim < 2 else t.long()


class _Metric:
    """Reads ``logits[:, positions]`` at target ids; subclasses say what to take of them."""

    def __init__(self, targets: Any, positions: Any, name: str) -> None:
        self.targets = _ids(targets, "targets" if name != "logit_diff" else "answer")
        pos = torch.as_tensor(positions).long()
        self.positions = pos.reshape(-1)
        if self.targets.ndim == 2 and self.targets.shape[1] != len(self.positions):
            raise ValueError(f"targets is [batch, {self.targets.shape[1]}]; positions has "
                             f"{len(self.positions)} entries (one target per position expected)")
        self.name = name

    def _gather(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[rows, n]``: ``logits [rows, pos, vocab]`` at the ``n`` positions and at ``ids``."""
        ids = _rows(ids.to(logits.device), logits.shape[0], "targets")
        at = logits[:, self.positions.to(logits.device)]  # [rows, n, vocab]
        if ids.ndim == 1:
            ids = ids[:, None].expand(-1, at.shape[1])
        return at.gather(-1, ids[..., None])[..., 0]

    def __repr__(self) -> str:
        return f"{self.name}(positions={self.positions.tolist()})"


class _LogitDiff(_Metric):
    def __init__(self, answer: Any, wrong: Any, positions: Any) -> None:
        super().__init__(answer, positions, "logit_diff")
        self.wrong = _ids(wrong, "wrong")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return (self._gather(logits, self.targets) - self._gather(logits, self.wrong)).mean()


class _LogProb(_Metric):
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        lp = wide(logits[:, self.positions.to(logits.device)]).log_softmax(-1)
        ids = _rows(self.targets.to(logits.device), logits.shape[0], "targets")
        if ids.ndim == 1:
            ids = ids[:, None].expand(-1, lp.shape[1])
        value = lp.gather(-1, ids[..., None])[..., 0].mean()
        return value.exp() if self.name == "prob" else value


def logit_diff(answer: Any, wrong: Any, position: Any = -1) -> _LogitDiff:
    """Mean over sequences (and ``position`` columns) of ``logit[answer] - logit[wrong]``.

    ``answer``, ``wrong``: one id per sequence (or one for all). Linear in the logits.
    """
    return _LogitDiff(answer, wrong, position)


def log_prob(targets: Any, positions: Any = -1) -> _LogProb:
    """Mean log-probability of ``targets`` at ``positions`` (the negative loss there).

    ``targets``: one id per sequence, or ``[batch, len(positions)]`` ids (e.g. the next tokens).
    """
    return _LogProb(targets, positions, "log_prob")


def prob(targets: Any, position: Any = -1) -> _LogProb:
    """``exp`` of :func:`log_prob`: the (geometric-mean) probability of ``targets``."""
    return _LogProb(targets, position, "prob")


class KLToClean:
    """Mean ``KL(p_clean ‖ p)`` at ``positions``: 0 on the clean run, growing as a patch changes the output.

    Its gradient at the clean run is zero (a minimum), so plain AtP gives 0 for every component; use
    ``method="ig"`` (the gradients along the path to the corrupted run) with this metric.
    """

    def __init__(self, positions: Any = -1, _clean: torch.Tensor | None = None) -> None:
        self.positions = torch.as_tensor(positions).long().reshape(-1)
        self._clean = _clean  # log p_clean [rows, n, vocab], float32

    def bind(self, clean_logits: torch.Tensor) -> KLToClean:
        """This metric with ``p_clean`` read from the clean run's ``logits [rows, pos, vocab]``."""
        at = wide(clean_logits[:, self.positions.to(clean_logits.device)].detach())
        return KLToClean(self.positions, at.log_softmax(-1))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self._clean is None:
            raise RuntimeError("KLToClean needs the clean logits: call bind(clean_logits) first")
        lp = wide(logits[:, self.positions.to(logits.device)]).log_softmax(-1)
        clean = _rows(self._clean.to(lp.device), lp.shape[0], "the clean logits")
        return (clean.exp() * (clean - lp)).sum(-1).mean()

    def __repr__(self) -> str:
        return f"kl_to_clean(positions={self.positions.tolist()})"

    def _repr_html_(self) -> str:
        bound = "bound to a clean run" if self._clean is not None else "not bound yet (bind(clean_logits))"
        return html_table("kl_to_clean", (), [("positions", str(self.positions.tolist())), ("clean", bound)],
                          note="(a metric: mean KL(p_clean ‖ p) at these positions)")


def kl_to_clean(positions: Any = -1) -> KLToClean:
    """A :class:`KLToClean` metric at ``positions``."""
    return KLToClean(positions)
