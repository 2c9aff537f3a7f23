"""Circuits from the weights alone: OV and QK circuits and the OV eigenvalues (copying).

Row-vector convention (``x @ W``), weights from the family adapter as stored (nothing folded
unless ``fold_ln=True`` says so):

- ``W_Q, W_K, W_V: [n_head, d_model, d_head]``, ``W_O: [n_head, d_head, d_model]`` per layer.
  Under grouped-query attention ``W_K``/``W_V`` are expanded to the query heads, so every
  circuit here is per **query** head: heads that share a key/value head share ``W_V`` but not
  ``W_O``, so their OV circuits and copying scores differ.
- OV circuit of a head ``W_OV = W_V @ W_O``; QK circuit ``W_QK = W_Q @ R(offset) @ W_K^T`` (both
  ``[d_model, d_model]``; ``R = I`` for learned positions; under partial rotary, GPT-NeoX and
  Phi-3, ``R`` rotates the first dims of each head and passes the rest through); full OV circuit
  ``W_E_in @ W_OV @ W_U^T`` ``[d_vocab, d_vocab]``, with ``W_E_in`` the embedding rows as they
  enter the residual (Gemma scales them by ``√d_model``).
- ``fold_ln=True`` folds the norms' γ in (:attr:`~reslens.arch.Norm.gamma`: Gemma's ``1 + weight``):
  under RMSNorm that is all a norm does besides its per-token scale (no centring, no bias), so the
  folded circuits act on ``x / σ(x)`` exactly; under LayerNorm its centring and bias are left out.
- Where a circuit is no fixed map of the residual it is refused with the reason
  (:attr:`~reslens.arch.Arch.limits`): the QK circuit under QK-norm (Qwen3, Gemma 3, OLMo 2, OLMoE,
  Qwen3-MoE) or an attention soft-cap (Gemma 2); the OV circuit, its eigenvalues and composition
  where the attention output passes a norm before the residual (Gemma 2/3, OLMo 2).

Q/K/V composition lives in :mod:`reslens.heads.composition` (re-exported here). Weights are
read one layer at a time, never all layers at once in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_int
from reslens._saving import Saveable
from reslens.arch import Arch, adapter
from reslens._text import head_label
from reslens.heads.composition import (
    COMPOSITION_KINDS,
    CompositionByOffset,
    CompositionScores,
    composition_by_offset,
    composition_scores,
)
from reslens.heads.scores import HeadScores

__all__ = [
    "OVSummary", "CompositionScores", "CompositionByOffset", "COMPOSITION_KINDS", "EFFECTIVE_EMBEDDINGS",
    "ov_circuit", "qk_circuit", "ov_eigen_summary", "composition_scores", "composition_by_offset",
]

#: ``"embed"``: token embeddings as they enter the residual (``W_E_in``); ``"embed+mlp0"``: heads after
#: block 0 read ``W_E_in + mlp_0(norm(W_E_in))`` (block 0's MLP, after its norm, on each embedding alone).
EFFECTIVE_EMBEDDINGS = ("embed", "embed+mlp0")


def _check_head(arch: Arch, layer: Any, head: Any) -> tuple[int, int]:
    return (check_int(layer, "layer", low=0, high=arch.n_layer - 1),
            check_int(head, "head", low=0, high=arch.n_head - 1))


# --- result types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OVSummary(Saveable):
    """Eigenvalues of every head's full OV circuit ``W_E_in W_V W_O W_U^T`` ``[d_vocab, d_vocab]``.

    They are computed (in float64) from the ``d_head x d_head`` matrix ``W_O (W_U^T W_E_in) W_V``,
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
        how = "Σλ/Σ|λ| of W_E_in W_OV W_U^T" + (", norm γ folded" if self.fold_ln else "")
        if self.effective_embedding != "embed":
            how += f", embedding {self.effective_embedding}"
        return HeadScores(self.copying, "copying", how)

    @property
    def sign_balance(self) -> torch.Tensor:
        """``[n_layer, n_head]`` in [-1, 1]: ``(#(Re λ > 0) − #(Re λ < 0)) / d_head``, one vote each.

        The copying score ``Σλ / Σ|λ|`` is set by the largest eigenvalues: on a trained model one of them
        often dwarfs the rest, so most heads score near +1 or −1 (a checkerboard). This counts in how
        many of its directions a head copies (+) or suppresses (−), whatever their size.
        """
        real = self.eigenvalues.real
        return ((real > 0).sum(-1) - (real < 0).sum(-1)).float() / real.shape[-1]

    @property
    def sign_scores(self) -> HeadScores:
        """:attr:`sign_balance` as :class:`HeadScores`: the copying panel's continuous scale."""
        return HeadScores(self.sign_balance, "copying (eigenvalue signs)",
                          "(#Re λ>0 − #Re λ<0) / d_head: +1 copies in every direction, −1 suppresses")

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
        """Two layers x heads heatmaps (diverging, centred on 0): the copying score and :attr:`sign_balance`.

        The first (``Σλ/Σ|λ|``) is set by each head's largest eigenvalues, so it mostly reads ±1; the
        second counts every eigenvalue once and shows how far each head copies. ``ax``: None (a new
        figure), a pair of axes for the two, or one axes for the copying score alone. Returns the figure.
        """
        from reslens.plot import plot_head_score_panels, plot_head_scores

        if ax is None:
            return plot_head_score_panels([self.copying_scores, self.sign_scores], annotate=annotate)
        if isinstance(ax, (tuple, list)) and len(ax) == 2:
            plot_head_scores(self.sign_scores, ax=ax[1], annotate=annotate)
            ax = ax[0]
        return plot_head_scores(self.copying_scores, ax=ax, annotate=annotate)

    def __repr__(self) -> str:
        n_layer, n_head, d_head = self.eigenvalues.shape
        top = ", ".join(f"{label}={score:.3f}" for label, score in self.top(3))
        return (f"OVSummary([{n_layer} x {n_head}] heads, {d_head} eigenvalues each, fold_ln={self.fold_ln}, "
                f"effective_embedding={self.effective_embedding!r}, top copying: {top})")

    def _repr_html_(self) -> str:
        return self.copying_scores._repr_html_()


# --- OV and QK circuits -----------------------------------------------------------------------


def _gamma(arch: Arch, layer: int, fold_ln: bool) -> torch.Tensor | None:
    """The attention norm's ``γ [d_model, 1]`` (float32) of ``layer`` when folding, else ``None``."""
    if not check_bool(fold_ln, "fold_ln"):
        return None
    return arch.norm("attn", layer).gamma[:, None]


def ov_circuit(model: Any, layer: int, head: int, *, fold_ln: bool = False) -> torch.Tensor:
    """Head ``layer.head``'s OV circuit ``W_V @ W_O`` ``[d_model, d_model]`` (float32, rank ``d_head``).

    A key position holding normed input ``x̂`` (after the attention norm) that the head attends to
    with weight ``p`` adds ``p · (x̂ @ W_OV)`` to the residual (plus ``p · b_V @ W_O`` where the family
    has a value bias). Per query head: under grouped-query attention ``W_V`` is that of the
    key/value head the query head reads (``arch.kv_head(head)``). ``fold_ln=True``: ``γ ⊙`` the rows
    (the attention norm's γ), so it acts on ``x / σ(x)`` (exact under RMSNorm; LayerNorm's centring
    and bias left out).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    >>> w = ov_circuit(model, 0, 1)
    >>> tuple(w.shape), int(torch.linalg.matrix_rank(w))
    ((16, 16), 8)
    """
    arch = adapter(model)
    arch.require("ov_circuit")
    layer, head = _check_head(arch, layer, head)
    gamma = _gamma(arch, layer, fold_ln)
    w_v = arch.W_V(layer)[head].detach().float()
    if gamma is not None:
        w_v = gamma.to(w_v.device) * w_v
    return w_v @ arch.W_O(layer)[head].detach().float()


def qk_circuit(model: Any, layer: int, head: int, *, offset: int = 0, fold_ln: bool = False) -> torch.Tensor:
    """Head ``layer.head``'s QK circuit at a query-key ``offset``: ``W_Q R W_K^T`` ``[d_model, d_model]``.

    The pre-softmax score of a query with normed input ``x̂_i`` (after the attention norm) on a key
    ``offset`` positions earlier, ``x̂_j`` (``j = i - offset``), is ``x̂_i @ W_QK @ x̂_j^T`` times the
    layer's scale (:meth:`~reslens.arch.Arch.attn_scale`), biases aside (Qwen2's q/k biases add
    terms linear in ``x̂``). ``R = arch.rotation(layer, offset)``: under rotary positions the
    model's own rotation by the offset, so ``offset=0`` (the default) is the content-only part
    (``R(0) = I`` for plain rotary); with learned positions ``R = I`` and the offset changes
    nothing (positions are already in ``x̂``). Float32. ``fold_ln=True`` folds the attention norm's
    γ into both sides, so it acts on ``x / σ(x)`` (exact under RMSNorm).
    """
    arch = adapter(model)
    arch.require("qk_circuit")
    layer, head = _check_head(arch, layer, head)
    check_int(offset, "offset", low=0, high=arch.n_ctx - 1)
    gamma = _gamma(arch, layer, fold_ln)
    w_q, w_k = arch.W_Q(layer)[head].detach().float(), arch.W_K(layer)[head].detach().float()
    if gamma is not None:
        w_q, w_k = gamma.to(w_q.device) * w_q, gamma.to(w_k.device) * w_k
    if arch.positional != "rotary":
        return w_q @ w_k.T
    with torch.no_grad():
        rotation = arch.rotation(layer, offset).float().to(w_q.device)
    return (w_q @ rotation) @ w_k.T


# --- OV eigenvalues ---------------------------------------------------------------------------


def _effective_embedding(arch: Arch, which: str) -> torch.Tensor:
    """``W_E_in`` (``"embed"``) or ``W_E_in + mlp_0(norm(W_E_in))`` (``"embed+mlp0"``) ``[d_vocab, d_model]``.

    Float32; ``W_E_in`` is the embedding as it enters the residual (Gemma: scaled by ``√d_model``).

    Block 0's MLP through the adapter's weights (:meth:`~reslens.arch.MLPWeights.coefficients`),
    in chunks of 4,096 rows, summed as ``(x + m @ W_out) + b_out``.
    """
    w_e = arch.W_E_in.detach().float()
    if which == "embed":
        return w_e
    norm, mlp = arch.norm("mlp", 0), arch.mlp_weights(0)
    w_out = mlp.W_out.detach().float()
    b_out = None if mlp.b_out is None else mlp.b_out.detach().float()
    out = torch.empty_like(w_e)
    with torch.no_grad():
        for start in range(0, w_e.shape[0], 4096):
            x = w_e[start : start + 4096]
            m = mlp.coefficients(norm(x))
            if arch.out_norm("mlp", 0) is not None:  # the MLP's output passes its norm (Gemma 2/3, OLMo 2)
                out[start : start + 4096] = x + arch.mlp_output(0, m)
                continue
            y = x + m @ w_out
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
    """Eigenvalues and copying score of every head's full OV circuit ``W_E_in W_V W_O W_U^T``.

    The ``[d_vocab, d_vocab]`` matrix is never built: its nonzero eigenvalues are those of
    ``W_O (W_U^T W_E_in) W_V`` ``[d_head, d_head]``, formed and solved in float64 (``W_U^T W_E_in``
    once, summed over vocabulary chunks; then one layer's weights at a time). Copying score =
    ``Σλ / Σ|λ|``. One per query head: under grouped-query attention the heads sharing a
    key/value head share ``W_V`` but each has its own ``W_O``. Options, off by default:

    - ``fold_ln=True``: multiply ``W_V`` by the head's attention-norm γ and ``W_U`` by the
      final norm's γ (the per-token scale is ignored either way; so are LayerNorm's centring and
      bias, while RMSNorm has neither, so γ is all it folds)
    - ``effective_embedding="embed+mlp0"``: heads after block 0 read ``W_E_in + mlp_0(norm(W_E_in))``
      instead of ``W_E_in`` (block 0's attention and the position embeddings are ignored; a mixture
      of experts' MLP routes each row as the model does); layer-0 heads always read ``W_E_in``

    ``W_E_in`` is the embedding as it enters the residual (Gemma: ``W_E · √d_model``, which scales
    every eigenvalue by ``√d_model`` and leaves the copying score as it is). Refused with the
    reason where each head's output passes a norm before the residual (Gemma 2/3, OLMo 2).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50))
    >>> ov = ov_eigen_summary(model)
    >>> tuple(ov.eigenvalues.shape), bool((ov.copying.abs() <= 1).all())
    ((2, 2, 8), True)
    """
    arch = adapter(model)
    arch.require("ov_circuit")
    check_bool(fold_ln, "fold_ln")
    check_choice(effective_embedding, EFFECTIVE_EMBEDDINGS, "effective_embedding")
    with torch.no_grad():
        gamma = arch.norm("final").gamma.double() if fold_ln else None
        a_embed = _unembed_gram(arch.W_U, arch.W_E_in, gamma)  # [d, d] float64
        a_eff = (a_embed if effective_embedding == "embed"
                 else _unembed_gram(arch.W_U, _effective_embedding(arch, effective_embedding), gamma))
        eigenvalues = []
        for layer in range(arch.n_layer):
            w_v = arch.W_V(layer).detach().double()  # [H, d, dh]
            if fold_ln:
                w_v = w_v * arch.norm("attn", layer).gamma.double()[None, :, None]
            w_o = arch.W_O(layer).detach().double()  # [H, dh, d]
            small = w_o @ (a_embed if layer == 0 else a_eff).to(w_o.device) @ w_v  # [H, dh, dh]
            eigenvalues.append(torch.linalg.eigvals(small).cpu())
        eig = torch.stack(eigenvalues)  # [L, H, dh] complex128
        eig = eig.gather(-1, eig.abs().argsort(dim=-1, descending=True))
        copying = eig.sum(-1).real / eig.abs().sum(-1).clamp(min=torch.finfo(torch.float64).tiny)
    return OVSummary(eig.to(torch.complex64), copying.float(), fold_ln, effective_embedding)

