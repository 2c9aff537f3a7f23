"""Q-, K- and V-composition between attention heads (Elhage et al. 2021), from the weights alone.

Writer ``a.i``'s OV circuit ``W_A = W_V W_O`` against reader ``b.j``'s QK circuit (Q- and
K-composition) or OV circuit (V-composition), for every earlier -> later pair, through
``d_head``-sized factors only (row-vector convention, weights from the family adapter; under
grouped-query attention ``W_K``/``W_V`` are expanded to the query heads).

Under rotary positions a query at ``i`` scores a key at ``j`` with ``x_i W_Q R(i-j) W_K^T x_j^T``
(``R`` from :meth:`~reslens.arch.Arch.rotation`, orthogonal), so Q- and K-composition depend on
the offset ``i - j``: both ``‖W_A W_B‖_F`` and the reader's ``‖W_B‖_F`` change with ``R``.
:func:`composition_scores` reports offset 0 there (the content-only part: ``R(0) = I`` for plain
rotary) and says so in ``CompositionScores.offset``; :func:`composition_by_offset` gives any
offsets. With learned positions ``R = I`` and the offset changes nothing; V-composition never
depends on it.

Composition needs the writer's OV circuit, and for Q/K the reader's QK circuit: where the family
cannot give one (:attr:`~reslens.arch.Arch.limits`: an attention output norm, Gemma 2/3 and OLMo 2;
QK-norm or an attention soft-cap for Q/K) it is refused with that circuit's reason, the OV
circuit's first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_int
from reslens._saving import Saveable
from reslens.arch import Arch, adapter
from reslens._text import head_label, html_table, pandas
from reslens.heads.scores import HeadScores

__all__ = ["CompositionScores", "CompositionByOffset", "COMPOSITION_KINDS", "composition_scores",
           "composition_by_offset"]

COMPOSITION_KINDS = ("q", "k", "v")


@dataclass(frozen=True)
class CompositionScores(Saveable):
    """Q-, K- or V-composition between every earlier head (writer) and later head (reader).

    ``raw[a, i, b, j]`` = ``‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F)`` with ``W_A`` = writer ``a.i``'s
    OV circuit and ``W_B`` = reader ``b.j``'s QK circuit (``kind="q"``), its transpose
    (``"k"``) or its OV circuit (``"v"``). ``baseline`` is the mean of the same formula on
    random Gaussian factors of the same shapes (``baseline_std`` its spread); ``scores`` =
    ``raw - baseline``. All ``[n_layer, n_head, n_layer, n_head]`` float32; ``mask`` is True
    exactly where ``a < b`` (earlier -> later); other entries are NaN (as are pairs with an
    all-zero matrix, whose score is undefined). ``offset``: the query-key offset the reader's QK
    circuit was taken at (Q/K-composition under rotary positions, 0 by default); ``None`` where
    the offset changes nothing (learned positions, V-composition).
    """

    scores: torch.Tensor
    raw: torch.Tensor
    baseline: float
    baseline_std: float
    kind: str
    mask: torch.Tensor
    fold_ln: bool = False
    offset: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, COMPOSITION_KINDS, "kind")
        if self.offset is not None:
            check_int(self.offset, "offset", low=0)
        if self.scores.ndim != 4 or self.scores.shape[:2] != self.scores.shape[2:]:
            raise ValueError(
                f"scores must be [n_layer, n_head, n_layer, n_head]; got {tuple(self.scores.shape)}"
            )
        for name in ("raw", "mask"):
            if getattr(self, name).shape != self.scores.shape:
                got = tuple(getattr(self, name).shape)
                raise ValueError(f"{name} has shape {got}; expected {tuple(self.scores.shape)}")

    @property
    def n_layer(self) -> int:
        """Number of layers."""
        return self.scores.shape[0]

    @property
    def n_head(self) -> int:
        """Number of heads per layer."""
        return self.scores.shape[1]

    def top(self, k: int = 5) -> list[tuple[str, str, float]]:
        """The ``k`` strongest pairs as ``(writer "layer.head", reader "layer.head", score)``."""
        check_int(k, "k", low=1)
        valid = self.mask & ~self.scores.isnan()
        flat = torch.where(valid, self.scores, float("-inf")).flatten()
        n_valid = int(valid.sum())
        out = []
        for i in flat.argsort(descending=True, stable=True)[: min(k, n_valid)].tolist():
            a, rest = divmod(i, self.n_head * self.n_layer * self.n_head)
            hi, rest = divmod(rest, self.n_layer * self.n_head)
            b, hj = divmod(rest, self.n_head)
            out.append((head_label(a, hi), head_label(b, hj), float(flat[i])))
        return out

    def reader(self, layer: int, head: int) -> HeadScores:
        """How much each head composes into ``layer.head``: ``[n_layer, n_head]``, NaN if not earlier."""
        check_int(layer, "layer", low=0, high=self.n_layer - 1)
        check_int(head, "head", low=0, high=self.n_head - 1)
        return HeadScores(self.scores[:, :, layer, head],
                          f"{self.kind.upper()}-composition into {head_label(layer, head)}",
                          f"minus baseline {self.baseline:.3f}")

    def to_frame(self):
        """``pandas.DataFrame``: one row per earlier -> later pair (``writer, reader, raw, score``)."""
        pd = pandas()
        a, i, b, j = self.mask.nonzero(as_tuple=True)
        return pd.DataFrame({
            "writer": [head_label(x, y) for x, y in zip(a.tolist(), i.tolist())],
            "reader": [head_label(x, y) for x, y in zip(b.tolist(), j.tolist())],
            "writer_layer": a.numpy(), "writer_head": i.numpy(),
            "reader_layer": b.numpy(), "reader_head": j.numpy(),
            "raw": self.raw[a, i, b, j].numpy(),
            "score": self.scores[a, i, b, j].numpy(),
        })

    def _title(self) -> str:
        at = "" if self.offset is None else f" at query-key offset {self.offset}"
        return (f"{self.kind.upper()}-composition{at} (raw minus random baseline {self.baseline:.4f} "
                f"± {self.baseline_std:.4f})")

    def table(self, k: int = 10) -> str:
        """The ``k`` strongest earlier -> later pairs, one per line."""
        return "\n".join([self._title()] + [f"  {w:>6} -> {r:<6} {s:+.4f}" for w, r, s in self.top(k)])

    def plot(self, *, ax=None):
        """Layer x layer blocks (the strongest pair of each) beside the top head pairs. Returns the figure."""
        from reslens.plot import plot_composition

        return plot_composition(self, ax=ax)

    def __repr__(self) -> str:
        top = ", ".join(f"{w}->{r}={s:.3f}" for w, r, s in self.top(3))
        at = "" if self.offset is None else f", offset={self.offset}"
        return (f"CompositionScores(kind={self.kind!r}{at}, [{self.n_layer} x {self.n_head}]^2, "
                f"baseline={self.baseline:.4f}, top: {top})")

    def _repr_html_(self) -> str:
        note = ("— the 10 strongest pairs of an earlier head (writer) and a later head (reader); score = the "
                "composition minus its mean on random matrices (0 = as random; the ± is their spread).")
        return html_table(self._title(), ["writer", "reader", "score"], self.top(10), note=note)



def _gram_root(x: torch.Tensor) -> torch.Tensor:
    """``R [..., dh, dh]`` with ``R^T R = x^T x`` for ``x: [..., d, dh]``, so ``‖x M‖_F = ‖R M‖_F``.

    The ``R`` of a QR decomposition up to rotation, for any ``M``: Cholesky of the Gram matrix
    in float64 (much faster than QR or batched eigh on CPU), with a relative jitter of 1e-12 so
    rank-deficient ``x`` works; any matrix it still fails on goes through ``eigh``.
    """
    gram = x.double().transpose(-1, -2) @ x.double()  # [..., dh, dh]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    lower, info = torch.linalg.cholesky_ex(gram + (1e-12 * scale + 1e-300) * eye)
    root = lower.transpose(-1, -2)
    failed = info != 0
    if failed.any():
        values, vectors = torch.linalg.eigh(gram[failed])
        root[failed] = values.clamp(min=0).sqrt()[..., :, None] * vectors.transpose(-1, -2)
    return root.to(x.dtype)


def _composition_norms(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, z: torch.Tensor):
    """Frobenius norms for ``W_A = x @ y`` and ``W_B = u @ z`` from ``d_head``-sized products only.

    ``x, u: [..., d, dh]``, ``y, z: [..., dh, d]``; ``‖x y u z‖ = ‖R_x (y u) R_z^T‖`` with
    ``R_x^T R_x = x^T x`` and ``R_z^T R_z = z z^T``. Returns the left factors ``R_x y [..., dh, d]``,
    right factors ``u R_z^T [..., d, dh]`` and their norms ``‖W_A‖``, ``‖W_B‖``.
    """
    r_x = _gram_root(x)  # [..., dh, dh]
    r_z = _gram_root(z.transpose(-1, -2))
    left = r_x @ y  # [..., dh, d]
    right = u @ r_z.transpose(-1, -2)  # [..., d, dh]
    return left, right, left.flatten(-2).norm(dim=-1), right.flatten(-2).norm(dim=-1)


def _random_baseline(d_model: int, d_head: int, n: int, seed: int) -> tuple[float, float]:
    """Mean and std of the composition score of ``n`` random Gaussian factor pairs."""
    gen = torch.Generator().manual_seed(seed)
    x, u = (torch.randn(n, d_model, d_head, generator=gen) for _ in range(2))
    y, z = (torch.randn(n, d_head, d_model, generator=gen) for _ in range(2))
    left, right, n_a, n_b = _composition_norms(x, y, u, z)
    scores = (left @ right).flatten(-2).norm(dim=-1) / (n_a * n_b)
    return float(scores.mean()), float(scores.std()) if n > 1 else 0.0


def _rotation(arch: Arch, layer: int, offset: int | None) -> torch.Tensor | None:
    """``R [d_head, d_head]`` of ``layer`` at ``offset`` under rotary positions, else ``None`` (``R = I``)."""
    if offset is None or arch.positional != "rotary":
        return None
    return arch.rotation(layer, offset).float()


def _layer_factors(arch: Arch, layer: int, kind: str, fold_ln: bool, offset: int | None):
    """One layer's writer and reader factors: ``(left [H, dh, d], right [H, d, dh], ‖W_A‖, ‖W_B‖ [H])``.

    The reader's QK circuit at ``offset`` is ``W_Q R W_K^T`` (``"q"``) or its transpose ``W_K R^T W_Q^T``
    (``"k"``), with ``R`` folded into the key or query factor.
    """
    gamma = arch.norm("attn", layer).gamma[None, :, None] if fold_ln else None
    # contiguous copies (the adapter's views are strided), as the layer-stacked weights were
    views = (arch.W_Q(layer), arch.W_K(layer), arch.W_V(layer))
    w_q, w_k, w_v = (w.detach().float().contiguous() for w in views)
    if gamma is not None:
        w_q, w_k, w_v = w_q * gamma, w_k * gamma, w_v * gamma
    w_o = arch.W_O(layer).detach().float().contiguous()
    rotation = _rotation(arch, layer, offset) if kind != "v" else None
    if rotation is not None:
        rotation = rotation.to(w_q.device)
        if kind == "q":
            w_k = w_k @ rotation.T  # W_Q R W_K^T = w_q (w_k R^T)^T
        else:
            w_q = w_q @ rotation  # W_K R^T W_Q^T = w_k (w_q R)^T
    u, z = {"q": (w_q, w_k.transpose(-1, -2)), "k": (w_k, w_q.transpose(-1, -2)), "v": (w_v, w_o)}[kind]
    return _composition_norms(w_v, w_o, u, z)


def _raw_composition(arch: Arch, kind: str, fold_ln: bool, offset: int | None) -> torch.Tensor:
    """``raw [L, H, L, H]`` float32 (NaN where the writer is not earlier), one layer's weights at a time."""
    n_layer, n_head, d_head = arch.n_layer, arch.n_head, arch.d_head
    stacked: list[torch.Tensor] = []  # left [L, H, dh, d], right [L, H, d, dh], ‖W_A‖, ‖W_B‖ [L, H]
    for layer in range(n_layer):  # one layer's weights at a time; only the d_head-sized factors are kept
        for i, part in enumerate(_layer_factors(arch, layer, kind, fold_ln, offset)):
            if layer == 0:
                stacked.append(part.new_empty((n_layer, *part.shape)))
            stacked[i][layer] = part
    left, right, norm_a, norm_b = stacked
    raw = torch.full((n_layer, n_head, n_layer, n_head), float("nan"))
    for a in range(n_layer - 1):
        writers = left[a].reshape(n_head * d_head, -1)  # [H*dh, d]
        readers = right[a + 1 :].permute(2, 0, 1, 3).reshape(arch.d_model, -1)  # [d, (L-a-1)*H*dh]
        product = (writers @ readers).reshape(n_head, d_head, n_layer - a - 1, n_head, d_head)
        norms = product.square().sum(dim=(1, 4)).sqrt()  # [H, L-a-1, H]
        raw[a, :, a + 1 :] = (norms / (norm_a[a][:, None, None] * norm_b[a + 1 :][None])).cpu()
    return raw


def _require_circuits(arch: Arch, kind: str) -> None:
    """Composition reads the writer's OV circuit, and the reader's QK circuit for ``"q"`` / ``"k"``."""
    arch.require("ov_circuit")
    if kind in ("q", "k"):
        arch.require("qk_circuit")


def _earlier_mask(n_layer: int, n_head: int) -> torch.Tensor:
    layer = torch.arange(n_layer)
    mask = layer[:, None, None, None] < layer[None, None, :, None]
    return mask.expand(n_layer, n_head, n_layer, n_head).clone()


def _check_options(kind: str, kinds: Sequence[str], fold_ln: bool, n_baseline: int, seed: int) -> None:
    check_choice(kind, kinds, "kind")
    check_bool(fold_ln, "fold_ln")
    check_int(n_baseline, "n_baseline", low=1)
    check_int(seed, "seed", low=0)


def composition_scores(
    model: Any, kind: str = "k", *, fold_ln: bool = False, n_baseline: int = 200, seed: int = 0
) -> CompositionScores:
    """Q-, K- or V-composition of every earlier head into every later head (Elhage et al. 2021).

    ``raw[a, i, b, j] = ‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F)`` with ``W_A = W_V W_O`` of writer
    ``a.i`` and ``W_B`` of reader ``b.j`` = ``W_Q W_K^T`` (``kind="q"``: the writer's output
    feeds the reader's queries), ``W_K W_Q^T`` (``"k"``: its keys) or ``W_V W_O`` (``"v"``:
    its values), as in TransformerLens's ``all_composition_scores``. Only ``a < b`` pairs are
    computed (``mask``). The random baseline (the same formula on ``n_baseline`` random
    Gaussian factors of the same shapes, seeded) is subtracted to give ``scores``.
    ``fold_ln=True`` folds the attention norm's γ (Gemma: ``1 + weight``) into ``W_Q``, ``W_K``,
    ``W_V`` (all there is to fold under RMSNorm, which has no centring and no bias; LayerNorm's
    centring and bias are left out). Weights as stored; biases are left out. Only ``d_head``-sized
    products are formed, one layer's weights at a time, so all of GPT-2 small takes seconds on a CPU.

    Under rotary positions Q- and K-composition depend on the query-key offset; this reports
    offset 0, the content-only part ``W_Q R(0) W_K^T`` (``R(0) = I`` for plain and partial rotary),
    and records it in ``offset``. :func:`composition_by_offset` gives other offsets. The random baseline does
    not depend on the offset (``R`` is orthogonal, so ``W_K R^T`` is as Gaussian as ``W_K``).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, hidden_size=16, n_head=2, vocab_size=50))
    >>> comp = composition_scores(model, "k")
    >>> tuple(comp.scores.shape), int(comp.mask.sum())   # 2*2 + 2*4 + 2*2 earlier -> later pairs
    ((3, 2, 3, 2), 12)
    """
    arch = adapter(model)
    _check_options(kind, COMPOSITION_KINDS, fold_ln, n_baseline, seed)
    _require_circuits(arch, kind)
    offset = 0 if arch.positional == "rotary" and kind != "v" else None
    with torch.no_grad():
        raw = _raw_composition(arch, kind, fold_ln, offset)
        baseline, spread = _random_baseline(arch.d_model, arch.d_head, n_baseline, seed)
    mask = _earlier_mask(arch.n_layer, arch.n_head)
    return CompositionScores(raw - baseline, raw, baseline, spread, kind, mask, fold_ln, offset)


# --- by offset ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompositionByOffset(Saveable):
    """Q- or K-composition at several query-key offsets (rotary positions).

    ``scores`` and ``raw``: ``[n_offsets, n_layer, n_head, n_layer, n_head]`` float32, row ``o``
    the :class:`CompositionScores` at ``offsets[o]`` (:meth:`at`); ``baseline``/``baseline_std``
    (one random baseline: it does not depend on the offset), ``kind``, ``mask`` ``[n_layer,
    n_head, n_layer, n_head]`` and ``fold_ln`` as there.
    """

    scores: torch.Tensor
    raw: torch.Tensor
    offsets: tuple[int, ...]
    baseline: float
    baseline_std: float
    kind: str
    mask: torch.Tensor
    fold_ln: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        check_choice(self.kind, ("q", "k"), "kind")
        if self.scores.ndim != 5 or self.scores.shape[0] != len(self.offsets):
            raise ValueError(
                f"scores must be [n_offsets={len(self.offsets)}, n_layer, n_head, n_layer, n_head]; "
                f"got {tuple(self.scores.shape)}"
            )
        if self.raw.shape != self.scores.shape or self.mask.shape != self.scores.shape[1:]:
            raise ValueError(
                f"raw {tuple(self.raw.shape)} / mask {tuple(self.mask.shape)} do not fit scores "
                f"{tuple(self.scores.shape)}"
            )

    @property
    def n_layer(self) -> int:
        """Number of layers."""
        return self.scores.shape[1]

    @property
    def n_head(self) -> int:
        """Number of heads per layer."""
        return self.scores.shape[2]

    def at(self, offset: int) -> CompositionScores:
        """The :class:`CompositionScores` at one of :attr:`offsets`."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset not in self.offsets:
            raise ValueError(f"offset must be one of {list(self.offsets)}; got {offset!r}")
        o = self.offsets.index(offset)
        return CompositionScores(self.scores[o], self.raw[o], self.baseline, self.baseline_std, self.kind,
                                 self.mask, self.fold_ln, offset)

    def pair(self, writer: str, reader: str) -> torch.Tensor:
        """``[n_offsets]``: the score of ``writer -> reader`` (labels ``"layer.head"``) at every offset."""
        (a, i), (b, j) = (_parse_label(label, name, self.n_layer, self.n_head)
                          for label, name in ((writer, "writer"), (reader, "reader")))
        if not bool(self.mask[a, i, b, j]):
            raise ValueError(f"writer {writer} is not in an earlier layer than reader {reader}")
        return self.scores[:, a, i, b, j]

    def table(self, k: int = 3) -> str:
        """The ``k`` strongest pairs at each offset."""
        lines = [f"{self.kind.upper()}-composition by query-key offset (raw minus random baseline "
                 f"{self.baseline:.4f} ± {self.baseline_std:.4f})"]
        for offset in self.offsets:
            top = ", ".join(f"{w}->{r} {s:+.4f}" for w, r, s in self.at(offset).top(k))
            lines.append(f"  offset {offset:>5}: {top}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CompositionByOffset(kind={self.kind!r}, offsets={list(self.offsets)}, "
                f"[{self.n_layer} x {self.n_head}]^2, baseline={self.baseline:.4f})")

    def _repr_html_(self) -> str:
        rows = [[offset, *(self.at(offset).top(1) or [("", "", float("nan"))])[0]] for offset in self.offsets]
        return html_table(f"{self.kind.upper()}-composition by offset (strongest pair)",
                          ["offset", "writer", "reader", "score"], rows)


def _parse_label(label: Any, name: str, n_layer: int, n_head: int) -> tuple[int, int]:
    try:
        layer, head = (int(part) for part in str(label).split("."))
    except ValueError:
        raise ValueError(f"{name} must be a head label 'layer.head' (e.g. '5.1'); got {label!r}") from None
    if not (0 <= layer < n_layer and 0 <= head < n_head):
        raise ValueError(f"{name}={label!r} is outside {n_layer} layers of {n_head} heads")
    return layer, head


def composition_by_offset(
    model: Any, kind: str, offsets: Sequence[int], *, fold_ln: bool = False, n_baseline: int = 200,
    seed: int = 0,
) -> CompositionByOffset:
    """Q- or K-composition of every earlier head into every later head at each query-key offset.

    The reader's QK circuit at offset ``t`` (a key ``t`` positions before the query) is
    ``W_Q R(t) W_K^T`` with ``R`` from the model's own rotary (:meth:`~reslens.arch.Arch.rotation`);
    otherwise as :func:`composition_scores`, which is row ``offsets.index(0)`` here. ``offsets``:
    distinct ints in ``0 .. n_ctx - 1``. With learned positions every row is the same (the offset
    changes nothing); V-composition never depends on the offset, so ``kind`` is ``"q"`` or ``"k"``.
    Returns ``scores``/``raw`` of shape ``[len(offsets), n_layer, n_head, n_layer, n_head]``.
    """
    arch = adapter(model)
    if kind in ("q", "k"):
        _require_circuits(arch, kind)
    if kind == "v":
        raise ValueError("kind='v': V-composition does not depend on the query-key offset; use "
                         "composition_scores(model, 'v')")
    _check_options(kind, ("q", "k"), fold_ln, n_baseline, seed)
    if isinstance(offsets, torch.Tensor) and offsets.ndim == 1 and not offsets.dtype.is_floating_point:
        offsets = offsets.tolist()
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence) or len(offsets) == 0:
        raise TypeError(f"offsets must be a non-empty sequence of ints; got {offsets!r}")
    offsets = tuple(check_int(o, f"offsets[{i}]", low=0, high=arch.n_ctx - 1) for i, o in enumerate(offsets))
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must be distinct; got {list(offsets)}")
    rotary = arch.positional == "rotary"
    with torch.no_grad():
        raws = [_raw_composition(arch, kind, fold_ln, offset if rotary else None) for offset in offsets]
        baseline, spread = _random_baseline(arch.d_model, arch.d_head, n_baseline, seed)
    raw = torch.stack(raws)
    mask = _earlier_mask(arch.n_layer, arch.n_head)
    return CompositionByOffset(raw - baseline, raw, offsets, baseline, spread, kind, mask, fold_ln)
