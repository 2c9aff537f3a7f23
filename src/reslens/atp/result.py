"""The result of attribution patching: every component's estimate; the verified ones beside the truth."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from reslens._saving import Saveable
from reslens._text import html_table, pandas

__all__ = ["AtPResult", "KindScores"]

_KIND_ORDER = ("heads", "mlp", "memories", "resid")


def _label(kind: str, layer: int, index: int) -> str:
    return {"heads": f"{layer}.{index}", "mlp": f"mlp {layer}", "memories": f"mem {layer}.{index}",
            "resid": f"resid {layer}@{index}"}[kind]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


@dataclass(frozen=True)
class KindScores:
    """One score per component, by kind (shapes as :class:`AtPResult`'s estimates; ``None``: not asked)."""

    heads: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    memories: torch.Tensor | None = None
    resid: torch.Tensor | None = None

    def _given(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, getattr(self, k)) for k in _KIND_ORDER if getattr(self, k) is not None]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(t.shape)}" for k, t in self._given())
        return f"KindScores({shapes})"

    def _repr_html_(self) -> str:
        rows = [(k, "×".join(map(str, t.shape)), float(t.abs().max()) if t.numel() else math.nan)
                for k, t in self._given()]
        return html_table("KindScores", ("kind", "shape", "largest |score|"), rows,
                          note="(one score per component of each kind)")


@dataclass(frozen=True)
class AtPResult(Saveable):
    """Estimates of ``metric(patched) - metric(clean)`` for every component, and the exact effects of some.

    A component's estimate is ``grad · (corrupt - clean)`` of its activation, summed over sequences and
    positions (``method="atp"``: the gradient at the clean run; ``"ig"``: averaged over ``steps`` points on
    the straight path from the clean to the corrupted embedding). Per kind (``None`` when not asked):

    - ``heads: [n_layer, n_head]`` (each query head's ``attn_z`` slice), ``mlp: [n_layer]``,
      ``memories: [n_layer, d_mlp]``, ``resid: [n_layer + 1, pos]`` (the input of block ``l`` at a position).

    Verified components (``checked_*``, ``[n_checked]``): the top ones by ``|estimate|`` of each kind
    (``checked_top``) and a random sample of the others, each patched exactly, alone: ``checked_exact``.

    ``graddrop`` (with ``graddrop=True``): AtP*'s GradDrop score of every component, ``Σ_l |AtP with the
    gradient into block l's attention and MLP outputs dropped - AtP|`` over the blocks ``l`` after the
    component's own (Kramár et al. 2024, sec. 3.1.2): large where paths through some block cancel.

    ``model``, ``model_fingerprint``: the model that was patched (``""`` in results saved before them).
    """

    method: str
    steps: int
    metric: str
    clean_metric: float
    corrupt_metric: float
    heads: torch.Tensor | None
    mlp: torch.Tensor | None
    memories: torch.Tensor | None
    resid: torch.Tensor | None
    checked_kind: tuple[str, ...]
    checked_layer: torch.Tensor
    checked_index: torch.Tensor
    checked_estimate: torch.Tensor
    checked_exact: torch.Tensor
    checked_top: torch.Tensor
    graddrop: KindScores | None = None
    model: str = ""
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "checked_kind", tuple(self.checked_kind))
        n = len(self.checked_kind)
        for name in ("checked_layer", "checked_index", "checked_estimate", "checked_exact", "checked_top"):
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != n:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{n}] "
                                 "(one per checked component)")

    # --- what the verification says -------------------------------------------------------------

    @property
    def total_effect(self) -> float:
        """``metric(corrupted run) - metric(clean run)``."""
        return self.corrupt_metric - self.clean_metric

    @property
    def labels(self) -> tuple[str, ...]:
        """The checked components as text: ``"17.3"`` (head), ``"mlp 5"``, ``"mem 5.81"``, ``"resid 3@7"``."""
        return tuple(_label(k, int(lay), int(i))
                     for k, lay, i in zip(self.checked_kind, self.checked_layer, self.checked_index))

    def spearman(self, kind: str | None = None) -> float:
        """Spearman rank correlation of estimate and exact effect over the checked (``kind``)."""
        keep = torch.tensor([kind is None or k == kind for k in self.checked_kind], dtype=torch.bool)
        est, exact = self.checked_estimate[keep], self.checked_exact[keep]
        if est.numel() < 3:
            return math.nan
        a, b = _ranks(est), _ranks(exact)
        a, b = a - a.mean(), b - b.mean()
        denom = float(a.norm() * b.norm())
        return float((a * b).sum()) / denom if denom > 0 else math.nan

    @property
    def flags(self) -> tuple[str, ...]:
        """Per checked component, what the estimate got wrong: ``""`` (nothing), or one flag.

        ``"sign"``: the estimate has the wrong sign of a non-negligible effect; ``"overrated"``: a top
        candidate whose ``|exact|`` is smaller than a sampled one's of its kind; ``"missed"``: a sampled
        component whose ``|exact|`` beats a top candidate's of its kind (by more than the negligible).

        Negligible: ``|exact|`` under 5% of the largest ``|exact|`` of its kind.
        """
        out = []
        exact, est = self.checked_exact.abs(), self.checked_estimate
        for c, kind in enumerate(self.checked_kind):
            same = torch.tensor([k == kind for k in self.checked_kind], dtype=torch.bool)
            top, rest = same & self.checked_top, same & ~self.checked_top
            floor = 0.05 * float(exact[same].max())  # effects under it are negligible
            flag = ""
            if exact[c] > floor and float(est[c]) * float(self.checked_exact[c]) < 0:
                flag = "sign"
            elif bool(self.checked_top[c]) and rest.any() and exact[c] < exact[rest].max() - floor:
                flag = "overrated"
            elif not bool(self.checked_top[c]) and top.any() and exact[c] > exact[top].min() + floor:
                flag = "missed"
            out.append(flag)
        return tuple(out)

    def largest_misses(self, n: int = 5) -> list[tuple[str, float, float]]:
        """The ``n`` checked components of largest ``|estimate - exact|``: ``(label, estimate, exact)``."""
        order = (self.checked_estimate - self.checked_exact).abs().argsort(descending=True)[:n].tolist()
        est, exact = self.checked_estimate, self.checked_exact
        return [(self.labels[i], float(est[i]), float(exact[i])) for i in order]

    # --- views ---------------------------------------------------------------------------------

    def estimates(self, kind: str) -> torch.Tensor:
        """The estimate tensor of ``kind`` (``heads``, ``mlp``, ``memories``, ``resid``)."""
        if kind not in _KIND_ORDER:
            raise ValueError(f"kind={kind!r} is not one of {_KIND_ORDER}")
        t = getattr(self, kind)
        if t is None:
            raise ValueError(f"kind {kind!r} was not estimated; pass kinds=(..., {kind!r}) to "
                             "attribution_patching")
        return t

    def top(self, kind: str = "heads", n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` components of ``kind`` with the largest ``|estimate|``: ``(label, estimate)``."""
        t = self.estimates(kind)
        flat = t.reshape(-1) if t.ndim > 1 else t
        order = flat.abs().argsort(descending=True)[:n].tolist()
        width = t.shape[1] if t.ndim > 1 else 1
        return [(_label(kind, i // width, i % width if t.ndim > 1 else 0), float(flat[i])) for i in order]

    def to_frame(self):
        """``pandas.DataFrame``: one row per component (kind, layer, index, label, estimate, exact, top)."""
        pd = pandas()
        exact = {(k, int(lay), int(i)): (float(x), bool(t)) for k, lay, i, x, t in zip(
            self.checked_kind, self.checked_layer, self.checked_index, self.checked_exact, self.checked_top)}
        rows = []
        for kind in _KIND_ORDER:
            t = getattr(self, kind)
            if t is None:
                continue
            t2 = t[:, None] if t.ndim == 1 else t
            for layer in range(t2.shape[0]):
                for index in range(t2.shape[1]):
                    x, is_top = exact.get((kind, layer, index), (math.nan, False))
                    label = _label(kind, layer, index)
                    rows.append((kind, layer, index, label, float(t2[layer, index]), x, is_top))
        return pd.DataFrame(rows, columns=["kind", "layer", "index", "label", "estimate", "exact", "top"])

    def table(self, n: int = 12) -> str:
        """Text: totals, the top ``n`` checked components, the rank correlation, misses, what to read.

        Each component line: its estimate, its exact effect and its flag (:attr:`flags`).
        """
        how = f"{self.method}, {self.steps} steps" if self.method == "ig" else self.method
        lines = [f"attribution patching ({how}) "
                 f"of {self.metric}: clean {self.clean_metric:.4f}, corrupted {self.corrupt_metric:.4f}, "
                 f"total effect {self.total_effect:+.4f}"]
        flags = self.flags
        order = self.checked_estimate.abs().argsort(descending=True)[:n].tolist()
        lines.append(f"{'component':<16}{'estimate':>10}{'exact':>10}  flag")
        for i in order:
            lines.append(f"{self.labels[i]:<16}{float(self.checked_estimate[i]):>+10.4f}"
                         f"{float(self.checked_exact[i]):>+10.4f}  {flags[i]}")
        n_top = int(self.checked_top.sum())
        n_checked = len(self.checked_kind)
        lines.append(f"verified {n_checked} components exactly ({n_top} top by |estimate|, "
                     f"{n_checked - n_top} sampled); Spearman rank correlation {self.spearman():.3f}")
        misses = ", ".join(f"{lab} {e:+.3f} vs {x:+.3f}" for lab, e, x in self.largest_misses(3))
        lines.append(f"largest misses (estimate vs exact): {misses}")
        n_flag = sum(bool(f) for f in flags)
        lines.append(f"Read: the estimate is a first-order guess of each patching effect; the exact column "
                     f"is the truth. {n_flag} checked component(s) are flagged (sign: wrong direction; "
                     "overrated / missed: the estimate's ranking is wrong there) -- trust a ranking only "
                     "where the rank correlation is high and nothing important is flagged.")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """Estimate vs exact effect of the checked components, beside the heads' estimates (layer x head)."""
        from reslens.atp._plot import plot_atp

        return plot_atp(self, ax=ax)

    def _repr_html_(self) -> str:
        flags = self.flags
        order = self.checked_estimate.abs().argsort(descending=True)[:12].tolist()
        rows = [(self.labels[i], float(self.checked_estimate[i]), float(self.checked_exact[i]), flags[i])
                for i in order]
        note = (f"({self.metric}: clean {self.clean_metric:.4g}, corrupted {self.corrupt_metric:.4g}; "
                f"Spearman {self.spearman():.3f})")
        header = ("component", "estimate", "exact", "flag")
        return html_table(f"AtPResult ({self.method})", header, rows, note=note)

    def __repr__(self) -> str:
        return (f"AtPResult(method={self.method!r}, metric={self.metric!r}, "
                f"total_effect={self.total_effect:+.4f}, checked={len(self.checked_kind)}, "
                f"spearman={self.spearman():.3f})")
