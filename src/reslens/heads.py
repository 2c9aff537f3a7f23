"""Attention heads and the residual stream as a communication channel (Elhage et al. 2021).

Head scores from attention patterns (induction, previous-token, duplicate-token,
current-token), the OV circuit's eigenvalue summary, Q/K/V composition scores and direct
logit attribution, all on the unmodified HuggingFace model: per-head weights come from the
:class:`~reslens._gpt2.GPT2` adapter, activations from :func:`reslens.hooks.capture` (the
model keeps its own attention implementation; patterns are recomputed from q and k).

Row-vector convention throughout (``x @ W``), weights as stored (nothing folded unless a
function's ``fold_ln=True`` says so):

- ``W_Q, W_K, W_V: [n_head, d_model, d_head]``, ``W_O: [n_head, d_head, d_model]`` per layer
- OV circuit of a head ``W_OV = W_V @ W_O``; QK circuit ``W_QK = W_Q @ W_K^T`` (both
  ``[d_model, d_model]``); full OV circuit ``W_E @ W_OV @ W_U^T`` ``[d_vocab, d_vocab]``
- heads are written ``layer.head``, 0-based (``"1.3"``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._gpt2 import GPT2
from reslens._saving import Saveable
from reslens.hooks import Batch, as_batch, capture

__all__ = [
    "HeadScores",
    "OVSummary",
    "CompositionScores",
    "LogitAttribution",
    "COMPOSITION_KINDS",
    "EFFECTIVE_EMBEDDINGS",
    "attention_patterns",
    "repeated_tokens",
    "induction_scores",
    "previous_token_scores",
    "duplicate_token_scores",
    "current_token_scores",
    "ov_circuit",
    "qk_circuit",
    "ov_eigen_summary",
    "composition_scores",
    "logit_attribution",
]

COMPOSITION_KINDS = ("q", "k", "v")
#: ``"wte"``: token embeddings as stored; ``"wte+mlp0"``: heads after block 0 read
#: ``W_E + mlp_0(ln_2(W_E))`` (block 0's MLP applied to each embedding alone).
EFFECTIVE_EMBEDDINGS = ("wte", "wte+mlp0")


def head_label(layer: int, head: int) -> str:
    """``"layer.head"``."""
    return f"{layer}.{head}"


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return value


def _pandas():
    try:
        import pandas
    except ImportError as error:  # pragma: no cover - pandas is optional
        raise ImportError("to_frame needs pandas: pip install pandas") from error
    return pandas


def _check_head(g: GPT2, layer: Any, head: Any) -> tuple[int, int]:
    for name, value, n in (("layer", layer, g.n_layer), ("head", head, g.n_head)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__}")
        if not 0 <= value < n:
            raise ValueError(f"{name}={value} is out of range for a model with {n} {name}s (0..{n - 1})")
    return layer, head


# --- result types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadScores(Saveable):
    """One number per attention head: ``scores: [n_layer, n_head]`` (float32).

    ``name`` says what was measured (``"induction"``, ``"previous-token"``, ...) and
    ``description`` how. NaN marks a head the score does not apply to.
    """

    scores: torch.Tensor
    name: str
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.scores, torch.Tensor) or self.scores.ndim != 2:
            got = tuple(self.scores.shape) if isinstance(self.scores, torch.Tensor) else type(self.scores).__name__
            raise ValueError(f"HeadScores.scores must be a [n_layer, n_head] tensor; got {got}")
        object.__setattr__(self, "scores", self.scores.detach().float().cpu())

    @property
    def n_layer(self) -> int:
        return self.scores.shape[0]

    @property
    def n_head(self) -> int:
        return self.scores.shape[1]

    def top(self, k: int = 5, *, largest: bool = True) -> list[tuple[str, float]]:
        """The ``k`` highest (``largest=False``: lowest) heads as ``("layer.head", score)``; NaN skipped."""
        _check_int(k, "k", minimum=1)
        flat = self.scores.flatten()
        keep = (~flat.isnan()).nonzero().flatten()
        order = flat[keep].argsort(descending=largest, stable=True)[:k]
        return [
            (head_label(*divmod(int(keep[i]), self.n_head)), float(flat[keep[i]])) for i in order
        ]

    def to_frame(self):
        """``pandas.DataFrame`` with columns ``layer, head, label, score``: one row per head."""
        pd = _pandas()

        layer, head = torch.meshgrid(torch.arange(self.n_layer), torch.arange(self.n_head), indexing="ij")
        return pd.DataFrame({
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "label": [head_label(l, h) for l, h in zip(layer.flatten().tolist(), head.flatten().tolist())],
            "score": self.scores.flatten().numpy(),
        })

    def table(self, k: int = 5) -> str:
        """The score of every head as a layers x heads grid, then the top ``k``."""
        cells = "".join(f"{f'h{h}':>8}" for h in range(self.n_head))
        lines = [f"{self.name} scores" + (f" ({self.description})" if self.description else ""), f"{'':<8}{cells}"]
        for layer in range(self.n_layer):
            lines.append(f"{f'L{layer}':<8}" + "".join(f"{float(v):>8.3f}" for v in self.scores[layer]))
        lines.append("top: " + ", ".join(f"{label} {score:.3f}" for label, score in self.top(k)))
        return "\n".join(lines)

    def plot(self, *, ax=None, annotate: bool | None = None):
        """Layers x heads heatmap (needs matplotlib). Returns the figure."""
        from reslens.plot import plot_head_scores

        return plot_head_scores(self, ax=ax, annotate=annotate)

    def __repr__(self) -> str:
        top = ", ".join(f"{label}={score:.3f}" for label, score in self.top(3))
        return f"HeadScores({self.name!r}, [{self.n_layer} x {self.n_head}], top: {top})"


@dataclass(frozen=True)
class OVSummary(Saveable):
    """Eigenvalues of every head's full OV circuit ``W_E W_V W_O W_U^T`` ``[d_vocab, d_vocab]``.

    They are computed from the ``d_head x d_head`` matrix ``W_O (W_U^T W_E) W_V``, which has
    the same nonzero eigenvalues. ``eigenvalues: [n_layer, n_head, d_head]`` (complex64,
    sorted by decreasing modulus); ``copying: [n_layer, n_head]`` = ``Σλ / Σ|λ|`` in [-1, 1]
    (near 1: the head copies the tokens it attends to; strongly negative: it suppresses
    them). ``fold_ln`` and ``effective_embedding`` record the options used.
    """

    eigenvalues: torch.Tensor
    copying: torch.Tensor
    fold_ln: bool = False
    effective_embedding: str = "wte"

    def __post_init__(self) -> None:
        if self.eigenvalues.ndim != 3 or not self.eigenvalues.is_complex():
            raise ValueError(f"eigenvalues must be complex [n_layer, n_head, d_head]; got {tuple(self.eigenvalues.shape)}")
        if tuple(self.copying.shape) != tuple(self.eigenvalues.shape[:2]):
            raise ValueError(f"copying has shape {tuple(self.copying.shape)}; expected {tuple(self.eigenvalues.shape[:2])}")

    @property
    def copying_scores(self) -> HeadScores:
        """The copying score as :class:`HeadScores` (``.top``, ``.plot``)."""
        how = "Σλ/Σ|λ| of W_E W_OV W_U^T" + (", LN γ folded" if self.fold_ln else "")
        if self.effective_embedding != "wte":
            how += f", embedding {self.effective_embedding}"
        return HeadScores(self.copying, "copying", how)

    def top(self, k: int = 5, *, largest: bool = True) -> list[tuple[str, float]]:
        """Heads with the highest (``largest=False``: most negative) copying scores."""
        return self.copying_scores.top(k, largest=largest)

    def deleters(
        self, current_token: HeadScores, *, max_copying: float = -0.3, min_attention: float = 0.3
    ) -> list[tuple[str, float, float]]:
        """Candidate deleting heads: copying score ``<= max_copying`` (large negative
        eigenvalues) and mean attention to the current token ``>= min_attention``
        (``current_token`` from :func:`current_token_scores`). Returns
        ``("layer.head", copying, attention)``, most negative first."""
        if not isinstance(current_token, HeadScores):
            raise TypeError(f"current_token must be HeadScores from current_token_scores(); got {type(current_token).__name__}")
        if current_token.scores.shape != self.copying.shape:
            raise ValueError(f"current_token is {tuple(current_token.scores.shape)}; expected {tuple(self.copying.shape)}")
        hits = ((self.copying <= max_copying) & (current_token.scores >= min_attention)).nonzero().tolist()
        found = [(head_label(l, h), float(self.copying[l, h]), float(current_token.scores[l, h])) for l, h in hits]
        return sorted(found, key=lambda item: item[1])

    def to_frame(self):
        """``pandas.DataFrame``: ``layer, head, label, copying, max_abs_eig, min_real_eig`` per head."""
        frame = self.copying_scores.to_frame().rename(columns={"score": "copying"})
        frame["max_abs_eig"] = self.eigenvalues.abs().amax(-1).flatten().numpy()
        frame["min_real_eig"] = self.eigenvalues.real.amin(-1).flatten().numpy()
        return frame

    def table(self, k: int = 5) -> str:
        return self.copying_scores.table(k)

    def plot(self, *, ax=None, annotate: bool | None = None):
        """Heatmap of the copying scores (diverging colours, -1..1). Returns the figure."""
        return self.copying_scores.plot(ax=ax, annotate=annotate)


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
        if self.kind not in COMPOSITION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(COMPOSITION_KINDS)}; got {self.kind!r}")
        if self.scores.ndim != 4 or self.scores.shape[:2] != self.scores.shape[2:]:
            raise ValueError(f"scores must be [n_layer, n_head, n_layer, n_head]; got {tuple(self.scores.shape)}")
        for name in ("raw", "mask"):
            if getattr(self, name).shape != self.scores.shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {tuple(self.scores.shape)}")

    @property
    def n_layer(self) -> int:
        return self.scores.shape[0]

    @property
    def n_head(self) -> int:
        return self.scores.shape[1]

    def top(self, k: int = 5) -> list[tuple[str, str, float]]:
        """The ``k`` strongest pairs as ``(writer "layer.head", reader "layer.head", score)``."""
        _check_int(k, "k", minimum=1)
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
        """How much each earlier head composes into head ``layer.head`` (``[n_layer, n_head]``, NaN if not earlier)."""
        return HeadScores(self.scores[:, :, layer, head], f"{self.kind.upper()}-composition into {head_label(layer, head)}",
                          f"minus baseline {self.baseline:.3f}")

    def to_frame(self):
        """``pandas.DataFrame``: one row per earlier -> later pair (``writer, reader, raw, score``)."""
        pd = _pandas()

        a, i, b, j = self.mask.nonzero(as_tuple=True)
        return pd.DataFrame({
            "writer": [head_label(x, y) for x, y in zip(a.tolist(), i.tolist())],
            "reader": [head_label(x, y) for x, y in zip(b.tolist(), j.tolist())],
            "writer_layer": a.numpy(), "writer_head": i.numpy(),
            "reader_layer": b.numpy(), "reader_head": j.numpy(),
            "raw": self.raw[a, i, b, j].numpy(),
            "score": self.scores[a, i, b, j].numpy(),
        })

    def table(self, k: int = 10) -> str:
        lines = [f"{self.kind.upper()}-composition (raw minus random baseline {self.baseline:.4f} ± {self.baseline_std:.4f})"]
        lines += [f"  {w:>6} -> {r:<6} {s:+.4f}" for w, r, s in self.top(k)]
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """``[n_layer * n_head]^2`` heatmap, writers as rows, readers as columns. Returns the figure."""
        from reslens.plot import plot_composition

        return plot_composition(self, ax=ax)

    def __repr__(self) -> str:
        top = ", ".join(f"{w}->{r}={s:.3f}" for w, r, s in self.top(3))
        return (f"CompositionScores(kind={self.kind!r}, [{self.n_layer} x {self.n_head}]^2, "
                f"baseline={self.baseline:.4f}, top: {top})")


@dataclass(frozen=True)
class LogitAttribution(Saveable):
    """The final logit (or logit difference) at one position per sequence, split into pieces.

    ``ln_f`` is linearised at that position: with ``x`` the final raw residual, ``σ =
    sqrt(var(x) + eps)`` its actual LayerNorm scale and ``u = γ ⊙ (W_U[target] -
    W_U[against])`` (``W_U[target]`` alone without ``against``), a piece ``p`` contributes
    ``(p - mean(p)) · u / σ``, and ``β · (W_U[target] - W_U[against])`` (plus an LM-head
    bias, if any) is the piece ``"ln_f bias"``. Because ``x`` is the sum of the pieces and
    ``σ`` is held at its actual value, the pieces sum to the model's logit exactly (to float
    rounding). Pieces, in order (``labels``): ``"embed"`` (``wte``), ``"pos_embed"``
    (``wpe``), then per layer ``l`` every head ``"l.h"`` (``z_h @ W_O[h]``, which includes
    its value bias), ``"attn_bias l"`` (``attn.c_proj.bias``), ``"mlp l"`` (the MLP output,
    its ``c_proj`` bias included), and finally ``"ln_f bias"``.

    - ``contributions: [batch, n_components]`` float32; ``logit: [batch]`` the model's own
      logit (difference), computed by the model
    - ``input_ids``, ``attention_mask``: ``[batch, pos]``; ``position``, ``target``: ``[batch]``;
      ``against: [batch]`` or None; ``scale: [batch]`` (``σ``)
    """

    contributions: torch.Tensor
    labels: tuple[str, ...]
    logit: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    against: torch.Tensor | None
    scale: torch.Tensor
    n_layer: int
    n_head: int
    token_strings: dict[int, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        batch = self.input_ids.shape[0]
        if tuple(self.contributions.shape) != (batch, len(self.labels)):
            raise ValueError(f"contributions has shape {tuple(self.contributions.shape)}; expected {(batch, len(self.labels))}")
        if len(self.labels) != 3 + self.n_layer * (self.n_head + 2):
            raise ValueError(f"{len(self.labels)} labels do not fit {self.n_layer} layers of {self.n_head} heads")
        for name in ("logit", "position", "target", "against", "scale"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(batch,)}")

    def sum(self) -> torch.Tensor:
        """``[batch]``: the sum of all pieces (equals ``logit`` to float rounding)."""
        return self.contributions.sum(-1)

    def heads(self) -> torch.Tensor:
        """Head pieces as ``[batch, n_layer, n_head]``."""
        per_layer = self.contributions[:, 2 : 2 + self.n_layer * (self.n_head + 2)]
        return per_layer.reshape(-1, self.n_layer, self.n_head + 2)[..., : self.n_head]

    def head_scores(self, seq: int = 0) -> HeadScores:
        """Head pieces of sequence ``seq`` as :class:`HeadScores`."""
        return HeadScores(self.heads()[seq], "direct logit attribution", self._what(seq))

    def top(self, k: int = 10, seq: int = 0) -> list[tuple[str, float]]:
        """The ``k`` pieces of largest magnitude in sequence ``seq`` as ``(label, contribution)``."""
        _check_int(k, "k", minimum=1)
        row = self.contributions[seq]
        return [(self.labels[i], float(row[i])) for i in row.abs().argsort(descending=True, stable=True)[:k].tolist()]

    def token(self, token_id: int) -> str:
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def _what(self, seq: int) -> str:
        what = f"logit of {self.token(int(self.target[seq]))!r}"
        if self.against is not None:
            what += f" - logit of {self.token(int(self.against[seq]))!r}"
        return what + f" at position {int(self.position[seq])}"

    def to_frame(self):
        """``pandas.DataFrame``: one row per (sequence, piece) with ``kind, layer, head``."""
        pd = _pandas()

        rows = []
        for seq in range(self.contributions.shape[0]):
            for label, value in zip(self.labels, self.contributions[seq].tolist()):
                kind, layer, head = _parse_label(label)
                rows.append({"seq": seq, "label": label, "kind": kind, "layer": layer, "head": head, "contribution": value})
        return pd.DataFrame(rows)

    def table(self, seq: int = 0, k: int = 10) -> str:
        lines = [self._what(seq) + f": model {float(self.logit[seq]):.4f}, sum of pieces {float(self.sum()[seq]):.4f}"]
        lines += [f"  {label:<12} {value:+.4f}" for label, value in self.top(k, seq)]
        return "\n".join(lines)

    def plot(self, seq: int = 0, *, ax=None):
        """Heads as a layers x heads heatmap beside a bar chart of the other pieces. Returns the figure."""
        from reslens.plot import plot_logit_attribution

        return plot_logit_attribution(self, seq=seq, ax=ax)

    def __repr__(self) -> str:
        return f"LogitAttribution(batch={self.contributions.shape[0]}, components={len(self.labels)}, top: {self.top(3)})"


def _parse_label(label: str) -> tuple[str, int, int]:
    """``(kind, layer, head)`` of a piece label; -1 where it does not apply."""
    if label in ("embed", "pos_embed", "ln_f bias"):
        return label, -1, -1
    if label.startswith("attn_bias "):
        return "attn_bias", int(label.split()[1]), -1
    if label.startswith("mlp "):
        return "mlp", int(label.split()[1]), -1
    layer, head = label.split(".")
    return "head", int(layer), int(head)


# --- attention-pattern scores -----------------------------------------------------------------


def attention_patterns(model: Any, inputs: Any, *, tokenizer: Any = None) -> torch.Tensor:
    """Softmax attention of every head ``[n_layer, batch, head, query, key]`` (float32).

    Captured through :mod:`reslens.hooks` (recomputed from q and k, so the model keeps its
    own attention implementation, e.g. sdpa). Query rows of pads hold zeros; pads are never
    attended to.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> tuple(attention_patterns(model, torch.tensor([[1, 2, 3]])).shape)
    (2, 1, 2, 3, 3)
    """
    return _patterns(model, inputs, tokenizer)[1]


def _patterns(model: Any, inputs: Any, tokenizer: Any) -> tuple[Batch, torch.Tensor]:
    g = GPT2(model)
    batch = as_batch(inputs, g, tokenizer)
    res = capture(model, batch, sites="attn_pattern", dtype=torch.float32)
    return batch, res.attn_pattern


def repeated_tokens(
    model: Any, *, seq_len: int = 50, n: int = 10, seed: int = 0, token_pool: Any = None, bos_token_id: int | None = None
) -> torch.Tensor:
    """``n`` random sequences of ``seq_len`` tokens, each written twice: ``[n, 2 * seq_len]``
    (``[n, 1 + 2 * seq_len]`` with ``bos_token_id``, which is written first).

    Tokens are drawn uniformly (with replacement) from ``token_pool`` (default: the whole
    vocabulary) by a generator seeded with ``seed``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    >>> ids = repeated_tokens(model, seq_len=4, n=2)
    >>> tuple(ids.shape), bool((ids[:, :4] == ids[:, 4:]).all())
    ((2, 8), True)
    """
    g = GPT2(model)
    _check_int(seq_len, "seq_len", minimum=2)
    _check_int(n, "n", minimum=1)
    _check_int(seed, "seed", minimum=0)
    extra = 0
    if bos_token_id is not None:
        _check_int(bos_token_id, "bos_token_id", minimum=0)
        if bos_token_id >= g.d_vocab:
            raise ValueError(f"bos_token_id={bos_token_id} is outside the vocabulary 0..{g.d_vocab - 1}")
        extra = 1
    if 2 * seq_len + extra > g.n_positions:
        raise ValueError(
            f"seq_len={seq_len} repeated twice needs {2 * seq_len + extra} positions; the model has "
            f"n_positions={g.n_positions} (use seq_len <= {(g.n_positions - extra) // 2})"
        )
    if token_pool is None:
        pool = torch.arange(g.d_vocab)
    else:
        try:
            pool = torch.as_tensor(token_pool)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"token_pool must be a sequence or 1-D tensor of token ids; got {type(token_pool).__name__}") from error
        if pool.ndim != 1 or pool.numel() < 2 or pool.dtype.is_floating_point or pool.dtype == torch.bool:
            raise ValueError(f"token_pool must be a 1-D collection of at least 2 integer token ids; got shape {tuple(pool.shape)}, dtype {pool.dtype}")
        if int(pool.min()) < 0 or int(pool.max()) >= g.d_vocab:
            raise ValueError(f"token_pool contains ids outside the vocabulary 0..{g.d_vocab - 1}")
    generator = torch.Generator().manual_seed(seed)
    first = pool[torch.randint(len(pool), (n, seq_len), generator=generator)].long()
    parts = [first, first] if bos_token_id is None else [torch.full((n, 1), bos_token_id, dtype=torch.long), first, first]
    return torch.cat(parts, dim=1)


def induction_scores(
    model: Any, *, seq_len: int = 50, n: int = 10, seed: int = 0, token_pool: Any = None, bos_token_id: int | None = None
) -> HeadScores:
    """Induction score of every head on repeated random tokens (as in TransformerLens).

    On ``n`` sequences of ``seq_len`` random tokens written twice (:func:`repeated_tokens`),
    the mean attention from each position ``i`` of the second repeat to ``i - seq_len + 1``
    (the token after the earlier copy of the current token). An induction head scores
    near 1; uniform attention scores about ``1 / i``. ``bos_token_id`` (e.g. the
    tokenizer's end-of-text id, as TransformerLens prepends BOS) is written before the
    repeats and never scored.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> s = induction_scores(model, seq_len=5, n=2)
    >>> tuple(s.scores.shape), s.top(1)[0][0] in {"0.0", "0.1", "1.0", "1.1"}
    ((2, 2), True)
    """
    ids = repeated_tokens(model, seq_len=seq_len, n=n, seed=seed, token_pool=token_pool, bos_token_id=bos_token_id)
    _, pattern = _patterns(model, ids.to(GPT2(model).device), None)  # [L, n, H, P, P]
    start = 0 if bos_token_id is None else 1
    query = torch.arange(start + seq_len, start + 2 * seq_len, device=pattern.device)
    stripe = pattern[..., query, query - seq_len + 1]  # [L, n, H, seq_len]
    return HeadScores(
        stripe.mean(dim=(1, 3)), "induction",
        f"mean attention from i to i-{seq_len}+1 over the second repeat; {n} x {seq_len} random tokens, seed {seed}"
        + ("" if bos_token_id is None else f", BOS {bos_token_id} first"),
    )


def previous_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention from each token to the token just before it ``[n_layer, n_head]``.

    Averaged over every real query position that has a real previous token (pads never
    count). ``inputs``: ids ``[batch, pos]``, a :class:`~reslens.hooks.Batch`, or text with
    ``tokenizer=``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> s = previous_token_scores(model, torch.tensor([[1, 2, 3, 4, 5]]))
    >>> bool(((s.scores > 0) & (s.scores < 1)).all())
    True
    """
    batch, pattern = _patterns(model, inputs, tokenizer)
    mask = batch.attention_mask
    valid = (mask[:, 1:] & mask[:, :-1]).float()  # [B, P-1]: query i has a real token i-1
    if valid.sum() == 0:
        raise ValueError("previous-token scores need a sequence with at least 2 real tokens")
    stripe = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [L, B, H, P-1]: attention i -> i-1
    scores = (stripe * valid[None, :, None]).sum(dim=(1, 3)) / valid.sum()
    return HeadScores(scores, "previous-token", f"mean attention to i-1 over {int(valid.sum())} positions")


def current_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention from each token to itself ``[n_layer, n_head]``, over real query
    positions that have at least one earlier real token (the first token can only attend
    to itself, so it is left out).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> tuple(current_token_scores(model, torch.tensor([[1, 2, 3]])).scores.shape)
    (2, 2)
    """
    batch, pattern = _patterns(model, inputs, tokenizer)
    mask = batch.attention_mask
    valid = (mask & (mask.long().cumsum(-1) >= 2)).float()  # [B, P]
    if valid.sum() == 0:
        raise ValueError("current-token scores need a sequence with at least 2 real tokens")
    diag = pattern.diagonal(dim1=-2, dim2=-1)  # [L, B, H, P]
    scores = (diag * valid[None, :, None]).sum(dim=(1, 3)) / valid.sum()
    return HeadScores(scores, "current-token", f"mean attention to i over {int(valid.sum())} positions")


def duplicate_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention mass on earlier occurrences of the current token ``[n_layer, n_head]``.

    Averaged over real query positions whose token occurred earlier in the sequence (pads
    never count). On :func:`repeated_tokens` this is TransformerLens's duplicate-token
    score (attention from the second repeat to the first).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> s = duplicate_token_scores(model, repeated_tokens(model, seq_len=4, n=2))
    >>> tuple(s.scores.shape)
    (2, 2)
    """
    batch, pattern = _patterns(model, inputs, tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    n_pos = ids.shape[1]
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool, device=ids.device).tril(-1)  # key < query
    same = (ids[:, :, None] == ids[:, None, :]) & earlier & mask[:, :, None] & mask[:, None, :]  # [B, q, k]
    has = same.any(-1).float()  # [B, q]
    if has.sum() == 0:
        raise ValueError(
            "no token occurs twice in inputs, so duplicate-token scores are undefined; "
            "use inputs with repeats, e.g. repeated_tokens(model)"
        )
    mass = (pattern * same[None, :, None].float()).sum(-1)  # [L, B, H, q]
    scores = (mass * has[None, :, None]).sum(dim=(1, 3)) / has.sum()
    return HeadScores(scores, "duplicate-token", f"attention to earlier copies over {int(has.sum())} positions")


# --- circuits from the weights -----------------------------------------------------------------


def _stacked(g: GPT2, name: str, fold_ln: bool = False) -> torch.Tensor:
    """``W_Q/W_K/W_V [n_layer, n_head, d_model, d_head]`` or ``W_O [n_layer, n_head, d_head, d_model]``
    in float32; ``fold_ln`` multiplies the rows of W_Q/W_K/W_V by ``ln_1``'s γ."""
    weights = []
    for layer in range(g.n_layer):
        w = getattr(g, name)(layer).detach().float()
        if fold_ln and name != "W_O":
            w = w * g.ln_1(layer).weight.detach().float()[None, :, None]
        weights.append(w)
    return torch.stack(weights)


def ov_circuit(model: Any, layer: int, head: int) -> torch.Tensor:
    """Head ``layer.head``'s OV circuit ``W_V @ W_O`` ``[d_model, d_model]`` (float32, rank ``d_head``).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    >>> w = ov_circuit(model, 0, 1)
    >>> tuple(w.shape), int(torch.linalg.matrix_rank(w))
    ((16, 16), 8)
    """
    g = GPT2(model)
    _check_head(g, layer, head)
    return g.W_V(layer)[head].detach().float() @ g.W_O(layer)[head].detach().float()


def qk_circuit(model: Any, layer: int, head: int) -> torch.Tensor:
    """Head ``layer.head``'s QK circuit ``W_Q @ W_K^T`` ``[d_model, d_model]`` (float32):
    the attention score of query ``x_q`` on key ``x_k`` (after ``ln_1``, biases aside) is
    ``x_q @ W_QK @ x_k^T`` times the layer's scale."""
    g = GPT2(model)
    _check_head(g, layer, head)
    return g.W_Q(layer)[head].detach().float() @ g.W_K(layer)[head].detach().float().T


def _effective_embedding(g: GPT2, which: str) -> torch.Tensor:
    """``W_E`` (``"wte"``) or ``W_E + mlp_0(ln_2(W_E))`` (``"wte+mlp0"``) ``[d_vocab, d_model]`` float32."""
    w_e = g.wte.weight.detach().float()
    if which == "wte":
        return w_e
    ln, c_fc, c_proj, act = g.ln_2(0), g.c_fc(0), g.c_proj(0), g.mlp_activation(0)
    out = torch.empty_like(w_e)
    with torch.no_grad():
        for start in range(0, w_e.shape[0], 4096):
            x = w_e[start : start + 4096]
            h = torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
            h = act(h @ c_fc.weight.float() + c_fc.bias.float())
            out[start : start + 4096] = x + h @ c_proj.weight.float() + c_proj.bias.float()
    return out


def ov_eigen_summary(model: Any, *, fold_ln: bool = False, effective_embedding: str = "wte") -> OVSummary:
    """Eigenvalues and copying score of every head's full OV circuit ``W_E W_V W_O W_U^T``.

    The ``[d_vocab, d_vocab]`` matrix is never built: its nonzero eigenvalues are those of
    ``W_O (W_U^T W_E) W_V`` ``[d_head, d_head]`` (``W_U^T W_E`` is computed once). Copying
    score = ``Σλ / Σ|λ|``. Options, off by default:

    - ``fold_ln=True``: multiply ``W_V`` by the head's ``ln_1`` γ and ``W_U`` by ``ln_f``'s
      γ (LayerNorm centring and scale are ignored either way)
    - ``effective_embedding="wte+mlp0"``: heads after block 0 read ``W_E + mlp_0(ln_2(W_E))``
      instead of ``W_E`` (block 0's attention and the position embeddings are ignored);
      layer-0 heads always read ``W_E``

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    >>> ov = ov_eigen_summary(model)
    >>> tuple(ov.eigenvalues.shape), bool((ov.copying.abs() <= 1).all())
    ((2, 2, 8), True)
    """
    g = GPT2(model)
    if not isinstance(fold_ln, bool):
        raise TypeError(f"fold_ln must be True or False; got {type(fold_ln).__name__}")
    if effective_embedding not in EFFECTIVE_EMBEDDINGS:
        raise ValueError(f"effective_embedding must be one of {', '.join(EFFECTIVE_EMBEDDINGS)}; got {effective_embedding!r}")
    with torch.no_grad():
        w_u = g.W_U.detach().float()  # [V, d]
        if fold_ln:
            w_u = w_u * g.ln_f.weight.detach().float()
        w_e = g.wte.weight.detach().float()
        a_wte = w_u.T @ w_e  # [d, d]
        a_eff = a_wte if effective_embedding == "wte" else w_u.T @ _effective_embedding(g, effective_embedding)
        w_v = _stacked(g, "W_V", fold_ln)  # [L, H, d, dh]
        w_o = _stacked(g, "W_O")  # [L, H, dh, d]
        small = torch.stack([
            w_o[layer] @ (a_wte if layer == 0 else a_eff) @ w_v[layer] for layer in range(g.n_layer)
        ])  # [L, H, dh, dh]
        eig = torch.linalg.eigvals(small.double())  # [L, H, dh]
        order = eig.abs().argsort(dim=-1, descending=True)
        eig = eig.gather(-1, order)
        copying = eig.sum(-1).real / eig.abs().sum(-1).clamp(min=torch.finfo(torch.float64).tiny)
    return OVSummary(eig.to(torch.complex64).cpu(), copying.float().cpu(), fold_ln, effective_embedding)


def _gram_root(x: torch.Tensor) -> torch.Tensor:
    """``R [..., dh, dh]`` with ``R^T R = x^T x`` for ``x: [..., d, dh]``, so ``‖x M‖_F = ‖R M‖_F``
    for any ``M`` (the ``R`` of a QR decomposition up to rotation). Cholesky of the Gram
    matrix in float64 (much faster than QR or batched eigh on CPU), with a relative jitter of
    1e-12 so rank-deficient ``x`` works; any matrix it still fails on goes through ``eigh``."""
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
    """Frobenius norms for ``W_A = x @ y`` (``x: [..., d, dh]``, ``y: [..., dh, d]``) and
    ``W_B = u @ z`` (same shapes), so that only ``d_head``-sized products are formed:
    ``‖x y u z‖ = ‖R_x (y u) R_z^T‖`` with ``R_x^T R_x = x^T x`` and ``R_z^T R_z = z z^T``.
    Returns the left factors ``R_x y [..., dh, d]``, right factors ``u R_z^T [..., d, dh]``
    and their norms ``‖W_A‖``, ``‖W_B‖``."""
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
    ``fold_ln=True`` folds ``ln_1``'s γ into ``W_Q``, ``W_K``, ``W_V``. Weights as stored;
    biases are left out. Only ``d_head``-sized products are formed (see the source), so all
    of GPT-2 small takes seconds on a CPU.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    >>> comp = composition_scores(model, "k")
    >>> tuple(comp.scores.shape), int(comp.mask.sum())   # 2*2 + 2*4 + 2*2 earlier -> later pairs
    ((3, 2, 3, 2), 12)
    """
    g = GPT2(model)
    if kind not in COMPOSITION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in COMPOSITION_KINDS)}; got {kind!r}")
    if not isinstance(fold_ln, bool):
        raise TypeError(f"fold_ln must be True or False; got {type(fold_ln).__name__}")
    _check_int(n_baseline, "n_baseline", minimum=1)
    _check_int(seed, "seed", minimum=0)
    n_layer, n_head, d_head = g.n_layer, g.n_head, g.d_head
    with torch.no_grad():
        w_q, w_k, w_v = (_stacked(g, name, fold_ln) for name in ("W_Q", "W_K", "W_V"))
        w_o = _stacked(g, "W_O")
        u, z = {
            "q": (w_q, w_k.transpose(-1, -2)),
            "k": (w_k, w_q.transpose(-1, -2)),
            "v": (w_v, w_o),
        }[kind]
        left, right, norm_a, norm_b = _composition_norms(w_v, w_o, u, z)  # [L, H, dh, d], [L, H, d, dh]
        raw = torch.full((n_layer, n_head, n_layer, n_head), float("nan"))
        for a in range(n_layer - 1):
            writers = left[a].reshape(n_head * d_head, -1)  # [H*dh, d]
            readers = right[a + 1 :].permute(2, 0, 1, 3).reshape(g.d_model, -1)  # [d, (L-a-1)*H*dh]
            product = (writers @ readers).reshape(n_head, d_head, n_layer - a - 1, n_head, d_head)
            norms = product.square().sum(dim=(1, 4)).sqrt()  # [H, L-a-1, H]
            raw[a, :, a + 1 :] = (norms / (norm_a[a][:, None, None] * norm_b[a + 1 :][None])).cpu()
        baseline, spread = _random_baseline(g.d_model, d_head, n_baseline, seed)
    layer = torch.arange(n_layer)
    mask = (layer[:, None, None, None] < layer[None, None, :, None]).expand(n_layer, n_head, n_layer, n_head).clone()
    return CompositionScores(raw - baseline, raw, baseline, spread, kind, mask, fold_ln)


# --- direct logit attribution -----------------------------------------------------------------


def _token_ids(value: Any, n: int, g: GPT2, tokenizer: Any, name: str) -> torch.Tensor:
    """One token id per sequence ``[n]`` from an int, a one-token string, or a sequence/tensor of ids."""
    if isinstance(value, str):
        if tokenizer is None:
            raise TypeError(f"{name}={value!r} is text, so tokenizer= is required")
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{name}={value!r} is {len(ids)} tokens ({ids}); give text that is exactly one token, or an id")
        value = ids[0]
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a token id, a one-token string, or one id per sequence; got a bool")
    if isinstance(value, int):
        ids = torch.full((n,), value, dtype=torch.long)
    else:
        try:
            ids = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a token id, a one-token string, or one id per sequence; got {type(value).__name__}") from error
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
        ids = ids.long().reshape(-1) if ids.ndim == 0 else ids.long()
        if ids.ndim != 1 or len(ids) not in (1, n):
            raise ValueError(f"{name} must be one id or {n} ids (one per sequence); got shape {tuple(ids.shape)}")
        ids = ids.expand(n).clone()
    if int(ids.min()) < 0 or int(ids.max()) >= g.d_vocab:
        raise ValueError(f"{name} contains a token id outside the vocabulary 0..{g.d_vocab - 1}")
    return ids


def _positions(position: Any, batch: Batch) -> torch.Tensor:
    """The attributed position of each sequence ``[batch]``: its last real token by default."""
    mask = batch.attention_mask
    n_pos = mask.shape[1]
    if position is None:
        index = torch.arange(n_pos, device=mask.device).expand_as(mask)
        return torch.where(mask, index, -1).amax(-1)
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int or None (the last real token); got {type(position).__name__}")
    if not -n_pos <= position < n_pos:
        raise ValueError(f"position={position} is out of range for {n_pos} positions ({-n_pos}..{n_pos - 1})")
    position %= n_pos
    pads = (~mask[:, position]).nonzero().flatten().tolist()
    if pads:
        raise ValueError(f"position={position} is padding in sequence(s) {pads}; choose a real token (or position=None)")
    return torch.full((mask.shape[0],), position, dtype=torch.long, device=mask.device)


def logit_attribution(
    model: Any,
    inputs: Any,
    target: Any,
    *,
    against: Any = None,
    position: int | None = None,
    tokenizer: Any = None,
) -> LogitAttribution:
    """Direct logit attribution: the logit of ``target`` (minus that of ``against``) at
    ``position`` split into embeddings, every head, every attention bias, every MLP and the
    final LayerNorm bias, through ``ln_f`` linearised at that position (see
    :class:`LogitAttribution`; the pieces sum to the model's logit exactly).

    ``inputs``: ids ``[batch, pos]``, a Batch, or text with ``tokenizer=``. ``target`` /
    ``against``: a token id, a one-token string (with ``tokenizer=``), or one id per
    sequence. ``position``: index into the ``pos`` axis (negative from the end); default the
    last real token of each sequence. Computed in float32 from activations captured in
    float32; for a float16/bfloat16 model the pieces sum to the logit to that dtype's
    rounding, not float32's.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> dla = logit_attribution(model, torch.tensor([[1, 2, 3]]), target=7, against=8)
    >>> dla.labels[:5], len(dla.labels)
    (('embed', 'pos_embed', '0.0', '0.1', 'attn_bias 0'), 11)
    >>> bool(torch.allclose(dla.sum(), dla.logit, atol=1e-5))
    True
    """
    g = GPT2(model)
    batch = as_batch(inputs, g, tokenizer)
    n = len(batch)
    target_ids = _token_ids(target, n, g, tokenizer, "target").to(g.device)
    against_ids = None if against is None else _token_ids(against, n, g, tokenizer, "against").to(g.device)
    pos = _positions(position, batch)
    res = capture(model, batch, sites=("resid", "attn_z", "mlp_out", "logits"), layers=None, dtype=torch.float32)
    rows = torch.arange(n, device=pos.device)
    with torch.no_grad():
        z = g.split_heads(res.attn_z[:, rows, pos])  # [L, B, H, dh]
        w_o = _stacked(g, "W_O").to(z.device)  # [L, H, dh, d]
        heads = torch.einsum("lbhe,lhed->blhd", z, w_o)  # [B, L, H, d]
        mlp = res.mlp_out[:, rows, pos].transpose(0, 1)  # [B, L, d]
        b_o = torch.stack([g.b_O(layer).detach().float() for layer in range(g.n_layer)])  # [L, d]
        ids = batch.input_ids[rows, pos]
        embed = g.wte.weight.detach().float()[ids]  # [B, d]
        pos_embed = g.wpe.weight.detach().float()[batch.position_ids[rows, pos]]
        per_layer = torch.cat([heads, b_o[None].expand(n, -1, -1)[:, :, None], mlp[:, :, None]], dim=2)  # [B, L, H+2, d]
        pieces = torch.cat([embed[:, None], pos_embed[:, None], per_layer.flatten(1, 2)], dim=1)  # [B, C-1, d]

        x = res.resid[-1][rows, pos]  # [B, d]: final raw residual
        ln = g.ln_f
        scale = (x.var(-1, unbiased=False) + ln.eps).sqrt()  # [B]
        w_u = g.W_U.detach().float()
        direction = w_u[target_ids] - (w_u[against_ids] if against_ids is not None else 0)  # [B, d]
        u = ln.weight.detach().float() * direction
        u = u - u.mean(-1, keepdim=True)  # (p - mean p) . u == p . (u - mean u)
        contributions = torch.einsum("bcd,bd->bc", pieces, u) / scale[:, None]
        bias = direction @ ln.bias.detach().float()
        head = g.lm_head
        if head is not None and getattr(head, "bias", None) is not None:
            b = head.bias.detach().float()
            bias = bias + b[target_ids] - (b[against_ids] if against_ids is not None else 0)
        contributions = torch.cat([contributions, bias[:, None]], dim=1)
        logits = res.logits[rows, pos]  # [B, V]
        logit = logits.gather(1, target_ids[:, None]).squeeze(1)
        if against_ids is not None:
            logit = logit - logits.gather(1, against_ids[:, None]).squeeze(1)
    labels = ["embed", "pos_embed"]
    for layer in range(g.n_layer):
        labels += [head_label(layer, h) for h in range(g.n_head)] + [f"attn_bias {layer}", f"mlp {layer}"]
    labels.append("ln_f bias")
    strings = None
    if tokenizer is not None:
        wanted = set(target_ids.tolist()) | (set(against_ids.tolist()) if against_ids is not None else set())
        strings = {i: tokenizer.decode([i]) for i in wanted}
    return LogitAttribution(
        contributions=contributions.cpu(), labels=tuple(labels), logit=logit.cpu(),
        input_ids=batch.input_ids.cpu(), attention_mask=batch.attention_mask.cpu(), position=pos.cpu(),
        target=target_ids.cpu(), against=None if against_ids is None else against_ids.cpu(), scale=scale.cpu(),
        n_layer=g.n_layer, n_head=g.n_head, token_strings=strings,
    )
