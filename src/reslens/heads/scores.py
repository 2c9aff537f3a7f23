"""Head scores from attention patterns: induction, previous-token, duplicate-token, current-token.

Each score has a pure form (``*_of``) that reads the ``attn_pattern`` site of captured
:class:`~reslens.residuals.Residuals` (and the mask / ids it needs), so one capture can feed
every score, and a model-taking wrapper that captures the pattern and calls it. Patterns are
``[n_layer, batch, head, query, key]`` float32, recomputed from q and k by
:mod:`reslens.hooks` (the model keeps its own attention implementation, with its own rotary
positions, grouped-query heads and sliding window), so the scores mean the same on every
family. Pads are never attended to and never counted; special tokens the tokenizer's convention
added (``Residuals.stat_mask``, e.g. a Llama-family BOS) are attended to as the model attends
to them but, like pads, are never a position a score averages over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from reslens._checks import check_int, check_memory
from reslens._inputs import Batch, as_batch
from reslens._saving import Saveable
from reslens.arch import Arch, adapter
from reslens._text import head_label, html_table, pandas
from reslens.hooks import _capture
from reslens.residuals import Residuals

__all__ = [
    "HeadScores", "head_label", "attention_patterns", "repeated_tokens",
    "induction_scores", "previous_token_scores", "duplicate_token_scores", "current_token_scores",
    "induction_scores_of", "previous_token_scores_of", "duplicate_token_scores_of", "current_token_scores_of",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadScores(Saveable):
    """One number per attention head: ``scores: [n_layer, n_head]`` (float32, CPU).

    ``name`` says what was measured (``"induction"``, ``"previous-token"``, ...) and
    ``description`` how. NaN marks a head the score does not apply to.
    """

    scores: torch.Tensor
    name: str
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.scores, torch.Tensor) or self.scores.ndim != 2:
            is_tensor = isinstance(self.scores, torch.Tensor)
            got = tuple(self.scores.shape) if is_tensor else type(self.scores).__name__
            raise ValueError(f"HeadScores.scores must be a [n_layer, n_head] tensor; got {got}")
        object.__setattr__(self, "scores", self.scores.detach().float().cpu())

    @property
    def n_layer(self) -> int:
        """Number of layers (rows)."""
        return self.scores.shape[0]

    @property
    def n_head(self) -> int:
        """Number of heads per layer (columns)."""
        return self.scores.shape[1]

    def top(self, k: int = 5, *, largest: bool = True) -> list[tuple[str, float]]:
        """The ``k`` highest (``largest=False``: lowest) heads as ``("layer.head", score)``; NaN skipped."""
        check_int(k, "k", low=1)
        flat = self.scores.flatten()
        keep = (~flat.isnan()).nonzero().flatten()
        order = flat[keep].argsort(descending=largest, stable=True)[:k]
        return [(head_label(*divmod(int(keep[i]), self.n_head)), float(flat[keep[i]])) for i in order]

    def to_frame(self):
        """``pandas.DataFrame`` with columns ``layer, head, label, score``: one row per head."""
        pd = pandas()
        layer, head = torch.meshgrid(torch.arange(self.n_layer), torch.arange(self.n_head), indexing="ij")
        return pd.DataFrame({
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "label": [head_label(a, b) for a, b in zip(layer.flatten().tolist(), head.flatten().tolist())],
            "score": self.scores.flatten().numpy(),
        })

    def table(self, k: int = 5) -> str:
        """The score of every head as a layers x heads grid, then the top ``k``."""
        cells = "".join(f"{f'h{h}':>8}" for h in range(self.n_head))
        title = f"{self.name} scores" + (f" ({self.description})" if self.description else "")
        lines = [title, f"{'':<8}{cells}"]
        for layer in range(self.n_layer):
            lines.append(f"{f'L{layer}':<8}" + "".join(f"{float(v):>8.3f}" for v in self.scores[layer]))
        lines.append("top: " + ", ".join(f"{label} {score:.3f}" for label, score in self.top(k)))
        return "\n".join(lines)

    def plot(self, *, ax=None, annotate: bool | None = None):
        """Layers x heads heatmap (needs matplotlib). Returns the figure."""
        from reslens.plot import plot_head_scores

        return plot_head_scores(self, ax=ax, annotate=annotate)

    def explore(self, *others: HeadScores, patterns: Any = None, tokens: Any = None):
        """The explorer page of these scores (and ``others``), with one prompt's ``patterns`` per head.

        ``patterns: [n_layer, n_head, query, key]`` (e.g. ``attention_patterns(model, ids)[:, 0]``).
        """
        from reslens.explorer import explore

        return explore([self, *others], patterns=patterns, tokens=tokens)

    def __repr__(self) -> str:
        top = ", ".join(f"{label}={score:.3f}" for label, score in self.top(3))
        return f"HeadScores({self.name!r}, [{self.n_layer} x {self.n_head}], top: {top})"

    def _repr_html_(self) -> str:
        rows = [[f"L{layer}", *self.scores[layer].tolist()] for layer in range(self.n_layer)]
        title = f"{self.name} scores" + (f" ({self.description})" if self.description else "")
        note = "— one score per head: a row per layer (L), a column per head (h); .top(k): the strongest."
        return html_table(title, ["", *(f"h{h}" for h in range(self.n_head))], rows, note=note)


# --- capturing patterns ---------------------------------------------------------------------


def _capture_patterns(arch: Arch, inputs: Any, tokenizer: Any, *,
                      fix: str = "give fewer or shorter sequences") -> Residuals:
    """One forward that records ``attn_pattern`` (float32) for every block of ``inputs``.

    Refused first, saying what to do (``fix``), when the patterns would not fit in the model's device.
    """
    batch = as_batch(inputs, arch, tokenizer)
    n, n_pos = batch.input_ids.shape
    # every block's [n, head, pos, pos] kept, and about three more while a block's are computed
    need = (arch.n_layer + 3) * n * arch.n_head * n_pos * n_pos * 4
    check_memory(need, arch.device, fix=fix, what=f"capturing the attention patterns of {n} x {n_pos} tokens "
                 f"({arch.n_layer} layers x {arch.n_head} heads x {n_pos}x{n_pos} positions, float32)")
    return _capture(arch, batch, sites=("attn_pattern",), layers=tuple(range(arch.n_layer + 1)),
                    dtype=torch.float32)


def _pattern(residuals: Any, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(attn_pattern [L, B, H, P, P], attention_mask [B, P], stat_mask [B, P])`` of blocks 0, 1, ...

    ``stat_mask``: the positions statistics count (real and not special, e.g. not a BOS token).
    """
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be reslens Residuals (from capture); got {type(residuals).__name__}")
    residuals.require("attn_pattern", what=what)
    if residuals.blocks != tuple(range(len(residuals.blocks))):
        raise ValueError(
            f"{what} labels heads by layer, so it needs attn_pattern of blocks 0, 1, ... in order; these "
            f"Residuals hold blocks {list(residuals.blocks)} (capture with layers=None)"
        )
    pattern = residuals.attn_pattern.float()
    return (pattern, residuals.attention_mask.to(pattern.device).bool(),
            residuals.stat_mask.to(pattern.device).bool())


def attention_patterns(model: Any, inputs: Any, *, tokenizer: Any = None) -> torch.Tensor:
    """Softmax attention of every head ``[n_layer, batch, head, query, key]`` (float32).

    Captured through :mod:`reslens.hooks` (recomputed from q and k, so the model keeps its
    own attention implementation, e.g. sdpa). Query rows of pads hold zeros; pads are never
    attended to. With a capture of your own, read ``residuals.attn_pattern`` instead.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> tuple(attention_patterns(model, torch.tensor([[1, 2, 3]])).shape)
    (2, 1, 2, 3, 3)
    """
    return _capture_patterns(adapter(model), inputs, tokenizer).attn_pattern


# --- repeated random tokens and induction ----------------------------------------------------


def _token_pool(token_pool: Any, d_vocab: int) -> torch.Tensor:
    if token_pool is None:
        return torch.arange(d_vocab)
    try:
        pool = torch.as_tensor(token_pool)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"token_pool must be a sequence or 1-D tensor of token ids; got {type(token_pool).__name__}"
        ) from error
    if pool.ndim != 1 or pool.numel() < 2 or pool.dtype.is_floating_point or pool.dtype == torch.bool:
        raise ValueError(
            "token_pool must be a 1-D collection of at least 2 integer token ids; got shape "
            f"{tuple(pool.shape)}, dtype {pool.dtype}"
        )
    if int(pool.min()) < 0 or int(pool.max()) >= d_vocab:
        raise ValueError(f"token_pool contains ids outside the vocabulary 0..{d_vocab - 1}")
    return pool


def repeated_tokens(
    model: Any, *, seq_len: int = 50, n: int = 10, seed: int = 0, token_pool: Any = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """``n`` random sequences of ``seq_len`` tokens, each written twice: ``[n, 2 * seq_len]``.

    ``[n, 1 + 2 * seq_len]`` with ``bos_token_id``, which is written first. Tokens are drawn
    uniformly (with replacement) from ``token_pool`` (default: the whole vocabulary) by a
    generator seeded with ``seed``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    >>> ids = repeated_tokens(model, seq_len=4, n=2)
    >>> tuple(ids.shape), bool((ids[:, :4] == ids[:, 4:]).all())
    ((2, 8), True)
    """
    arch = adapter(model)
    check_int(seq_len, "seq_len", low=2)
    check_int(n, "n", low=1)
    check_int(seed, "seed", low=0)
    extra = 0
    if bos_token_id is not None:
        check_int(bos_token_id, "bos_token_id", low=0, high=arch.d_vocab - 1)
        extra = 1
    if 2 * seq_len + extra > arch.n_ctx:
        raise ValueError(
            f"seq_len={seq_len} repeated twice needs {2 * seq_len + extra} positions; the model's context is "
            f"{arch.n_ctx} positions (use seq_len <= {(arch.n_ctx - extra) // 2})"
        )
    pool = _token_pool(token_pool, arch.d_vocab)
    generator = torch.Generator().manual_seed(seed)
    first = pool[torch.randint(len(pool), (n, seq_len), generator=generator)].long()
    if bos_token_id is None:
        return torch.cat([first, first], dim=1)
    return torch.cat([torch.full((n, 1), bos_token_id, dtype=torch.long), first, first], dim=1)


def induction_scores_of(residuals: Residuals, *, seq_len: int, start: int = 0) -> HeadScores:
    """The induction score of captured patterns of tokens written twice (see :func:`induction_scores`).

    Positions ``start .. start + seq_len - 1`` hold the first copy and the next ``seq_len``
    the second (``start=1`` after a BOS token); the score is the mean attention from each
    position ``i`` of the second copy to ``i - seq_len + 1``, over every sequence. Every scored
    position must be a real, non-special token (``Residuals.stat_mask``). When the residuals hold
    ``input_ids``, they must repeat that way.
    """
    pattern, _, stat = _pattern(residuals, "induction_scores_of")
    n_pos = pattern.shape[-1]
    check_int(start, "start", low=0)
    check_int(seq_len, "seq_len", low=2)
    if start + 2 * seq_len > n_pos:
        raise ValueError(f"start={start} + 2 * seq_len={seq_len} exceeds the {n_pos} captured positions")
    if not bool(stat[:, start : start + 2 * seq_len].all()):
        raise ValueError(
            f"positions {start}..{start + 2 * seq_len - 1} must be real, non-special tokens in each sequence "
            "(a BOS token goes before start)"
        )
    ids, middle, end = residuals.input_ids, start + seq_len, start + 2 * seq_len
    if ids is not None and not torch.equal(ids[:, start:middle], ids[:, middle:end]):
        raise ValueError(
            f"input_ids {middle}..{end - 1} do not repeat {start}..{middle - 1}; "
            "induction scores need tokens written twice (repeated_tokens)"
        )
    query = torch.arange(start + seq_len, start + 2 * seq_len, device=pattern.device)
    stripe = pattern[..., query, query - seq_len + 1]  # [L, n, H, seq_len]
    return HeadScores(stripe.mean(dim=(1, 3)), "induction",
                      f"mean attention from i to i-{seq_len}+1 over the second repeat; "
                      f"{pattern.shape[1]} x {seq_len} tokens")


def induction_scores(
    model: Any, *, seq_len: int = 50, n: int = 10, seed: int = 0, token_pool: Any = None,
    bos_token_id: int | None = None,
) -> HeadScores:
    """Induction score of every head on repeated random tokens (as in TransformerLens).

    On ``n`` sequences of ``seq_len`` random tokens written twice (:func:`repeated_tokens`),
    the mean attention from each position ``i`` of the second repeat to ``i - seq_len + 1``
    (the token after the earlier copy of the current token). An induction head scores
    near 1; uniform attention scores about ``1 / i``. ``bos_token_id`` (e.g. the
    tokenizer's end-of-text id, as TransformerLens prepends BOS; a Llama-family BOS where the
    tokenizer adds one) is written before the repeats, marked special and never scored.

    The same on every family: the pattern is the model's own (rotary at the real positions,
    grouped-query heads). Under a sliding window of ``w`` positions (Mistral) a key
    ``seq_len - 1`` back is visible only when ``seq_len <= w``; beyond that every head scores 0
    by construction, which is logged as a warning.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> s = induction_scores(model, seq_len=5, n=2)
    >>> tuple(s.scores.shape), s.top(1)[0][0] in {"0.0", "0.1", "1.0", "1.1"}
    ((2, 2), True)
    """
    arch = adapter(model)
    ids = repeated_tokens(arch, seq_len=seq_len, n=n, seed=seed, token_pool=token_pool,
                          bos_token_id=bos_token_id)
    windows = [w for w in map(getattr(arch, "window", lambda _: None), range(arch.n_layer)) if w is not None]
    if windows and seq_len > min(windows):
        logger.warning("induction_scores: seq_len=%d exceeds the sliding window (%d positions) of some "
                       "layers; their heads cannot see the earlier copy and score 0", seq_len, min(windows))
    special = torch.zeros(ids.shape, dtype=torch.bool)
    special[:, 0] = bos_token_id is not None
    residuals = _capture_patterns(arch, Batch(ids, torch.ones_like(special), special_mask=special), None,
                                  fix=f"use a smaller seq_len or n (got seq_len={seq_len}, n={n})")
    scores = induction_scores_of(residuals, seq_len=seq_len, start=0 if bos_token_id is None else 1)
    how = (f"mean attention from i to i-{seq_len}+1 over the second repeat; {n} x {seq_len} random tokens, "
           f"seed {seed}" + ("" if bos_token_id is None else f", BOS {bos_token_id} first"))
    return replace(scores, description=how)


# --- scores on any text -----------------------------------------------------------------------


def _mean_over(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``Σ values * valid / Σ valid`` over batch and query: ``values [L, B, H, Q]``, ``valid [B, Q]``."""
    return (values * valid[None, :, None]).sum(dim=(1, 3)) / valid.sum()


def previous_token_scores_of(residuals: Residuals) -> HeadScores:
    """Mean attention to the previous token of captured patterns (see :func:`previous_token_scores`)."""
    pattern, _, stat = _pattern(residuals, "previous_token_scores_of")
    valid = (stat[:, 1:] & stat[:, :-1]).float()  # [B, P-1]: query i and token i-1 are counted positions
    if valid.sum() == 0:
        raise ValueError("previous-token scores need a sequence with at least 2 real tokens in a row "
                         "that are not special (a BOS)")
    stripe = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [L, B, H, P-1]: attention i -> i-1
    return HeadScores(_mean_over(stripe, valid), "previous-token",
                      f"mean attention to i-1 over {int(valid.sum())} positions")


def previous_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention from each token to the token just before it ``[n_layer, n_head]``.

    Averaged over every real query position whose previous token is real too (pads never
    count); special tokens (a BOS the tokenizer added, ``Batch.special_mask``) count like pads,
    so the first text token's attention to a BOS (often an attention sink in Llama-family
    models, not a previous-token mechanism) is left out. ``inputs``: ids ``[batch, pos]``, a
    :class:`~reslens.Batch`, or text with ``tokenizer=``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> s = previous_token_scores(model, torch.tensor([[1, 2, 3, 4, 5]]))
    >>> bool(((s.scores > 0) & (s.scores < 1)).all())
    True
    """
    return previous_token_scores_of(_capture_patterns(adapter(model), inputs, tokenizer))


def current_token_scores_of(residuals: Residuals) -> HeadScores:
    """Mean attention to the token itself of captured patterns (see :func:`current_token_scores`)."""
    pattern, mask, stat = _pattern(residuals, "current_token_scores_of")
    valid = (stat & (mask.long().cumsum(-1) >= 2)).float()  # [B, P]: counted, with an earlier key to choose
    if valid.sum() == 0:
        raise ValueError("current-token scores need a non-special token after at least one other real token")
    diag = pattern.diagonal(dim1=-2, dim2=-1)  # [L, B, H, P]
    how = f"mean attention to i over {int(valid.sum())} positions"
    return HeadScores(_mean_over(diag, valid), "current-token", how)


def current_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention from each token to itself ``[n_layer, n_head]``.

    Averaged over real query positions that have at least one earlier real token (the first
    token can only attend to itself, so it is left out). A special token (a BOS the tokenizer
    added) is never a query counted, but it is an earlier token: the first text token after a
    BOS can attend to either, so it counts.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> tuple(current_token_scores(model, torch.tensor([[1, 2, 3]])).scores.shape)
    (2, 2)
    """
    return current_token_scores_of(_capture_patterns(adapter(model), inputs, tokenizer))


def duplicate_token_scores_of(residuals: Residuals) -> HeadScores:
    """Attention to earlier copies of captured patterns (see :func:`duplicate_token_scores`).

    Needs the residuals' ``input_ids`` (every capture records them).
    """
    pattern, _, stat = _pattern(residuals, "duplicate_token_scores_of")
    if residuals.input_ids is None:
        raise ValueError("duplicate_token_scores_of needs the input_ids, which these Residuals lack")
    ids = residuals.input_ids.to(pattern.device)
    n_pos = ids.shape[1]
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool, device=ids.device).tril(-1)  # key < query
    same = (ids[:, :, None] == ids[:, None, :]) & earlier & stat[:, :, None] & stat[:, None, :]  # [B, q, k]
    has = same.any(-1).float()  # [B, q]
    if has.sum() == 0:
        raise ValueError(
            "no token occurs twice in inputs, so duplicate-token scores are undefined; "
            "use inputs with repeats, e.g. repeated_tokens(model)"
        )
    mass = (pattern * same[None, :, None].float()).sum(-1)  # [L, B, H, q]
    return HeadScores(_mean_over(mass, has), "duplicate-token",
                      f"attention to earlier copies, mean over the {int(has.sum())} positions that have one")


def duplicate_token_scores(model: Any, inputs: Any, *, tokenizer: Any = None) -> HeadScores:
    """Mean attention mass on earlier occurrences of the current token ``[n_layer, n_head]``.

    reslens's definition: the attention a query puts on earlier positions holding its own
    token, averaged over the real query positions **that have such an earlier copy** (pooled
    over the batch; pads and special tokens such as a BOS never count, as queries or as copies).
    A perfect duplicate-token head scores 1.

    TransformerLens's ``detect_head(..., "duplicate_token_head")`` (``error_measure="mul"``,
    no exclusions) sums the same attention mass but divides by **all** ``P`` query rows of a
    sequence (its BOS row included), then averages the sequences. For one sequence with
    ``n_dup`` such queries, ``TL = reslens * n_dup / P``: on :func:`repeated_tokens` with
    ``seq_len`` tokens and no repeat inside a copy, ``n_dup = seq_len`` and ``P = 2 * seq_len``
    (``+ 1`` with its BOS), so TransformerLens's number is about half of this one.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> s = duplicate_token_scores(model, repeated_tokens(model, seq_len=4, n=2))
    >>> tuple(s.scores.shape)
    (2, 2)
    """
    return duplicate_token_scores_of(_capture_patterns(adapter(model), inputs, tokenizer))
