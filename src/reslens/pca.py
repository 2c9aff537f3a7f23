"""Principal components of the residual stream.

- :class:`ResidualPCA`: variance directions over many residual vectors, a scikit-learn estimator
  (built on ``sklearn.decomposition.PCA`` / ``IncrementalPCA``).
- :func:`trajectory_pca_of` (pure, on captured :class:`~reslens.residuals.Residuals`) and
  :func:`trajectory_pca` (captures, then calls it): for each prediction, PCA across layers of that
  position's residual stack ``[layers, d_model]``, batched as one torch SVD over all examples.
- :func:`pca_experiment`: the "one direction is the prediction" experiment with its controls
  (norm growth, the final norm, centring, the embedding row, a random direction).

Sign conventions: a :class:`ResidualPCA` component has its largest-magnitude loading positive (as
scikit-learn's ``svd_flip``); a trajectory component is signed so that the stack's last row
(minus the mean when centred) has a non-negative coordinate on it, so PC1 points along where the
residual ends up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import torch

from reslens._checks import (check_bool, check_choice, check_int, check_layers, check_position,
                             check_tokenizer)
from reslens._corpus import start_ids
from reslens._distributed import shard_of
from reslens._inputs import as_batch
from reslens._pca_samples import experiment_stacks, model_top1, sample_windows
from reslens._residual_pca import ResidualPCA
from reslens._saving import Saveable
from reslens._stream import window_size
from reslens._text import html_table, pandas
from reslens.arch import Arch, adapter
from reslens.hooks import _capture
from reslens.residuals import Residuals

__all__ = ["ResidualPCA", "TrajectoryPCAResult", "trajectory_pca", "trajectory_pca_of", "ConditionResult",
           "PCAExperiment", "pca_experiment", "NORMALIZE", "CONDITIONS"]

#: ``normalize`` options: none, each layer's vector to norm 1, or through the final norm.
NORMALIZE = (None, "unit", "final_norm")


# --- PCA across layers of one prediction ---------------------------------------------------


@dataclass(frozen=True, repr=False)
class TrajectoryPCAResult(Saveable):
    """PCA across layers of each example's residual stack. ``E`` = examples, ``K`` = components.

    - ``seq``, ``pos``: ``[E]`` where each example sits in the batch
    - ``explained_variance_ratio: [E, K]``; ``pc1: [E, d_model]`` (sign: along the last row)
    - ``final_prediction: [E]``: the model's own top-1 token at that position
    - ``pc1_top_token``, ``pc1_final_rank: [E]``: PC1 read through the final norm and the
      unembedding (top token; rank of the final prediction, 0 = top); ``pc1_top_token_raw``,
      ``pc1_final_rank_raw``: PC1 through the unembedding alone; ``pc1_top_token_flipped``:
      ``-PC1`` through the final norm and the unembedding (a component's sign is a convention)
    - ``layers``: the residual layers stacked; ``center``, ``normalize``: how
    """

    seq: torch.Tensor
    pos: torch.Tensor
    explained_variance_ratio: torch.Tensor
    pc1: torch.Tensor
    final_prediction: torch.Tensor
    pc1_top_token: torch.Tensor
    pc1_final_rank: torch.Tensor
    pc1_top_token_raw: torch.Tensor
    pc1_final_rank_raw: torch.Tensor
    pc1_top_token_flipped: torch.Tensor
    layers: tuple[int, ...]
    center: bool
    normalize: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        n = self.seq.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.shape[0] != n:
                raise ValueError(f"{f.name} has {value.shape[0]} rows; expected {n} examples")

    @property
    def match(self) -> torch.Tensor:
        """``[E]`` bool: PC1's top token (through the final norm) is the model's final prediction."""
        return self.pc1_top_token == self.final_prediction

    @property
    def match_raw(self) -> torch.Tensor:
        """``[E]`` bool: the same without the final norm."""
        return self.pc1_top_token_raw == self.final_prediction

    def to_frame(self):
        """``pandas.DataFrame``: one row per example."""
        return pandas().DataFrame({
            "seq": self.seq.numpy(), "pos": self.pos.numpy(),
            "pc1_evr": self.explained_variance_ratio[:, 0].numpy(),
            "final_prediction": self.final_prediction.numpy(),
            "pc1_top_token": self.pc1_top_token.numpy(), "match": self.match.numpy(),
            "pc1_final_rank": self.pc1_final_rank.numpy(),
            "pc1_top_token_raw": self.pc1_top_token_raw.numpy(), "match_raw": self.match_raw.numpy(),
            "pc1_final_rank_raw": self.pc1_final_rank_raw.numpy(),
        })

    def __repr__(self) -> str:
        return (f"TrajectoryPCAResult(examples={self.seq.shape[0]}, "
                f"layers={self.layers[0]}..{self.layers[-1]}, center={self.center}, "
                f"normalize={self.normalize!r})")

    def _repr_html_(self) -> str:
        evr = self.explained_variance_ratio[:, 0].double()
        rows = [("examples", self.seq.shape[0]),
                ("PC1 explained variance (mean)", f"{float(evr.mean()):.3f}"),
                ("PC1 top token = final prediction", f"{float(self.match.double().mean()):.3f}"),
                ("(without the final norm)", f"{float(self.match_raw.double().mean()):.3f}")]
        return html_table(repr(self), (), rows)


def _rank_of(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``token: [E]`` in ``logits: [E, vocab]`` (count of strictly larger)."""
    return (logits > logits.gather(1, token[:, None])).sum(-1)


def _batched_pca(arch: Arch, stacks: torch.Tensor, *, center: bool, normalize: str | None):
    """PCA of each example's ``stacks: [E, L, d_model]``.

    Returns explained variance ratios ``[E, K]`` and components ``[E, K, d_model]`` (signed along
    the last row).
    """
    x = stacks.float()
    if normalize == "unit":
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    elif normalize == "final_norm":
        with torch.no_grad():
            x = arch.norm("final")(x.to(arch.dtype)).float()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    # SVD through the small Gram matrix [E, L, L] in float64 (L = layers, a dozen or so):
    # one batched eigh instead of E SVDs of [L, d_model].
    x64 = x.double()
    power, u = torch.linalg.eigh(x64 @ x64.transpose(1, 2))  # ascending
    power, u = power.flip(-1).clamp(min=0), u.flip(-1)  # [E, K], [E, L, K]
    s = power.sqrt()
    vh = ((u.transpose(1, 2) @ x64) / torch.where(s > 0, s, 1.0)[..., None]).float()  # [E, K, d_model]
    ratio = (power / power.sum(-1, keepdim=True).clamp(min=torch.finfo(power.dtype).tiny)).float()
    # Sign: the last row's coordinate on each component is non-negative.
    last = torch.einsum("ekd,ed->ek", vh, x[:, -1])
    return ratio, vh * torch.where(last < 0, -1.0, 1.0)[..., None]


def _readout(arch: Arch, direction: torch.Tensor, final_prediction: torch.Tensor) -> dict[str, torch.Tensor]:
    """A direction per example ``[E, d_model]`` read in the vocabulary.

    Through the final norm and the unembedding, through the unembedding alone, and reversed.
    """
    with torch.no_grad():
        d = direction.to(arch.dtype)
        logits = arch.logits(d).float()  # [E, vocab]
        logits_raw = (d @ arch.W_U.T).float()
        flipped = arch.logits(-d).float()
    return {
        "pc1": direction,
        "pc1_top_token": logits.argmax(-1),
        "pc1_final_rank": _rank_of(logits, final_prediction),
        "pc1_top_token_raw": logits_raw.argmax(-1),
        "pc1_final_rank_raw": _rank_of(logits_raw, final_prediction),
        "pc1_top_token_flipped": flipped.argmax(-1),
    }


def _stack_pca(arch: Arch, stacks: torch.Tensor, final_prediction: torch.Tensor, *, center: bool,
               normalize: str | None) -> dict[str, torch.Tensor]:
    """Batched PCA of ``stacks: [E, L, d_model]`` and PC1 read in the vocabulary."""
    ratio, components = _batched_pca(arch, stacks, center=center, normalize=normalize)
    return {"explained_variance_ratio": ratio, **_readout(arch, components[:, 0], final_prediction)}


def _positions(positions: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq, pos)`` index pairs ``[E]`` of the chosen prediction positions.

    ``positions``: ``"last"`` or None (each sequence's last real token), ``"all"``, an int (see
    :func:`reslens._checks.check_position`: an index of the padded ``pos`` axis, negatives from
    its end), or a ``[batch]`` tensor of such indices.
    """
    mask = mask.cpu()
    seq = torch.arange(mask.shape[0])
    if isinstance(positions, str):
        check_choice(positions, ("last", "all"), "positions")
        if positions == "all":
            return mask.nonzero(as_tuple=True)
        return seq, check_position(None, mask, name="positions")
    if positions is None or isinstance(positions, int):
        return seq, check_position(positions, mask, name="positions")
    if not isinstance(positions, torch.Tensor) or positions.ndim != 1 or positions.shape[0] != mask.shape[0] \
            or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError("positions must be 'last', 'all', None, an int or one int per sequence "
                         f"({mask.shape[0]}); got {positions!r}")
    pos = torch.stack([check_position(int(p), mask[i : i + 1], name=f"positions[{i}]")[0]
                       for i, p in enumerate(positions.tolist())])
    return seq, pos


def _check_trajectory_options(arch: Arch, layers: Any, center: Any, normalize: Any) -> tuple[int, ...]:
    check_choice(normalize, NORMALIZE, "normalize")
    check_bool(center, "center")
    kept = check_layers(layers, arch.n_layer, what=f"a {arch.n_layer}-layer model's residual stream")
    if len(kept) < 2:
        raise ValueError(f"layers={list(kept)}: a trajectory needs at least 2 layers")
    return kept


def trajectory_pca_of(residuals: Residuals, arch: Any, *, positions: Any = "last", layers: Any = None,
                      center: bool = True, normalize: str | None = None) -> TrajectoryPCAResult:
    """For each prediction, PCA across layers of that position's captured residual stack (no forward).

    ``residuals`` must hold ``resid`` at ``layers`` and at the final layer (the model's own
    prediction: the final raw residual through the final norm and the unembedding). ``arch``:
    the adapter (:func:`reslens.arch.adapter`) or the model. ``layers`` defaults to every
    residual layer captured. Other options: :func:`trajectory_pca`.
    """
    arch = adapter(arch)
    if not isinstance(residuals, Residuals):
        raise TypeError("residuals must be reslens Residuals (from reslens.capture); "
                        f"got {type(residuals).__name__}")
    residuals.require("resid", what="trajectory_pca")
    kept = _check_trajectory_options(arch, residuals.layers if layers is None else layers, center, normalize)
    seq, pos = _positions(positions, residuals.attention_mask)
    stacks = torch.stack([residuals.get("resid", layer) for layer in kept], dim=2)  # [B, P, L, d_model]
    stacks = stacks[seq.to(stacks.device), pos.to(stacks.device)].to(arch.device)  # [E, L, d_model]
    if not bool(stacks.isfinite().all()):
        bad = sorted({int(e) for e in (~stacks.isfinite()).flatten(1).any(1).nonzero().flatten()})
        raise ValueError(
            f"residuals hold NaN or inf at the chosen positions (predictions {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''} of {stacks.shape[0]}): a PCA of them has no meaning; "
            "expected finite residuals (a float16 overflow? capture with dtype=torch.float32 or choose "
            "other positions)"
        )
    final_prediction = model_top1(arch, residuals, seq.to(stacks.device), pos.to(stacks.device))
    out = _stack_pca(arch, stacks, final_prediction, center=center, normalize=normalize)
    return TrajectoryPCAResult(
        seq=seq, pos=pos, final_prediction=final_prediction.cpu(), layers=kept, center=center,
        normalize=normalize, **{k: v.detach().cpu() for k, v in out.items()},
    )


def trajectory_pca(
    model: Any,
    inputs: Any,
    *,
    tokenizer: Any = None,
    positions: Any = "last",
    layers: Any = None,
    center: bool = True,
    normalize: str | None = None,
) -> TrajectoryPCAResult:
    """For each prediction, PCA across layers of that position's residual stack.

    ``positions``: ``"last"`` or None (each sequence's last real token), ``"all"``, an int (an
    index of the padded ``pos`` axis, negatives from its end; a real token in every sequence), or
    one such int per sequence. ``layers``: residual layers to stack (default all ``n_layer + 1``,
    embedding included). ``normalize``: None, ``"unit"`` (each layer's vector scaled to norm 1,
    removing norm growth) or ``"final_norm"`` (the final norm applied to each; under RMSNorm this
    differs from ``"unit"`` only by the norm's γ and eps). One batched torch SVD. Captures once,
    then :func:`trajectory_pca_of`.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> r = trajectory_pca(model, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    >>> tuple(r.explained_variance_ratio.shape), tuple(r.pc1.shape)
    ((2, 4), (2, 16))
    """
    arch = adapter(model)
    kept = _check_trajectory_options(arch, layers, center, normalize)
    batch = as_batch(inputs, arch, tokenizer)
    _positions(positions, batch.attention_mask)  # bad positions: refused before the forward
    res = _capture(arch, batch, sites=("resid",), layers=tuple(sorted({*kept, arch.n_layer})))
    return trajectory_pca_of(res, arch, positions=positions, layers=kept, center=center, normalize=normalize)


# --- the experiment -------------------------------------------------------------------------


#: (name, description, keyword arguments) of each condition; "all" = embedding included.
CONDITIONS = (
    ("baseline", "centred raw residuals, all layers (embedding included)", dict()),
    ("no_embedding", "centred raw residuals, block outputs only (layers 1..n)", dict(skip_embedding=True)),
    ("uncentred", "raw residuals without centring", dict(center=False)),
    ("unit_norm", "each layer's residual scaled to norm 1 (removes norm growth)", dict(normalize="unit")),
    ("final_norm", "the final norm applied to each layer's residual (under RMSNorm: unit_norm up to γ, eps)",
     dict(normalize="final_norm")),
    ("random", "a random unit direction instead of PC1 (chance baseline)", dict(random=True)),
)


@dataclass(frozen=True, repr=False)
class ConditionResult(Saveable):
    """One condition of :class:`PCAExperiment`: per-prediction arrays over its ``n`` examples.

    ``explained_variance_ratio: [n, K]`` (K = layers stacked; the random direction's share of the
    variance, ``K = 1``, for ``"random"``); ``pc1_top_token``, ``pc1_final_rank``,
    ``pc1_top_token_raw``, ``pc1_final_rank_raw``, ``pc1_top_token_flipped: [n]`` as in
    :class:`TrajectoryPCAResult`; ``match``, ``match_raw``, ``match_flipped: [n]`` bool: that
    readout's top token is the model's final prediction.
    """

    explained_variance_ratio: torch.Tensor
    pc1_top_token: torch.Tensor
    pc1_final_rank: torch.Tensor
    pc1_top_token_raw: torch.Tensor
    pc1_final_rank_raw: torch.Tensor
    pc1_top_token_flipped: torch.Tensor
    match: torch.Tensor
    match_raw: torch.Tensor
    match_flipped: torch.Tensor

    def summary_row(self) -> tuple[float, float, float, float, float, float]:
        """The summary numbers in the order of ``_SUMMARY`` (``pc1_evr_mean``, ..., ``median_final_rank``)."""
        evr = self.explained_variance_ratio[:, 0].double()
        return (float(evr.mean()), float(evr.std()), float(self.match.double().mean()),
                float(self.match_raw.double().mean()), float(self.match_flipped.double().mean()),
                float(self.pc1_final_rank.double().median()))

    def __repr__(self) -> str:
        evr, _, rate, *_ = self.summary_row()
        return f"ConditionResult(n={self.match.shape[0]}, pc1_evr_mean={evr:.3f}, match_rate={rate:.3f})"

    def _repr_html_(self) -> str:
        return html_table(repr(self), (), [(k, f"{v:.3f}") for k, v in zip(_SUMMARY, self.summary_row())])


_SUMMARY = ("pc1_evr_mean", "pc1_evr_std", "match_rate", "match_rate_raw", "match_rate_flipped",
            "median_final_rank")


@dataclass(frozen=True, repr=False)
class PCAExperiment(Saveable):
    """The "one direction is the prediction" experiment over ``n`` sampled predictions.

    One :class:`ConditionResult` field per condition of ``CONDITIONS`` (``baseline``,
    ``no_embedding``, ``uncentred``, ``unit_norm``, ``final_norm``, ``random``; also
    :meth:`condition` by name); ``examples: [n, 2]`` the (window, position) of each prediction
    and ``final_prediction: [n]`` the model's own top-1 there.
    """

    n: int
    seed: int
    n_layer: int
    examples: torch.Tensor
    final_prediction: torch.Tensor
    baseline: ConditionResult
    no_embedding: ConditionResult
    uncentred: ConditionResult
    unit_norm: ConditionResult
    final_norm: ConditionResult
    random: ConditionResult

    def condition(self, name: str) -> ConditionResult:
        """The result of condition ``name`` (one of ``CONDITIONS``)."""
        return getattr(self, check_choice(name, [c for c, _, _ in CONDITIONS], "condition"))

    def summary(self):
        """``pandas.DataFrame``: one row per condition.

        Mean and std of PC1's explained variance, match rates with and without the final norm and
        for ``-PC1``, median rank of the final prediction.
        """
        rows = [dict(condition=name, **dict(zip(_SUMMARY, self.condition(name).summary_row())),
                     description=text) for name, text, _ in CONDITIONS]
        return pandas().DataFrame(rows)

    def table(self) -> str:
        """The summary as text."""
        head = (f"{'condition':<13} {'PC1 var (mean ± std)':>21} {'top-1 = final':>13} {'(no norm)':>10} "
                f"{'(-PC1)':>7} {'med rank':>9}")
        lines = [f"{self.n} predictions, {self.n_layer}-layer model, seed {self.seed}", head, "-" * len(head)]
        for name, _, _ in CONDITIONS:
            evr, std, rate, raw, flipped, rank = self.condition(name).summary_row()
            lines.append(f"{name:<13} {evr:>12.3f} ± {std:<6.3f} {rate:>13.3f} {raw:>10.3f} {flipped:>7.3f} "
                         f"{rank:>9.0f}")
        return "\n".join(lines)

    def to_frame(self):
        """Long form: one row per (condition, example)."""
        pd = pandas()
        frames = []
        for name, _, _ in CONDITIONS:
            r = self.condition(name)
            frames.append(pd.DataFrame({
                "condition": name, "window": self.examples[:, 0].numpy(), "pos": self.examples[:, 1].numpy(),
                "pc1_evr": r.explained_variance_ratio[:, 0].numpy(), "match": r.match.numpy(),
                "match_raw": r.match_raw.numpy(), "match_flipped": r.match_flipped.numpy(),
                "pc1_final_rank": r.pc1_final_rank.numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def plot(self, *, ax=None, conditions: tuple[str, ...] = ("baseline", "no_embedding", "unit_norm")):
        """Explained-variance ratio per component (mean with 10-90% band), like the seed's figure."""
        from reslens.plot import plot_pca_experiment

        for name in conditions:
            self.condition(name)
        return plot_pca_experiment(self, ax=ax, conditions=conditions)

    def __repr__(self) -> str:
        return f"PCAExperiment(n={self.n}, seed={self.seed}, conditions={[c for c, _, _ in CONDITIONS]})"

    def _repr_html_(self) -> str:
        rows = [(name, *(f"{v:.3f}" for v in self.condition(name).summary_row()))
                for name, _, _ in CONDITIONS]
        return html_table(repr(self), ("condition", *_SUMMARY), rows)


def pca_experiment(
    model: Any,
    tokenizer: Any,
    texts: Any,
    *,
    n: int = 200,
    seed: int = 0,
    max_length: int = 128,
    min_context: int = 8,
    batch_size: int = 16,
    progress: bool = True,
    group: Any = None,
) -> PCAExperiment:
    """The "one direction is the prediction" experiment with its controls (see ``CONDITIONS``).

    Samples ``n`` prediction positions from ``texts`` (windows of ``max_length`` tokens, at most
    the model's context, each led by the start tokens the tokenizer adds — a BOS for Llama-style
    tokenizers, none for GPT-2 or SmolLM2 —; positions at least ``min_context`` tokens of the text
    in, counted without the start tokens, as in ``examples``), runs PCA across layers of
    each one's residual stack, and compares the conditions. Residuals are captured once per batch
    of ``batch_size`` windows.

    ``group``: a torch.distributed process group (None = the default group under ``torchrun``,
    else one process; False = one process). Rank ``r`` of ``W`` captures the batches ``b`` with
    ``b % W == r``, each padded as one process pads it; the stacks are gathered in example order
    and every rank runs the (cheap) per-example PCA on all of them, so every rank returns the
    one-process result. Every rank must be given the same texts and options (checked).
    """
    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        for name, value, low in (("n", n, 1), ("seed", seed, None), ("max_length", max_length, 1),
                                 ("min_context", min_context, 0), ("batch_size", batch_size, 1)):
            check_int(value, name, low=low)
        check_bool(progress, "progress")
        check_tokenizer(tokenizer, why="the experiment reads text")
        size = window_size(arch, start_ids(tokenizer), max_length)
        windows, chosen = sample_windows(tokenizer, texts, n, seed, size, min_context)
    if shard.parallel:
        read = repr(([windows[w] for w in sorted({w for w, _ in chosen})], chosen, batch_size))
        shard.same(hashlib.sha256(read.encode()).hexdigest(), "the texts and options (a hash of the sampled "
                   "windows and positions)")
        shard.same_model(arch)
    stacks_all, final_prediction = experiment_stacks(arch, tokenizer, windows, chosen, batch_size, progress,
                                                     shard)
    results = {}
    gen = torch.Generator().manual_seed(seed)
    for name, _, options in CONDITIONS:
        x = stacks_all[:, 1:] if options.get("skip_embedding") else stacks_all
        if options.get("random"):
            out = _random_direction(arch, x, final_prediction, gen)
        else:
            out = _stack_pca(arch, x, final_prediction, center=options.get("center", True),
                             normalize=options.get("normalize"))
        out["match"] = out["pc1_top_token"] == final_prediction
        out["match_raw"] = out["pc1_top_token_raw"] == final_prediction
        out["match_flipped"] = out["pc1_top_token_flipped"] == final_prediction
        results[name] = ConditionResult(**{k: v.detach().cpu() for k, v in out.items() if k != "pc1"})
    return PCAExperiment(n=n, seed=seed, n_layer=arch.n_layer, examples=torch.tensor(chosen),
                         final_prediction=final_prediction.cpu(), **results)


def _random_direction(arch: Arch, stacks: torch.Tensor, final_prediction: torch.Tensor, gen: torch.Generator):
    """Chance baseline: a random unit direction per example, sign-aligned like PC1.

    Its 'explained variance' is the share of the centred stack's variance along it.
    """
    x = stacks.float() - stacks.float().mean(dim=1, keepdim=True)
    direction = torch.randn(x.shape[0], x.shape[2], generator=gen).to(x.device)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    direction = direction * torch.where((direction * x[:, -1]).sum(-1) < 0, -1.0, 1.0)[:, None]
    share = (x @ direction[..., None]).squeeze(-1).pow(2).sum(-1) / x.pow(2).sum((1, 2)).clamp(min=1e-30)
    return {"explained_variance_ratio": share[:, None], **_readout(arch, direction, final_prediction)}
