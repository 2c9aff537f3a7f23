"""Circuits from the weights alone: OV and QK circuits, OV eigenvalues (copying), Q/K/V composition.

Row-vector convention (``x @ W``), weights from the family adapter as stored (nothing folded
unless ``fold_ln=True`` says so):

- ``W_Q, W_K, W_V: [n_head, d_model, d_head]``, ``W_O: [n_head, d_head, d_model]`` per layer
  (under grouped-query attention ``W_K``/``W_V`` are expanded to the query heads)
- OV circuit of a head ``W_OV = W_V @ W_O``; QK circuit ``W_QK = W_Q @ W_K^T`` (both
  ``[d_model, d_model]``); full OV circuit ``W_E @ W_OV @ W_U^T`` ``[d_vocab, d_vocab]``

Weights are read one layer at a time, never all layers at once in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_int
from reslens._saving import Saveable
from reslens.arch import Arch, adapter
from reslens.heads._format import head_label, html_table, pandas
from reslens.heads.scores import HeadScores

__all__ = [
    "OVSummary", "CompositionScores", "COMPOSITION_KINDS", "EFFECTIVE_EMBEDDINGS",
    "ov_circuit", "qk_circuit", "ov_eigen_summary", "composition_scores",
]

COMPOSITION_KINDS = ("q", "k", "v")
#: ``"embed"``: token embeddings as stored; ``"embed+mlp0"``: heads after block 0 read
#: ``W_E + mlp_0(norm(W_E))`` (block 0's MLP, after its norm, applied to each embedding alone).
EFFECTIVE_EMBEDDINGS = ("embed", "embed+mlp0")


def _check_head(arch: Arch, layer: Any, head: Any) -> tuple[int, int]:
    return (check_int(layer, "layer", low=0, high=arch.n_layer - 1),
            check_int(head, "head", low=0, high=arch.n_head - 1))


# --- result types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OVSummary(Saveable):
    """Eigenvalues of every head's full OV circuit ``W_E W_V W_O W_U^T`` ``[d_vocab, d_vocab]``.

    They are computed (in float64) from the ``d_head x d_head`` matrix ``W_O (W_U^T W_E) W_V``,
    which has the same nonzero eigenvalues. ``eigenvalues: [n_layer, n_head, d_head]``
    (complex64, sorted by decreasing modulus); ``copying: [n_layer, n_head]`` = ``Σλ / Σ|λ|``
    in [-1, 1] (near 1: the head copies the tokens it attends to; strongly negative: it
    suppresses them). ``fold_ln`` and ``effective_embedding`` record the options used.
    """

    eigenvalues: torch.Tensor
    copying: torch.Tensor
    fold_ln: bool = False
    effective_embedding: str = "embed"

    def __post_init__(self) -> None:
        if self.eigenvalues.ndim != 3 or not self.eigenvalues.is_complex():
            raise ValueError(
                f"eigenvalues must be complex [n_layer, n_head, d_head]; got {tuple(self.eigenvalues.shape)}"
            )
        if tuple(self.copying.shape) != tuple(self.eigenvalues.shape[:2]):
            raise ValueError(
                f"copying has shape {tuple(self.copying.shape)}; expected {tuple(self.eigenvalues.shape[:2])}"
            )
        check_choice(self.effective_embedding, EFFECTIVE_EMBEDDINGS, "effective_embedding")

    @property
    def copying_scores(self) -> HeadScores:
        """The copying score as :class:`HeadScores` (``.top``, ``.plot``)."""
        how = "Σλ/Σ|λ| of W_E W_OV W_U^T" + (", norm γ folded" if self.fold_ln else "")
        if self.effective_embedding != "embed":
            how += f", embedding {self.effective_embedding}"
        return HeadScores(self.copying, "copying", how)

    def top(self, k: int = 5, *, largest: bool = True) -> list[tuple[str, float]]:
        """Heads with the highest (``largest=False``: most negative) copying scores."""
        return self.copying_scores.top(k, largest=largest)

    def deleters(
        self, current_token: HeadScores, *, max_copying: float = -0.3, min_attention: float = 0.3
    ) -> list[tuple[str, float, float]]:
        """Candidate deleting heads, most negative first, as ``("layer.head", copying, attention)``.

        A candidate has copying score ``<= max_copying`` (large negative eigenvalues) and mean
        attention to the current token ``>= min_attention`` (``current_token`` from
        :func:`~reslens.heads.current_token_scores`).
        """
        if not isinstance(current_token, HeadScores):
            raise TypeError(
                "current_token must be HeadScores from current_token_scores(); got "
                f"{type(current_token).__name__}"
            )
        if current_token.scores.shape != self.copying.shape:
            raise ValueError(
                f"current_token is {tuple(current_token.scores.shape)}; expected {tuple(self.copying.shape)}"
            )
        hits = ((self.copying <= max_copying) & (current_token.scores >= min_attention)).nonzero().tolist()
        attention = current_token.scores
        found = [(head_label(a, h), float(self.copying[a, h]), float(attention[a, h])) for a, h in hits]
        return sorted(found, key=lambda item: item[1])

    def to_frame(self):
        """``pandas.DataFrame``: ``layer, head, label, copying, max_abs_eig, min_real_eig`` per head."""
        frame = self.copying_scores.to_frame().rename(columns={"score": "copying"})
        frame["max_abs_eig"] = self.eigenvalues.abs().amax(-1).flatten().numpy()
        frame["min_real_eig"] = self.eigenvalues.real.amin(-1).flatten().numpy()
        return frame

    def table(self, k: int = 5) -> str:
        """The copying score of every head as a layers x heads grid, then the top ``k``."""
        return self.copying_scores.table(k)

    def plot(self, *, ax=None, annotate: bool | None = None):
        """Heatmap of the copying scores (diverging colours, -1..1). Returns the figure."""
        return self.copying_scores.plot(ax=ax, annotate=annotate)

    def __repr__(self) -> str:
        n_layer, n_head, d_head = self.eigenvalues.shape
        top = ", ".join(f"{label}={score:.3f}" for label, score in self.top(3))
        return (f"OVSummary([{n_layer} x {n_head}] heads, {d_head} eigenvalues each, fold_ln={self.fold_ln}, "
                f"effective_embedding={self.effective_embedding!r}, top copying: {top})")

    def _repr_html_(self) -> str:
        return self.copying_scores._repr_html_()


@dataclass(frozen=True)
class CompositionScores(Saveable):
    """Q-, K- or V-composition between every earlier head (writer) and later head (reader).

    ``raw[a, i, b, j]`` = ``‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F)`` with ``W_A`` = writer ``a.i``'s
    OV circuit and ``W_B`` = reader ``b.j``'s QK circuit (``kind="q"``), its transpose
    (``"k"``) or its OV circuit (``"v"``). ``baseline`` is the mean of the same formula on
    random Gaussian factors of the same shapes (``baseline_std`` its spread); ``scores`` =
    ``raw - baseline``. All ``[n_layer, n_head, n_layer, n_head]`` float32; ``mask`` is True
    exactly where ``a < b`` (earlier -> later); other entries are NaN (as are pairs with an
    all-zero matrix, whose score is undefined).
    """

    scores: torch.Tensor
    raw: torch.Tensor
    baseline: float
    baseline_std: float
    kind: str
    mask: torch.Tensor
    fold_ln: bool = False

    def __post_init__(self) -> None:
        check_choice(self.kind, COMPOSITION_KINDS, "kind")
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
        return (f"{self.kind.upper()}-composition (raw minus random baseline {self.baseline:.4f} "
                f"± {self.baseline_std:.4f})")

    def table(self, k: int = 10) -> str:
        """The ``k`` strongest earlier -> later pairs, one per line."""
        return "\n".join([self._title()] + [f"  {w:>6} -> {r:<6} {s:+.4f}" for w, r, s in self.top(k)])

    def plot(self, *, ax=None):
        """``[n_layer * n_head]^2`` heatmap, writers as rows, readers as columns. Returns the figure."""
        from reslens.plot import plot_composition

        return plot_composition(self, ax=ax)

    def __repr__(self) -> str:
        top = ", ".join(f"{w}->{r}={s:.3f}" for w, r, s in self.top(3))
        return (f"CompositionScores(kind={self.kind!r}, [{self.n_layer} x {self.n_head}]^2, "
                f"baseline={self.baseline:.4f}, top: {top})")

    def _repr_html_(self) -> str:
        return html_table(self._title(), ["writer", "reader", "score"], self.top(10))


# --- OV and QK circuits -----------------------------------------------------------------------


def ov_circuit(model: Any, layer: int, head: int) -> torch.Tensor:
    """Head ``layer.head``'s OV circuit ``W_V @ W_O`` ``[d_model, d_model]`` (float32, rank ``d_head``).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    >>> w = ov_circuit(model, 0, 1)
    >>> tuple(w.shape), int(torch.linalg.matrix_rank(w))
    ((16, 16), 8)
    """
    arch = adapter(model)
    layer, head = _check_head(arch, layer, head)
    return arch.W_V(layer)[head].detach().float() @ arch.W_O(layer)[head].detach().float()


def qk_circuit(model: Any, layer: int, head: int) -> torch.Tensor:
    """Head ``layer.head``'s QK circuit ``W_Q @ W_K^T`` ``[d_model, d_model]`` (float32).

    The attention score of query ``x_q`` on key ``x_k`` (after the attention norm, biases
    aside) is ``x_q @ W_QK @ x_k^T`` times the layer's scale. With learned positions this does
    not depend on the distance between query and key; under rotary positions it is the part
    at offset 0.
    """
    arch = adapter(model)
    layer, head = _check_head(arch, layer, head)
    return arch.W_Q(layer)[head].detach().float() @ arch.W_K(layer)[head].detach().float().T


# --- OV eigenvalues ---------------------------------------------------------------------------


def _effective_embedding(arch: Arch, which: str) -> torch.Tensor:
    """``W_E`` (``"embed"``) or ``W_E + mlp_0(norm(W_E))`` (``"embed+mlp0"``) ``[d_vocab, d_model]`` float32.

    Block 0's MLP through the adapter's weights (:meth:`~reslens.arch.MLPWeights.coefficients`),
    in chunks of 4,096 rows, summed as ``(x + m @ W_out) + b_out``.
    """
    w_e = arch.W_E.detach().float()
    if which == "embed":
        return w_e
    norm, mlp = arch.norm("mlp", 0), arch.mlp_weights(0)
    w_out = mlp.W_out.detach().float()
    b_out = None if mlp.b_out is None else mlp.b_out.detach().float()
    out = torch.empty_like(w_e)
    with torch.no_grad():
        for start in range(0, w_e.shape[0], 4096):
            x = w_e[start : start + 4096]
            y = x + mlp.coefficients(norm(x)) @ w_out
            out[start : start + 4096] = y if b_out is None else y + b_out
    return out


def _unembed_gram(w_u: torch.Tensor, embedding: torch.Tensor, gamma: torch.Tensor | None,
                  chunk: int = 8192) -> torch.Tensor:
    """``(W_U ⊙ γ)^T @ embedding`` ``[d_model, d_model]`` in float64, summed over vocabulary chunks.

    In float32 this product loses the small directions: GPT-2's embeddings share one large
    direction, so its largest singular value is hundreds of times the next.
    """
    if w_u.shape != embedding.shape:
        raise ValueError(f"W_U has shape {tuple(w_u.shape)} but the embedding {tuple(embedding.shape)}")
    out = torch.zeros(w_u.shape[1], w_u.shape[1], dtype=torch.float64, device=w_u.device)
    for start in range(0, w_u.shape[0], chunk):
        u = w_u[start : start + chunk].detach().double()
        if gamma is not None:
            u = u * gamma
        out += u.T @ embedding[start : start + chunk].detach().to(out.device, torch.float64)
    return out


def ov_eigen_summary(model: Any, *, fold_ln: bool = False, effective_embedding: str = "embed") -> OVSummary:
    """Eigenvalues and copying score of every head's full OV circuit ``W_E W_V W_O W_U^T``.

    The ``[d_vocab, d_vocab]`` matrix is never built: its nonzero eigenvalues are those of
    ``W_O (W_U^T W_E) W_V`` ``[d_head, d_head]``, formed and solved in float64 (``W_U^T W_E``
    once, summed over vocabulary chunks; then one layer's weights at a time). Copying score =
    ``Σλ / Σ|λ|``. Options, off by default:

    - ``fold_ln=True``: multiply ``W_V`` by the head's attention-norm γ and ``W_U`` by the
      final norm's γ (centring and scale are ignored either way)
    - ``effective_embedding="embed+mlp0"``: heads after block 0 read ``W_E + mlp_0(norm(W_E))``
      instead of ``W_E`` (block 0's attention and the position embeddings are ignored);
      layer-0 heads always read ``W_E``

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50))
    >>> ov = ov_eigen_summary(model)
    >>> tuple(ov.eigenvalues.shape), bool((ov.copying.abs() <= 1).all())
    ((2, 2, 8), True)
    """
    arch = adapter(model)
    check_bool(fold_ln, "fold_ln")
    check_choice(effective_embedding, EFFECTIVE_EMBEDDINGS, "effective_embedding")
    with torch.no_grad():
        gamma = arch.norm("final").weight.double() if fold_ln else None
        a_embed = _unembed_gram(arch.W_U, arch.W_E, gamma)  # [d, d] float64
        a_eff = (a_embed if effective_embedding == "embed"
                 else _unembed_gram(arch.W_U, _effective_embedding(arch, effective_embedding), gamma))
        eigenvalues = []
        for layer in range(arch.n_layer):
            w_v = arch.W_V(layer).detach().double()  # [H, d, dh]
            if fold_ln:
                w_v = w_v * arch.norm("attn", layer).weight.double()[None, :, None]
            w_o = arch.W_O(layer).detach().double()  # [H, dh, d]
            small = w_o @ (a_embed if layer == 0 else a_eff).to(w_o.device) @ w_v  # [H, dh, dh]
            eigenvalues.append(torch.linalg.eigvals(small).cpu())
        eig = torch.stack(eigenvalues)  # [L, H, dh] complex128
        eig = eig.gather(-1, eig.abs().argsort(dim=-1, descending=True))
        copying = eig.sum(-1).real / eig.abs().sum(-1).clamp(min=torch.finfo(torch.float64).tiny)
    return OVSummary(eig.to(torch.complex64), copying.float(), fold_ln, effective_embedding)


# --- composition ------------------------------------------------------------------------------


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


def _layer_factors(arch: Arch, layer: int, kind: str, fold_ln: bool):
    """One layer's writer and reader factors: ``(left [H, dh, d], right [H, d, dh], ‖W_A‖, ‖W_B‖ [H])``."""
    gamma = arch.norm("attn", layer).weight.detach().float()[None, :, None] if fold_ln else None
    # contiguous copies (the adapter's views are strided), as the layer-stacked weights were
    views = (arch.W_Q(layer), arch.W_K(layer), arch.W_V(layer))
    w_q, w_k, w_v = (w.detach().float().contiguous() for w in views)
    if gamma is not None:
        w_q, w_k, w_v = w_q * gamma, w_k * gamma, w_v * gamma
    w_o = arch.W_O(layer).detach().float().contiguous()
    u, z = {"q": (w_q, w_k.transpose(-1, -2)), "k": (w_k, w_q.transpose(-1, -2)), "v": (w_v, w_o)}[kind]
    return _composition_norms(w_v, w_o, u, z)


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
    ``fold_ln=True`` folds the attention norm's γ into ``W_Q``, ``W_K``, ``W_V``. Weights as
    stored; biases are left out. Only ``d_head``-sized products are formed, one layer's
    weights at a time, so all of GPT-2 small takes seconds on a CPU.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, hidden_size=16, n_head=2, vocab_size=50))
    >>> comp = composition_scores(model, "k")
    >>> tuple(comp.scores.shape), int(comp.mask.sum())   # 2*2 + 2*4 + 2*2 earlier -> later pairs
    ((3, 2, 3, 2), 12)
    """
    arch = adapter(model)
    check_choice(kind, COMPOSITION_KINDS, "kind")
    check_bool(fold_ln, "fold_ln")
    check_int(n_baseline, "n_baseline", low=1)
    check_int(seed, "seed", low=0)
    n_layer, n_head, d_head = arch.n_layer, arch.n_head, arch.d_head
    with torch.no_grad():
        stacked: list[torch.Tensor] = []  # left [L, H, dh, d], right [L, H, d, dh], ‖W_A‖, ‖W_B‖ [L, H]
        for layer in range(n_layer):  # one layer's weights at a time; only the d_head-sized factors are kept
            for i, part in enumerate(_layer_factors(arch, layer, kind, fold_ln)):
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
        baseline, spread = _random_baseline(arch.d_model, d_head, n_baseline, seed)
    layer = torch.arange(n_layer)
    mask = layer[:, None, None, None] < layer[None, None, :, None]
    mask = mask.expand(n_layer, n_head, n_layer, n_head).clone()
    return CompositionScores(raw - baseline, raw, baseline, spread, kind, mask, fold_ln)
